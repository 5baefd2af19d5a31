"""Routed LoRA: delta[t] = sum_s w[t, s] * (x[t] @ A[e[t, s]]) @ B[e[t, s]], several formulations of one function.

- `dense`: every expert for every token, weighted (zero weight for unchosen experts). Cost grows with E; best when
  E is small or when the router uses every expert anyway (`Routing.experts is None`).
- `sorted`: sort the (token, slot) assignments by expert, lay each expert's group out in fixed-size blocks, run one
  batched matmul over blocks with the block's expert weights gathered, then gather each assignment's row back.
  Cost grows with T*k + E*block, not T*E. Pure XLA gathers and batched dots: differentiable, shardable, any backend.
- `ragged`: the same sort, with `jax.lax.ragged_dot` on the grouped rows (the grouped-matmul primitive; fast on
  TPU, a slow path on GPU in jax 0.11).
- `auto`: `dense` when E <= `DENSE_MAX_EXPERTS` or when the padded sorted layout would not be much smaller than
  T*E rows, else `sorted` with a block sized to the mean group (T*k/E, a power of two in [8, 64]), so that small
  batches and decoding steps do not pay E*64 rows of padding.

All formulations accumulate in float32 and keep the rank-r intermediate in float32 (low-precision intermediates are
a known bug class in routed LoRA code). `moe_jax.models.reference` holds the float64 oracle they are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.routers import Routing

Array = jax.Array

IMPLS = ("auto", "dense", "sorted", "ragged")
DENSE_MAX_EXPERTS = 8
MIN_BLOCK, MAX_BLOCK = 8, 64


def sorted_block(tokens: int, k: int, num_experts: int) -> int:
  """Block size for `sorted`: the mean group size T*k/E rounded up to a power of two, within [8, 64]."""
  mean_group = max(1, -(-tokens * k // num_experts))
  return min(MAX_BLOCK, max(MIN_BLOCK, 1 << (mean_group - 1).bit_length()))


def sorted_rows(tokens: int, k: int, num_experts: int, block: int) -> int:
  """Rows of the padded sorted layout (a static bound; see `_sorted`)."""
  n = tokens * k
  return (n // block + min(num_experts, n)) * block


def routed_lora(x: Array, a: Array, b: Array, routing: Routing, impl: str = "auto", block: int | None = None) -> Array:
  """x [..., d_in], a [E, d_in, r], b [E, r, d_out] -> float32 [..., d_out] (weights already include any scale).

  `block` sets the `sorted` block size (default: `sorted_block`)."""
  if impl not in IMPLS:
    raise ConfigError(f"routed LoRA impl={impl!r}; expected one of {IMPLS}")
  num_experts = a.shape[0]
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if routing.experts is None:
    out = _dense(x2, a, b, routing.weights.reshape(-1, num_experts))
  else:
    experts = routing.experts.reshape(-1, routing.experts.shape[-1])
    weights = routing.weights.reshape(experts.shape)
    tokens, k = experts.shape
    block = block or sorted_block(tokens, k, num_experts)
    if impl == "auto":
      # Dense computes T*E expert rows with plain matmuls; sorted computes its padded rows with gathers around them.
      small = num_experts <= DENSE_MAX_EXPERTS or 4 * sorted_rows(tokens, k, num_experts, block) > tokens * num_experts
      impl = "dense" if small else "sorted"
    if impl == "dense":
      out = _dense(x2, a, b, dense_weights(experts, weights, num_experts))
    elif impl == "sorted":
      out = _sorted(x2, a, b, experts, weights, block)
    else:
      out = _ragged(x2, a, b, experts, weights)
  return out.reshape(lead + (b.shape[-1],))


def dense_weights(experts: Array, weights: Array, num_experts: int) -> Array:
  """[T, k] expert ids and weights -> [T, E] weights (a repeated expert adds up)."""
  return jnp.einsum("tke,tk->te", jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), weights)


def _dense(x: Array, a: Array, b: Array, w: Array) -> Array:
  h = jnp.einsum("td,edr->ter", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
  h = h * w[:, :, None]
  return jnp.einsum("ter,ero->to", h, b.astype(jnp.float32), preferred_element_type=jnp.float32)


def _sort_assignments(experts: Array, num_experts: int):
  """Order of the flattened assignments by expert (stable), group sizes and group starts."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts)
  starts = jnp.cumsum(counts) - counts
  return flat, order, counts, starts


def _sorted(x: Array, a: Array, b: Array, experts: Array, weights: Array, block: int) -> Array:
  tokens, k = experts.shape
  num_experts = a.shape[0]
  n = tokens * k
  flat, order, counts, starts = _sort_assignments(experts, num_experts)
  blocks_per_expert = (counts + block - 1) // block
  block_end = jnp.cumsum(blocks_per_expert)
  first_block = block_end - blocks_per_expert
  # Sum over groups of ceil(c/block) <= n // block + (number of non-empty groups): a static bound.
  num_blocks = sorted_rows(tokens, k, num_experts, block) // block
  block_expert = jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right")
  block_valid = block_expert < num_experts
  block_expert = jnp.minimum(block_expert, num_experts - 1)

  slot_expert = jnp.repeat(block_expert, block)
  rank = jnp.arange(num_blocks * block) - first_block[slot_expert] * block
  slot_valid = jnp.repeat(block_valid, block) & (rank < counts[slot_expert])
  assignment = order[jnp.where(slot_valid, starts[slot_expert] + rank, 0)]
  slot_weight = jnp.where(slot_valid, weights.reshape(-1)[assignment], 0.0).astype(jnp.float32)

  xs = x[assignment // k].reshape(num_blocks, block, -1)
  h = jnp.einsum("nbd,ndr->nbr", xs, a[block_expert].astype(x.dtype), preferred_element_type=jnp.float32)
  h = h * slot_weight.reshape(num_blocks, block, 1)
  ys = jnp.einsum("nbr,nro->nbo", h, b[block_expert].astype(jnp.float32), preferred_element_type=jnp.float32)

  # Slot of each assignment: its expert's first block, plus its rank inside the expert's group.
  sorted_pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  slot = first_block[flat] * block + sorted_pos - starts[flat]
  return ys.reshape(num_blocks * block, -1)[slot].reshape(tokens, k, -1).sum(axis=1)


def _ragged(x: Array, a: Array, b: Array, experts: Array, weights: Array) -> Array:
  tokens, k = experts.shape
  num_experts = a.shape[0]
  flat, order, counts, _ = _sort_assignments(experts, num_experts)
  xs = x[order // k]
  h = jax.lax.ragged_dot(xs, a.astype(x.dtype), counts, preferred_element_type=jnp.float32)
  h = h * weights.reshape(-1)[order][:, None].astype(jnp.float32)
  ys = jax.lax.ragged_dot(h, b.astype(jnp.float32), counts, preferred_element_type=jnp.float32)
  out = jnp.zeros((tokens * k, ys.shape[-1]), jnp.float32).at[order].set(ys)
  return out.reshape(tokens, k, -1).sum(axis=1)
