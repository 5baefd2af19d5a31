"""Option-letter multiple-choice scoring (`moe_jax.evaluation.option_letters`) against independent references:
transformers' PyTorch Llama and BLOOM (the log-likelihood of each letter after its context, one unpadded sequence
at a time), lm-eval-harness's `HFLM.loglikelihood` on the same local model and tokenizer (skipped where lm_eval is
not installed), and a bigram toy whose probabilities are written by hand. The T5 path is checked for consistency
with `choice_log_likelihoods`. Tiny random models, no network."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import models as tok_models, pre_tokenizers, processors

from moe_jax.checkpoints.hf import load_hf_causal_lm
from moe_jax.checkpoints.hf_causal import config_from_hf_causal
from moe_jax.evaluation.option_letters import (format_prompt, option_letter_accuracy, option_letter_log_likelihoods,
                                               split_continuation)
from moe_jax.evaluation.scoring import choice_log_likelihoods, pad_tokens
from moe_jax.models import CausalLMConfig, T5Config, build_model

VOCAB = 136  # ASCII (0..127; 0-3 are the tokenizer's special tokens) and a few merges
BOS = 1
ATOL = 1e-4  # |ours - reference| on summed log-likelihoods (float32 model, float64 reference)

# Six hand-written questions; option counts vary (2 to 5) so ragged option lists are exercised.
EXAMPLES = [
    dict(question="What is the capital of France?", options=["Berlin", "Paris", "Rome", "Madrid"], answer_index=1),
    dict(question="2 + 2 =", options=["3", "4", "5"], answer_index=1),
    dict(question="Which one is a colour?", options=["red", "dog"], answer_index=0),
    dict(question="The sun rises in the", options=["north", "south", "east", "west", "sky"], answer_index=2),
    dict(question="Water freezes at", options=["0 C", "50 C", "100 C", "-40 C"], answer_index=0),
    dict(question="Which is the largest?", options=["ant", "cat", "whale"], answer_index=2),
]


def _byte_encode(text: str) -> list[int]:
  return list(text.encode("ascii"))


def _randomise(model: torch.nn.Module) -> None:
  """Weights far from HF's near-zero init, so the letters' probabilities differ and a position error shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.3)
      elif "embed" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, p.shape[1]**-0.5)


