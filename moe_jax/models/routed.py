"""Routed LoRA: delta[t] = sum_s w[t, s] * (x[t] @ A[e[t, s]]) @ B[e[t, s]], several formulations of one function.

- `dense`: every expert for every token, weighted (zero weight for unchosen experts). Cost grows with E; best when
  E is small or when the router uses every expert anyway (`Routing.experts is None`).
- `sorted`: sort the (token, slot) assignments by expert, lay each expert's group out in fixed-size blocks, run one
  batched matmul over blocks with the block's expert weights gathered, then gather each assignment's row back.
  Cost grows with T*k + E*block, not T*E. Pure XLA gathers and batched dots: differentiable, shardable, any backend.
- `grid`: the same sort, with each expert's group laid out in its own row of an [E, capacity] grid, so the batched
  matmuls read A and B as they are (no per-block weight copies: with ~3 tokens per expert those copies cost more
  than the products). The capacity is picked at run time (`jax.lax.switch`) as the smallest of a few static sizes
  that holds the largest group (`grid_capacities`); a larger group falls back to `sorted`, so no assignment
  is ever dropped and the padding stays within a few times `sorted`'s.
- `ragged`: the same sort, with `jax.lax.ragged_dot` on the grouped rows (the grouped-matmul primitive; fast on
  TPU, a slow path on GPU in jax 0.11 and on CPU).
- `pallas`: the same sort into one-expert row tiles, then two Pallas kernels (Punica-style shrink and expand) that
  index A[e] and B[e] in place (`moe_jax.models.routed_pallas`); forward only. Compiled through Triton on GPU,
  through the Pallas interpreter elsewhere (for tests: slow).
- `auto`: `dense` when E <= `DENSE_MAX_EXPERTS` or when the padded sorted layout would not be much smaller than
  T*E rows, else `pallas` on a GPU (not yet timed on one: `benchmarks/routed_lora.py --preset t5xl` compares it
  with the others) and `sorted` elsewhere. `sorted`'s block follows the mean group (T*k/E, a power of two in
  [8, 64]), so that small batches and decoding steps do not pay E*64 rows of padding. `grid` beat `sorted` on CPU
  in the benchmark (1.3-2x on the routed part at E=166) but is not `auto`'s choice there yet: with it as `auto`
  (and the Pallas modules imported by every process), two whole-suite runs crashed inside XLA:CPU's compiler
  (abort, then segfault) while compiling a routed T5 pipeline that compiles fine alone. Until the cause is
  isolated, `auto` keeps `sorted`, Pallas is imported only where it runs, and `grid` is asked for by name
  (`ExpertConfig.impl = 'grid'`).

All formulations accumulate in float32 and keep the rank-r intermediate in float32 (low-precision intermediates are
a known bug class in routed LoRA code). `moe_jax.models.reference` holds the float64 oracle they are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.routers import Routing

Array = jax.Array

IMPLS = ("auto", "dense", "sorted", "grid", "ragged", "pallas")
DENSE_MAX_EXPERTS = 8
MIN_BLOCK, MAX_BLOCK = 8, 64
GRID_CAPACITIES = 5  # static capacities tried by `grid` before it falls back to `sorted`


def sorted_block(tokens: int, k: int, num_experts: int) -> int:
  """Block size for `sorted`: the mean group size T*k/E rounded up to a power of two, within [8, 64]."""
  mean_group = max(1, -(-tokens * k // num_experts))
  return min(MAX_BLOCK, max(MIN_BLOCK, 1 << (mean_group - 1).bit_length()))


def sorted_rows(tokens: int, k: int, num_experts: int, block: int) -> int:
  """Rows of the padded sorted layout (a static bound; see `_sorted`)."""
  n = tokens * k
  return (n // block + min(num_experts, n)) * block


def grid_capacities(tokens: int, k: int, num_experts: int) -> tuple[int, ...]:
  """Capacities `grid` may pick: the mean group size as a power of two c >= 8, then c*3/2, 2c, 3c, 4c, ... (steps of
  1.5x, not 2x: every padded row costs a row of both products) up to `GRID_CAPACITIES` of them, stopping once one
  holds all T*k assignments or the grid would exceed 4x `sorted`'s rows (`sorted` pads less past that)."""
  n = tokens * k
  limit = 4 * sorted_rows(tokens, k, num_experts, sorted_block(tokens, k, num_experts))
  caps = [max(MIN_BLOCK, 1 << (max(1, -(-n // num_experts)) - 1).bit_length())]
  while len(caps) < GRID_CAPACITIES and caps[-1] < n:
    cap = caps[-1] * 3 // 2 if len(caps) % 2 else caps[-2] * 2
    if num_experts * cap > limit:
      break
    caps.append(cap)
  return tuple(caps)


def routed_lora(x: Array, a: Array, b: Array, routing: Routing, impl: str = "auto", block: int | None = None) -> Array:
  """x [..., d_in], a [E, d_in, r], b [E, r, d_out] -> float32 [..., d_out] (weights already include any scale).

  `block` sets the `sorted` block size, also used by `grid` when it falls back to `sorted` (default:
  `sorted_block`)."""
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
      impl = _auto(tokens, k, num_experts, block)
    if impl == "dense":
      out = _dense(x2, a, b, dense_weights(experts, weights, num_experts))
    elif impl == "sorted":
      out = _sorted(x2, a, b, experts, weights, block)
    elif impl == "grid":
      out = _grid(x2, a, b, experts, weights, block)
    elif impl == "pallas":  # the GPU kernel; elsewhere the same kernels through the Pallas interpreter (slow)
      from moe_jax.models import routed_pallas  # pylint: disable=g-import-not-at-top
      out = routed_pallas.routed_lora_pallas(x2, a, b, experts, weights, interpret=not routed_pallas.available())
    else:
      out = _ragged(x2, a, b, experts, weights)
  return out.reshape(lead + (b.shape[-1],))


def _auto(tokens: int, k: int, num_experts: int, block: int) -> str:
  """Dense computes T*E expert rows with plain matmuls; sorted computes its padded rows with gathers around them.
  On a GPU the Pallas kernels replace sorted. `grid` is faster than sorted on CPU in the benchmark but is not
  chosen: see the module docstring."""
  small = num_experts <= DENSE_MAX_EXPERTS or 4 * sorted_rows(tokens, k, num_experts, block) > tokens * num_experts
  if small:
    return "dense"
  if jax.default_backend() == "gpu":
    from moe_jax.models import routed_pallas  # pylint: disable=g-import-not-at-top  (Pallas only where it runs)
    if routed_pallas.available():
      return "pallas"
  return "sorted"


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
  return _sum_slots(ys.reshape(num_blocks * block, -1), slot.reshape(tokens, k))


def _grid(x: Array, a: Array, b: Array, experts: Array, weights: Array, block: int) -> Array:
  """`grid`: the smallest capacity that holds the largest group, else `sorted` (with `block`)."""
  tokens, k = experts.shape
  num_experts = a.shape[0]
  caps = grid_capacities(tokens, k, num_experts)
  flat, order, counts, starts = _sort_assignments(experts, num_experts)
  branch = jnp.sum(jnp.max(counts) > jnp.asarray(caps))
  grouped = (flat, order, starts)
  branches = [lambda *args, cap=cap: _grid_fixed(*args, grouped, cap) for cap in caps]
  branches.append(lambda *args: _sorted(*args, block))
  return jax.lax.switch(branch, branches, x, a, b, experts, weights)


def _grid_fixed(x: Array, a: Array, b: Array, experts: Array, weights: Array, grouped, cap: int) -> Array:
  """Row e*cap + i of the grid holds expert e's i-th assignment (empty rows: token 0, weight 0)."""
  tokens, k = experts.shape
  num_experts = a.shape[0]
  n = tokens * k
  flat, order, starts = grouped
  sorted_pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  slot = flat * cap + sorted_pos - starts[flat]
  assignment = jnp.full((num_experts * cap,), n, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32))
  valid = assignment < n
  slot_weight = jnp.where(valid, weights.reshape(-1).astype(jnp.float32)[jnp.minimum(assignment, n - 1)], 0.0)
  xs = x[jnp.where(valid, assignment // k, 0)].reshape(num_experts, cap, -1)
  h = jnp.einsum("ecd,edr->ecr", xs, a.astype(x.dtype), preferred_element_type=jnp.float32)
  h = h * slot_weight.reshape(num_experts, cap, 1)
  ys = jnp.einsum("ecr,ero->eco", h, b.astype(jnp.float32), preferred_element_type=jnp.float32)
  return _sum_slots(ys.reshape(num_experts * cap, -1), slot.reshape(tokens, k))


def _sum_slots(rows: Array, slot: Array) -> Array:
  """out[t] = sum_s rows[slot[t, s]], as k gathers added in one loop fusion: on CPU, a reduce over the k axis of
  the gathered [T, k, d_out] was a separate pass as slow as the module's batched matmuls."""
  out = rows[slot[:, 0]]
  for s in range(1, slot.shape[1]):
    out = out + rows[slot[:, s]]
  return out


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
