"""Multiple-choice scoring by option letters, as lm-eval-harness scores TeacherLM-style prompts.

The options are listed in the prompt with letters, and the answer is the letter the model finds most likely to come
next: the prompt ends in "The answer is (" and each letter ("A", "B", ...) is scored as its continuation. Unlike
rank classification (`scoring.choice_log_likelihoods` on the option texts) the options compete on one token each,
so long and short options are compared fairly, and the model sees all options before it answers.

Both families, scored as a pretrained model of that family is used:
- a decoder-only LM (BLOOM, Llama from HF): lm-eval's `loglikelihood`, the plain causal continuation: the context
  tokens exactly as given (with the BOS a HF tokenizer adds, if it does), then the letter's tokens; the logits at
  position t predict token t + 1. There is no start-token-0 shift here, unlike `interface.choice_scores`, whose
  causal format is our own fine-tuning format (start token 0, input, target);
- an encoder-decoder (T5): the context is the encoder input and the letter the decoder target (seqio's format),
  through `scoring.choice_log_likelihoods`.

Template (`format_prompt`), one line per part:
    Q: {question}
    (A) {option 0} (B) {option 1} ...
    A: The answer is (
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.evaluation import scoring
from moe_jax.models import interface
from moe_jax.training import partitioning as part

LETTERS = "ABCDEFGHIJ"
EOS_ID = scoring.EOS_ID  # T5's (seqio's) end of sequence
# Padded sequence lengths are rounded up to this, so tasks of similar prompt lengths share one compilation.
LENGTH_MULTIPLE = 16


def format_prompt(question: str, options: Sequence[str], letters: str = LETTERS) -> str:
  """The prompt for one question: "Q: {question}\\n(A) {o0} (B) {o1} ...\\nA: The answer is (".

  It ends in "(" so the next token is the option letter (with no space before it: a space would be a token of its
  own, or change the letter's token, in most vocabularies). Question and options are stripped of surrounding
  whitespace, so a trailing newline in the data does not change the layout.
  """
  if not options:
    raise ValueError("a multiple-choice question needs at least one option")
  if len(options) > len(letters):
    raise ValueError(f"{len(options)} options but only {len(letters)} letters ({letters!r})")
  listed = " ".join(f"({letter}) {option.strip()}" for letter, option in zip(letters, options))
  return f"Q: {question.strip()}\n{listed}\nA: The answer is ("


def _query_log_probs(model: nn.Module, params: Any, tokens: jax.Array, mask: jax.Array, positions: jax.Array,
                     targets: jax.Array, routing_ids: jax.Array | None) -> jax.Array:
  """log p(targets[b, k] | tokens[b, :positions[b, k] + 1]) [B, K] from one causal forward over tokens [B, L]
  (right-padded, mask 1 on real tokens). The softmax is taken only at the queried positions."""
  logits = model.apply({"params": params}, tokens, mask, routing_ids=routing_ids)
  picked = jnp.take_along_axis(logits, positions[..., None], axis=1).astype(jnp.float32)  # [B, K, V]
  chosen = jnp.take_along_axis(picked, targets[..., None], axis=-1)[..., 0]
  return chosen - jax.nn.logsumexp(picked, axis=-1)


_query_log_probs_jit = jax.jit(_query_log_probs, static_argnums=0)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _causal_letter_log_likelihoods(model: nn.Module, params: Any, contexts: list[np.ndarray],
                                   letters: list[list[np.ndarray]], batch_size: int,
                                   routing_ids: np.ndarray | None) -> np.ndarray:
  """Decoder-only scores [N, C]. When every letter is one token (the normal case) one row per example suffices:
  the logits at the context's last token give every letter's probability. Otherwise one row per (example, option),
  context then letter, scoring each letter token at the position before it."""
  n, num_choices = len(contexts), max(len(options) for options in letters)
  scores = np.full((n, num_choices), -np.inf, np.float64)
  if all(len(letter) == 1 for options in letters for letter in options):
    rows = [(i, None) for i in range(n)]
    sequences = contexts
    queries = [[(len(contexts[i]) - 1, int(letter[0])) for letter in letters[i]] for i in range(n)]
  else:
    rows = [(i, c) for i in range(n) for c in range(len(letters[i]))]
    sequences = [np.concatenate([contexts[i], letters[i][c]]) for i, c in rows]
    queries = [[(len(contexts[i]) - 1 + t, int(token)) for t, token in enumerate(letters[i][c])] for i, c in rows]
  length = _round_up(max(len(s) for s in sequences), LENGTH_MULTIPLE)
  tokens = scoring.pad_tokens(sequences, length)
  mask = (np.arange(length)[None, :] < np.array([len(s) for s in sequences])[:, None]).astype(np.int32)
  k = max(len(q) for q in queries)
  positions = np.zeros((len(rows), k), np.int32)  # unused query slots read position 0, token 0: ignored below
  targets = np.zeros((len(rows), k), np.int32)
  for r, q in enumerate(queries):
    positions[r, :len(q)], targets[r, :len(q)] = zip(*q)
  rid = None if routing_ids is None else np.asarray(routing_ids, np.int32)[[i for i, _ in rows]]

  logp = np.zeros((len(rows), k), np.float64)
  for start, count, (x, m, p, t, r) in scoring.fixed_batches(len(rows), batch_size, tokens, mask, positions,
                                                              targets, rid):
    logp[start:start + count] = part.to_host(_query_log_probs_jit(model, params, x, m, p, t, r))[:count]
  for r, ((i, c), q) in enumerate(zip(rows, queries)):
    if c is None:
      scores[i, :len(q)] = logp[r, :len(q)]
    else:
      scores[i, c] = logp[r, :len(q)].sum()
  return scores


def option_letter_log_likelihoods(model: nn.Module, params: Any, context_tokens: Sequence[np.ndarray],
                                  letter_tokens: Sequence[Sequence[np.ndarray]], batch_size: int = 32, *,
                                  routing_ids: np.ndarray | None = None) -> np.ndarray:
  """Summed log-likelihood [N, C] float64 of each option letter's tokens as the continuation of its context.

  `context_tokens`: N 1-D token arrays, as the model reads them (a decoder-only model: BOS included if the
  tokenizer adds one; T5: the encoder input, EOS included as seqio gives it). `letter_tokens`: per example, its C
  letters' 1-D token arrays (for the same letters everywhere pass `[letters] * N`); C may vary per example, and a
  letter an example lacks scores -inf. Batches are fixed-shape (`batch_size` rows, the last one padded; lengths
  rounded up to `LENGTH_MULTIPLE`), so a task compiles once per shape. A decoder-only model's rows are examples
  (one-token letters) or (example, option) pairs, with logits [batch_size, length, vocab] in memory at once.
  `routing_ids` [N] feeds routers that route by example id.
  """
  contexts = [np.asarray(c, np.int32).reshape(-1) for c in context_tokens]
  letters = [[np.asarray(t, np.int32).reshape(-1) for t in options] for options in letter_tokens]
  if len(contexts) != len(letters):
    raise ValueError(f"{len(contexts)} contexts but letters for {len(letters)} examples")
  if not contexts:
    return np.zeros((0, 0), np.float64)
  for i, (context, options) in enumerate(zip(contexts, letters)):
    if not options or any(len(t) == 0 for t in options):
      raise ValueError(f"example {i}: every example needs options, and every option letter at least one token")
    if len(context) == 0:
      raise ValueError(f"example {i}: empty context; nothing predicts the letter's first token (add a BOS)")
  if interface.is_decoder_only(model):
    return _causal_letter_log_likelihoods(model, params, contexts, letters, batch_size, routing_ids)
  inputs = scoring.pad_tokens(contexts, _round_up(max(len(c) for c in contexts), LENGTH_MULTIPLE))
  target_length = max(len(t) for options in letters for t in options)
  scores, _ = scoring.choice_log_likelihoods(model, params, inputs, letters, batch_size=batch_size,
                                             target_length=target_length, routing_ids=routing_ids)
  return scores.astype(np.float64)


def split_continuation(encode: Callable[[str], Sequence[int]], context: str,
                       continuation: str) -> tuple[list[int], list[int]]:
  """(context tokens, continuation tokens) as lm-eval encodes a causal LM's pair: whitespace at the end of the
  context moves to the continuation, then context + continuation is encoded as one string and split at the
  context's own token count. The continuation's tokens are then those the model would read after the context in
  running text (encoded alone, "A" could get a different token, e.g. SentencePiece's word-initial "▁A").
  A tokenizer that merges across the boundary makes the split approximate, as in lm-eval."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  context_tokens = list(encode(stripped))
  return context_tokens, list(encode(stripped + continuation))[len(context_tokens):]


def option_letter_accuracy(model: nn.Module, params: Any, encode: Callable[[str], Sequence[int]],
                           examples: Sequence[dict[str, Any]], bos_id: int | None = None, batch_size: int = 32, *,
                           letters: str = LETTERS, routing_ids: np.ndarray | None = None) -> dict[str, Any]:
  """Accuracy (percent) of predicting each example's answer letter, with the predictions and scores.

  `examples`: dicts with "question", "options" (list of str) and "answer_index" (int). Each prompt is
  `format_prompt`'s; `encode` maps a string to token ids (a HF tokenizer's `encode`, a seqio vocabulary's).
  - Decoder-only: letters are encoded in context (`split_continuation`, lm-eval's approach). `bos_id`, if given,
    is put before each context that does not already start with it (for an `encode` that adds no BOS itself;
    a HF Llama tokenizer's `encode` does, and its output is used as is).
  - Encoder-decoder: the context is encoded alone, with seqio's EOS (1) appended unless `encode` ended it with
    one, and each letter alone with a trailing EOS dropped (the target is the letter, as lm-eval's seq2seq pairs).
  The prediction is the argmax of the summed letter log-likelihoods (ties: the first option).
  Returns {"accuracy": float, "predictions": [int], "scores": [[float] per example]}.
  """
  contexts, letter_tokens = [], []
  decoder_only = interface.is_decoder_only(model)
  for example in examples:
    prompt = format_prompt(example["question"], example["options"], letters)
    option_letters = letters[:len(example["options"])]
    if decoder_only:
      pairs = [split_continuation(encode, prompt, letter) for letter in option_letters]
      context = pairs[0][0]
      if bos_id is not None and context[:1] != [bos_id]:
        context = [bos_id] + context
      options = [continuation for _, continuation in pairs]
    else:
      context = list(encode(prompt))
      if context[-1:] != [EOS_ID]:
        context.append(EOS_ID)
      options = [list(encode(letter)) for letter in option_letters]
      options = [t[:-1] if t[-1:] == [EOS_ID] else t for t in options]
    for letter, tokens in zip(option_letters, options):
      if not tokens:
        raise ValueError(f"option letter {letter!r} encodes to no tokens after {prompt[-20:]!r}")
    contexts.append(np.asarray(context, np.int32))
    letter_tokens.append([np.asarray(t, np.int32) for t in options])
  scores = option_letter_log_likelihoods(model, params, contexts, letter_tokens, batch_size, routing_ids=routing_ids)
  predictions = np.argmax(scores, axis=-1) if len(examples) else np.zeros(0, np.int64)
  answers = np.array([int(example["answer_index"]) for example in examples], np.int64)
  accuracy = 100.0 * float(np.mean(predictions == answers)) if len(examples) else 0.0
  return {"accuracy": accuracy, "predictions": [int(p) for p in predictions],
          "scores": [[float(s) for s in row[:len(ex["options"])]] for row, ex in zip(scores, examples)]}