def _char_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A BPE tokenizer over ASCII with a few merges ("th", "the", "an") that adds BOS, like Llama's: the prompt's
  tokenization is not one token per character, so the context/letter split is exercised."""
  vocab = {chr(i): i for i in range(4, 128)}
  vocab |= {"<pad>": 0, "<s>": BOS, "</s>": 2, "<unk>": 3}
  merges = [("t", "h"), ("th", "e"), ("a", "n")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  assert len(vocab) <= VOCAB
  tok = tokenizers.Tokenizer(tok_models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")


def _hf_config(style: str):
  if style == "bloom":
    return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
  return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=BOS, eos_token_id=2,
                                  pad_token_id=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple]:
  """style -> (torch model, directory with weights and tokenizer, our float32 model, params)."""
  out = {}
  for seed, style in enumerate(("llama", "bloom")):
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(_hf_config(style), attn_implementation="eager")
    _randomise(hf_model)
    hf_model.eval()
    path = tmp_path_factory.mktemp(style)
    hf_model.save_pretrained(path, safe_serialization=True)
    _char_tokenizer().save_pretrained(path)
    model, params = load_hf_causal_lm(path, config_from_hf_causal(path, dtype="float32"))
    out[style] = (hf_model, path, model, params)
  return out


def _reference(hf_model, context, letter) -> float:
  """log p(letter | context) from PyTorch, one unpadded sequence, float64 log-softmax."""
  sequence = torch.tensor([list(context) + list(letter)], dtype=torch.long)
  with torch.no_grad():
    logp = torch.log_softmax(hf_model(input_ids=sequence).logits[0].double(), dim=-1).numpy()
  return float(sum(logp[len(context) - 1 + t, token] for t, token in enumerate(letter)))


@pytest.mark.parametrize("style", ["llama", "bloom"])
@pytest.mark.parametrize("multi_token", [False, True], ids=["one_token_letters", "multi_token_letters"])
def test_matches_transformers(models, style, multi_token):
  hf_model, _, model, params = models[style]
  rng = np.random.default_rng(0)
  lengths = [7, 1, 12, 4, 9]  # 5 examples in batches of 2: the last batch is padded
  contexts = [rng.integers(4, VOCAB, n).astype(np.int32) for n in lengths]
  letter_ids = np.arange(65, 69)  # "A".."D"
  if multi_token:  # letters of 1-3 tokens: one row per (example, option)
    letters = [[np.array([t] + list(rng.integers(4, VOCAB, i % 3)), np.int32) for i, t in enumerate(letter_ids)]
               for _ in lengths]
  else:
    letters = [[np.array([t], np.int32) for t in letter_ids]] * len(lengths)
  ours = option_letter_log_likelihoods(model, params, contexts, letters, batch_size=2)
  assert ours.shape == (5, 4)
  ref = np.array([[_reference(hf_model, c, letter) for letter in options] for c, options in zip(contexts, letters)])
  err = np.max(np.abs(ours - ref))
  print(f"{style} {'multi' if multi_token else 'one'}-token letters: max |ours - torch| = {err:.1e}")
  assert err < ATOL
  assert np.ptp(ref) > 1.0  # the letters' log-likelihoods really differ, so the comparison has teeth


def test_end_to_end_accuracy_against_transformers(models):
  hf_model, _, model, params = models["llama"]
  result = option_letter_accuracy(model, params, _byte_encode, EXAMPLES, bos_id=BOS, batch_size=4)
  correct = 0
  for example, scores, prediction in zip(EXAMPLES, result["scores"], result["predictions"]):
    context = [BOS] + _byte_encode(format_prompt(example["question"], example["options"]))
    ref = [_reference(hf_model, context, [ord(letter)]) for letter in "ABCDE"[:len(example["options"])]]
    assert len(scores) == len(example["options"])
    np.testing.assert_allclose(scores, ref, rtol=0, atol=ATOL)
    assert prediction == int(np.argmax(ref))
    correct += prediction == example["answer_index"]
  print(f"llama end to end: predictions {result['predictions']}, {correct}/6 correct")
  assert result["accuracy"] == pytest.approx(100.0 * correct / len(EXAMPLES))


def test_matches_lm_eval_harness(models):
  """lm-eval's `HFLM.loglikelihood` on (prompt, letter) requests, model and tokenizer loaded from the directory."""
  pytest.importorskip("lm_eval")
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top

  _, path, model, params = models["llama"]
  harness = HFLM(pretrained=str(path), batch_size=4, device="cpu", dtype="float32")
  requests = [Instance("loglikelihood", {}, (format_prompt(e["question"], e["options"]), letter), idx=c)
              for e in EXAMPLES for c, letter in enumerate("ABCDE"[:len(e["options"])])]
  expected = [logp for logp, _ in harness.loglikelihood(requests, disable_tqdm=True)]
  tokenizer = _char_tokenizer()
  prompt = format_prompt(EXAMPLES[0]["question"], EXAMPLES[0]["options"])
  assert tokenizer.encode(prompt)[0] == BOS and 129 in tokenizer.encode(prompt)  # BOS, and "the" merged
  for bos_id in (None, BOS):  # the tokenizer adds BOS itself; bos_id=BOS must not add a second one
    ours = option_letter_accuracy(model, params, tokenizer.encode, EXAMPLES, bos_id=bos_id, batch_size=4)
    flat = [s for scores in ours["scores"] for s in scores]
    err = np.max(np.abs(np.array(flat) - np.array(expected)))
    print(f"lm_eval HFLM (bos_id={bos_id}): max |ours - harness| = {err:.1e}")
    assert err < ATOL
    start = 0
    for example, prediction in zip(EXAMPLES, ours["predictions"]):
      n = len(example["options"])
      assert prediction == int(np.argmax(expected[start:start + n]))
      start += n


# Hand-worked toy: a bigram "LM" over 3 tokens; row t is p(next token | current token t).
PROBS = np.array([[0.2, 0.5, 0.3],
                  [0.6, 0.1, 0.3],
                  [0.1, 0.1, 0.8]])


class Bigram(nn.Module):
  """Logits at each position depend only on that position's token: log PROBS[token]."""

  config: CausalLMConfig

  @nn.compact
  def __call__(self, tokens, attention_mask=None, routing_ids=None):
    table = self.param("table", lambda rng: jnp.log(jnp.asarray(PROBS, jnp.float32)))
    return table[tokens]


TOY_CONFIG = CausalLMConfig(vocab_size=3, d_model=8, num_layers=1, num_heads=2, d_ff=16, dtype="float32",
                            name="bigram")


