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
import numpy as np

from moe_jax.models import decoding
from moe_jax.models import interface
from moe_jax.training import partitioning as part

EOS_ID = 1


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


_choice_scores = jax.jit(interface.choice_scores, static_argnums=0)


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
  step_fn, cache, prompt, mask = interface.generation_start(model, params, inputs, max_length, routing_ids)
  return decoding.generate(step_fn, cache, prompt, mask, max_length, EOS_ID)


def greedy_generate(model: nn.Module, params: Any, inputs: np.ndarray, max_length: int,
                    routing_ids: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
  """Greedy decoding: [N, max_length] int32 tokens per input, EOS (1) included, 0 after it.

  The encoder runs once per batch, and so do the cross-attention keys/values; the decoder keeps a key/value cache
  (`Transformer.decode_step` through `decoding.generate`), so each step runs the decoder on one token, O(max_length)
  attention work per step. The loop stops once every sequence in the batch has emitted EOS.
  """
  inputs = np.asarray(inputs, np.int32)
  rid = None if routing_ids is None else np.asarray(routing_ids, np.int32)
  out = np.zeros((len(inputs), max_length), np.int32)
  for start, count, (x, r) in fixed_batches(len(inputs), batch_size, inputs, rid):
    out[start:start + count] = part.to_host(_greedy(model, params, x, max_length, r))[:count]
  return out
