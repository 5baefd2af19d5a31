"""Rank-classification scores and greedy decoding, in JAX and NumPy only (no TensorFlow).

Work runs in fixed-shape batches (the last one padded with dummy rows), so a task compiles once per shape; the
jitted functions take the model as a static argument, so equal models share compilations across calls. Under
`partitioning.activate` every batch goes onto the mesh with the same row split, so that holds on a mesh too (the
parameters are expected placed already, `partitioning.place`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.training import partitioning as part

EOS_ID = 1
PAD_ID = 0  # also T5's decoder start token


def pad_tokens(sequences: Sequence[np.ndarray], length: int) -> np.ndarray:
  """Right-pad 1-D token arrays with 0 into [N, length] int32; a longer sequence is an error, not a truncation."""
  out = np.zeros((len(sequences), length), np.int32)
  for i, seq in enumerate(sequences):
    if len(seq) > length:
      raise ValueError(f"Sequence {i} has {len(seq)} tokens, more than the padded length {length}")
    out[i, :len(seq)] = seq
  return out


def batch_rows(batch_size: int) -> int:
  """The rows of each batch `fixed_batches` makes: `batch_size`, rounded up under `partitioning.activate` to a
  multiple of the row blocks the `batch` rule splits a batch into."""
  context = part.active()
  shards = 1 if context is None else part.batch_shards(*context)
  return -(-batch_size // shards) * shards


def fixed_batches(n: int, batch_size: int, *arrays: np.ndarray | None):
  """Yield (start, count, batch arrays) with every batch padded to `batch_rows(batch_size)` rows, on the active
  mesh if any.

  Padding rows repeat row 0, so they are valid inputs (an all-padding encoder input would attend to nothing).
  Under `partitioning.activate` the rows are split per the `batch` rule, the same way for every batch, so a
  jitted call on them compiles once per batch shape.
  """
  batch_size = batch_rows(batch_size)
  for start in range(0, n, batch_size):
    count = min(batch_size, n - start)
    index = np.concatenate([np.arange(start, start + count), np.zeros(batch_size - count, np.int64)])
    yield start, count, part.place_batch([None if a is None else a[index] for a in arrays])


@functools.partial(jax.jit, static_argnums=0)
def _choice_scores(model: nn.Module, params: Any, inputs: jax.Array, targets: jax.Array,
                   routing_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """inputs [B, Li], targets [B, C, Lt] -> summed log p(target | input) [B, C] and target token counts [B, C]."""
  b, c, lt = targets.shape
  variables = {"params": params}
  encoded = model.apply(variables, inputs, True, routing_ids, method="encode")
  repeat = lambda x: None if x is None else jnp.repeat(x, c, axis=0)
  flat = targets.reshape(b * c, lt)
  decoder_inputs = jnp.pad(flat[:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)  # shift right after the start
  logits = model.apply(variables, repeat(encoded), repeat(inputs), decoder_inputs, True, repeat(routing_ids),
                       method="decode").astype(jnp.float32)
  # log_softmax at the target only: avoids materialising a second [B*C, Lt, V] array.
  token_logp = (jnp.take_along_axis(logits, flat[..., None], axis=-1)[..., 0]
                - jax.nn.logsumexp(logits, axis=-1))
  mask = flat != PAD_ID
  scores = jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1)
  return scores.reshape(b, c), mask.sum(axis=-1).reshape(b, c).astype(jnp.int32)


def choice_log_likelihoods(model: nn.Module, params: Any, inputs: np.ndarray,
                           choices: np.ndarray | Sequence[Sequence[np.ndarray]], *, batch_size: int = 32,
                           target_length: int | None = None,
                           routing_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Summed log-likelihood of every answer choice given its example's input, and the choice's token count.

  `inputs` [N, Li] int32, 0-padded. `choices`: [N, C, Lt] int32 (0-padded, each choice ending in EOS), or ragged:
  N lists of 1-D token arrays, padded here to `target_length` (default: the longest), C may vary per example.
  Each input is encoded once and all its choices are decoded against it; `batch_size` counts examples.
  Returns scores [N, C] float32 (-inf for a choice a ragged example lacks) and lengths [N, C] int32 (0 there).
  """
  inputs = np.asarray(inputs, np.int32)
  if isinstance(choices, np.ndarray):
    targets = choices.astype(np.int32)
  else:
    num_choices = max(len(c) for c in choices)
    length = target_length or max(len(t) for c in choices for t in c)
    empty = np.zeros(0, np.int32)
    targets = np.stack([pad_tokens(list(c) + [empty] * (num_choices - len(c)), length) for c in choices])
  if len(targets) != len(inputs):
    raise ValueError(f"{len(inputs)} inputs but choices for {len(targets)} examples")
  rid = None if routing_ids is None else np.asarray(routing_ids, np.int32)
  scores = np.zeros(targets.shape[:2], np.float32)
  lengths = np.zeros(targets.shape[:2], np.int32)
  for start, count, (x, t, r) in fixed_batches(len(inputs), batch_size, inputs, targets, rid):
    s, n = part.to_host(_choice_scores(model, params, x, t, r))
    scores[start:start + count], lengths[start:start + count] = s[:count], n[:count]
  return np.where(lengths > 0, scores, -np.inf).astype(np.float32), lengths


def rank_classify(scores: np.ndarray, lengths: np.ndarray, length_normalize: bool) -> np.ndarray:
  """Index of the best choice per example [N]: highest summed (or per-token, if `length_normalize`) log-likelihood.

  Ties go to the first choice, as in t5's `rank_classification`.
  """
  scores = np.asarray(scores, np.float64)
  if length_normalize:
    scores = np.where(lengths > 0, scores / np.maximum(lengths, 1), -np.inf)
  return np.argmax(scores, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(model: nn.Module, params: Any, inputs: jax.Array, max_length: int,
            routing_ids: jax.Array | None) -> jax.Array:
  variables = {"params": params}
  batch = inputs.shape[0]
  encoded = model.apply(variables, inputs, True, routing_ids, method="encode")

  def step(state):
    i, tokens, done = state
    decoder_inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)
    logits = model.apply(variables, encoded, inputs, decoder_inputs, True, routing_ids, method="decode")
    token = jnp.where(done, PAD_ID, jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))
    return i + 1, tokens.at[:, i].set(token), done | (token == EOS_ID)

  state = (jnp.int32(0), jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), bool))
  return jax.lax.while_loop(lambda s: (s[0] < max_length) & ~jnp.all(s[2]), step, state)[1]


def greedy_generate(model: nn.Module, params: Any, inputs: np.ndarray, max_length: int,
                    routing_ids: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
  """Greedy decoding: [N, max_length] int32 tokens per input, EOS (1) included, 0 after it.

  The encoder runs once per batch. There is no KV cache yet: every step re-runs the decoder over the whole
  fixed-length token buffer (causal masking hides the positions not yet written), O(max_length^2) decoder work,
  which suits short targets (classification labels, the synthetic tasks); long generations want a cached decoder.
  The loop stops once every sequence in the batch has emitted EOS.
  """
  inputs = np.asarray(inputs, np.int32)
  rid = None if routing_ids is None else np.asarray(routing_ids, np.int32)
  out = np.zeros((len(inputs), max_length), np.int32)
  for start, count, (x, r) in fixed_batches(len(inputs), batch_size, inputs, rid):
    out[start:start + count] = part.to_host(_greedy(model, params, x, max_length, r))[:count]
  return out