def test_hand_worked_bigram():
  model = Bigram(TOY_CONFIG)
  params = {"table": np.log(PROBS).astype(np.float32)}
  # Context [2, 0]: the next token follows row 0 (0.2, 0.5, 0.3). Context [1]: row 1 (0.6, 0.1, 0.3).
  one = option_letter_log_likelihoods(model, params, [[2, 0], [1]], [[[0], [1], [2]], [[0], [1]]], batch_size=1)
  assert one[1, 2] == -np.inf  # the second example has two options
  np.testing.assert_allclose(one[0], np.log([0.2, 0.5, 0.3]), rtol=1e-6)
  np.testing.assert_allclose(one[1, :2], np.log([0.6, 0.1]), rtol=1e-6)
  # Two-token letter [1, 2] after [2, 0]: p(1 | 0) p(2 | 1) = 0.5 * 0.3; [2, 2]: 0.3 * 0.8.
  two = option_letter_log_likelihoods(model, params, [[2, 0]], [[[1], [1, 2], [2, 2]]])
  np.testing.assert_allclose(two, [[math.log(0.5), math.log(0.5 * 0.3), math.log(0.3 * 0.8)]], rtol=1e-6)

  # End to end: encode maps a character to ord % 3. Every prompt ends in "(" (40 % 3 = 1), so the letters follow
  # row 1: A (65 % 3 = 2) 0.3, B (66 % 3 = 0) 0.6, C (67 % 3 = 1) 0.1; B is always predicted.
  encode = lambda text: [ord(ch) % 3 for ch in text]
  examples = [dict(question="q1", options=["x", "y", "z"], answer_index=1),
              dict(question="q2", options=["x", "y"], answer_index=0),
              dict(question="q3", options=["x", "y", "z"], answer_index=1)]
  result = option_letter_accuracy(model, params, encode, examples)
  assert result["predictions"] == [1, 1, 1]
  assert result["accuracy"] == pytest.approx(200.0 / 3)
  np.testing.assert_allclose(result["scores"][0], np.log([0.3, 0.6, 0.1]), rtol=1e-6)
  np.testing.assert_allclose(result["scores"][1], np.log([0.3, 0.6]), rtol=1e-6)


def test_prompt_template_and_split():
  prompt = format_prompt(" Is it? \n", ["yes", " no "])
  assert prompt == "Q: Is it?\n(A) yes (B) no\nA: The answer is ("
  with pytest.raises(ValueError, match="3 options but only 2 letters"):
    format_prompt("q", ["a", "b", "c"], letters="AB")
  # Trailing whitespace of the context moves to the continuation, as in lm-eval.
  assert split_continuation(_byte_encode, "is ", "A") == (_byte_encode("is"), _byte_encode(" A"))
  with pytest.raises(ValueError, match="empty context"):
    option_letter_log_likelihoods(Bigram(TOY_CONFIG), {}, [[]], [[[1]]])


T5 = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
              dtype="float32", name="tiny_t5")


def test_t5_scores_letters_as_decoder_targets():
  model = build_model(T5)
  ones = np.ones((1, 4), np.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ones, ones))["params"]
  rng = np.random.default_rng(1)
  contexts = [np.append(rng.integers(2, 64, n), 1).astype(np.int32) for n in (5, 2, 9)]
  letters = [[np.array([10]), np.array([11, 12]), np.array([13])], [np.array([10]), np.array([11])],
             [np.array([14]), np.array([15]), np.array([16])]]
  ours = option_letter_log_likelihoods(model, params, contexts, letters, batch_size=2)
  direct, lengths = choice_log_likelihoods(model, params, pad_tokens(contexts, 10), letters, batch_size=2)
  assert ours.shape == (3, 3) and ours[1, 2] == -np.inf and lengths[0].tolist() == [1, 2, 1]
  np.testing.assert_allclose(ours, direct, rtol=1e-5)

  # End to end: the context gets seqio's EOS, a trailing EOS on a letter is dropped.
  encode = lambda text, eos=False: [2 + ord(ch) % 62 for ch in text] + ([1] if eos else [])
  result = option_letter_accuracy(model, params, lambda text: encode(text, eos=True), EXAMPLES[:3], batch_size=2)
  prompts = [encode(format_prompt(e["question"], e["options"])) + [1] for e in EXAMPLES[:3]]
  targets = [[np.array(encode(letter)) for letter in "ABCD"[:len(e["options"])]] for e in EXAMPLES[:3]]
  direct, _ = choice_log_likelihoods(model, params, pad_tokens(prompts, max(map(len, prompts))), targets)
  for row, expected in zip(result["scores"], direct):
    np.testing.assert_allclose(row, expected[:len(row)], rtol=1e-5)
  assert result["predictions"] == [int(np.argmax(d)) for d in direct]
