"""Routed LoRA: delta[t] = sum_s w[t, s] * (x[t] @ A[e[t, s]]) @ B[e[t, s]], several formulations of one function.

- `dense`: every expert for every token, weighted (zero weight for unchosen experts). Cost grows with E; best when
  E is small or when the router uses every expert anyway (`Routing.experts is None`).
- `sorted`: sort the (token, slot) assignments by expert, lay each expert's group out in fixed-size blocks, run one
  batched matmul over blocks with the block's expert weights gathered, then gather each assignment's row back.
  Cost grows with T*k + E*block, not T*E. Pure XLA gathers and batched dots: differentiable, shardable, any backend.
- `grid`: the same sort, with each expert's group laid out in its own row of an [E, capacity] grid, so the shrink's
  batched matmul reads A as it is (no per-block weight copies: with ~3-6 tokens per expert those copies cost more
  than the products). The capacity is picked at run time (`jax.lax.switch`) as the smallest of a few static sizes
  that holds the largest group (`grid_capacities`); a larger group falls back to `sorted`'s blocks, so no assignment
  is ever dropped. The expand is token-major (`_expand_rows`): each assignment's output row is a sum of r rows of B
  read in place and a token's k rows are added by a scatter-add, so no [E, capacity, d_out] product is padded,
  written and gathered back. Fastest on CPU, where those r rows per assignment come from cache.
- `ragged`: the same sort, with `jax.lax.ragged_dot` on the grouped rows (the grouped-matmul primitive; fast on
  TPU, a slow path on GPU in jax 0.11 and on CPU).
- `ffi`: a C++ kernel for CPU, called through XLA's FFI (`moe_jax.models.routed_cpu`, built on first use with the
  machine's compiler): it sorts by expert itself and streams each expert's A and B once per group on every thread
  of XLA's pool, with no padding and no gathered copies; float32 only (other dtypes are cast). Its backward is
  `grid`'s. 2.5-4x faster than `grid` per module on a 2-core CPU, where XLA runs the grid's batched matmul on one
  thread.
- `pallas`: the same sort into one-expert row tiles, then two Pallas kernels (Punica-style shrink and expand) that
  index A[e] and B[e] in place (`moe_jax.models.routed_pallas`); forward only. Compiled through Triton on GPU,
  through the Pallas interpreter elsewhere (for tests: slow).
- `auto`: on a CPU `ffi` for float32 inputs when its kernel builds. Otherwise `dense` when E <=
  `DENSE_MAX_EXPERTS` or when the padded sorted layout would not be much smaller than T*E rows; else `pallas` on a
  GPU (not yet timed on one: `benchmarks/routed_lora.py --preset t5xl` compares it with the others), `grid` on a
  CPU (`sorted` when even its smallest grid would pad past `GRID_MAX_PADDING` times `sorted`'s rows: a decoding
  step's few tokens), `sorted` elsewhere. `sorted`'s block follows the mean group
  (T*k/E, a power of two in [8, 64]), so that small batches and decoding steps do not pay E*64 rows of padding.

All formulations accumulate in float32 and keep the rank-r intermediate in float32 (low-precision intermediates are
a known bug class in routed LoRA code). `moe_jax.models.reference` holds the float64 oracle they are tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.routers import Routing

Array = jax.Array

IMPLS = ("auto", "dense", "sorted", "grid", "ffi", "ragged", "pallas")
DENSE_MAX_EXPERTS = 8
MIN_BLOCK, MAX_BLOCK = 8, 64
GRID_CAPACITIES = 5  # static capacities tried by `grid` before it falls back to `sorted`
GRID_MAX_PADDING = 4  # most rows a `grid` may have, in units of `sorted`'s rows for the same assignments


def sorted_block(tokens: int, k: int, num_experts: int) -> int:
  """Block size for `sorted`: the mean group size T*k/E rounded up to a power of two, within [8, 64]."""
  mean_group = max(1, -(-tokens * k // num_experts))
  return min(MAX_BLOCK, max(MIN_BLOCK, 1 << (mean_group - 1).bit_length()))


def sorted_rows(tokens: int, k: int, num_experts: int, block: int) -> int:
  """Rows of the padded sorted layout, a static bound: a group of c assignments fills ceil(c / block) blocks, and the
  sum of those is at most n // block + (number of non-empty groups)."""
  n = tokens * k
  return (n // block + min(num_experts, n)) * block


def grid_capacities(tokens: int, k: int, num_experts: int) -> tuple[int, ...]:
  """Capacities `grid` may pick: the mean group size as a power of two c >= 8, then c*3/2, 2c, 3c, 4c, ... (steps of
  1.5x, not 2x: every padded row costs a row of both products) up to `GRID_CAPACITIES` of them, stopping once one
  holds all T*k assignments or the grid would exceed `GRID_MAX_PADDING` x `sorted`'s rows (`sorted` pads less
  past that)."""
  n = tokens * k
  limit = GRID_MAX_PADDING * sorted_rows(tokens, k, num_experts, sorted_block(tokens, k, num_experts))
  caps = [max(MIN_BLOCK, 1 << (max(1, -(-n // num_experts)) - 1).bit_length())]
  while len(caps) < GRID_CAPACITIES and caps[-1] < n:
    cap = caps[-1] * 3 // 2 if len(caps) % 2 else caps[-2] * 2
    if num_experts * cap > limit:
      break
    caps.append(cap)
  return tuple(caps)


def routed_lora(x: Array, a: Array, b: Array, routing: Routing, impl: str = "auto", block: int | None = None,
                base: Array | None = None) -> Array:
  """x [..., d_in], a [E, d_in, r], b [E, r, d_out] -> float32 [..., d_out] (weights already include any scale),
  plus `base` [..., d_out] when given: the layer's own output, which `ffi` adds into in place (the others add it
  after, an add XLA fuses).

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
      impl = _auto(tokens, k, num_experts, block, float32=all(v.dtype == jnp.float32 for v in (x, a, b)))
    if impl == "dense":
      out = _dense(x2, a, b, dense_weights(experts, weights, num_experts))
    elif impl == "sorted":
      out = _sorted(x2, a, b, experts, weights, block)
    elif impl == "grid":
      out = _grid(x2, a, b, experts, weights, block)
    elif impl == "ffi":  # the CPU kernel, which adds the base output itself
      from moe_jax.models import routed_cpu  # pylint: disable=g-import-not-at-top
      base2 = None if base is None else base.reshape(-1, b.shape[-1])
      return routed_cpu.routed_lora_cpu(x2, a, b, experts, weights, block, base2).reshape(lead + (b.shape[-1],))
    elif impl == "pallas":  # the GPU kernel; elsewhere the same kernels through the Pallas interpreter (slow)
      from moe_jax.models import routed_pallas  # pylint: disable=g-import-not-at-top
      out = routed_pallas.routed_lora_pallas(x2, a, b, experts, weights, interpret=not routed_pallas.available())
    else:
      out = _ragged(x2, a, b, experts, weights)
  out = out.reshape(lead + (b.shape[-1],))
  return out if base is None else base.astype(jnp.float32) + out


def _auto(tokens: int, k: int, num_experts: int, block: int, float32: bool = True) -> str:
  """On a CPU the C++ kernel for float32 inputs (`float32`) when it builds: it pads nothing and beat every other
  formulation, `dense` at E=8 included (`benchmarks/routed_lora.py --preset cpu`). Otherwise: dense computes T*E
  expert rows with plain matmuls, the others padded rows with gathers around them; on a GPU the Pallas kernels; on a
  CPU `grid` unless its smallest grid pads past `GRID_MAX_PADDING` x `sorted`'s rows (few tokens: a decoding step),
  where `sorted` reads only the experts in use."""
  backend = jax.default_backend()
  if backend == "cpu" and float32:
    from moe_jax.models import routed_cpu  # pylint: disable=g-import-not-at-top
    if routed_cpu.available():
      return "ffi"
  rows = sorted_rows(tokens, k, num_experts, block)
  if num_experts <= DENSE_MAX_EXPERTS or 4 * rows > tokens * num_experts:
    return "dense"
  if backend == "gpu":
    from moe_jax.models import routed_pallas  # pylint: disable=g-import-not-at-top  (Pallas only where it runs)
    if routed_pallas.available():
      return "pallas"
  if backend == "cpu" and num_experts * grid_capacities(tokens, k, num_experts)[0] <= GRID_MAX_PADDING * rows:
    return "grid"
  return "sorted"


def dense_weights(experts: Array, weights: Array, num_experts: int) -> Array:
  """[T, k] expert ids and weights -> [T, E] weights (a repeated expert adds up)."""
  return jnp.einsum("tke,tk->te", jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), weights)


def _dense(x: Array, a: Array, b: Array, w: Array) -> Array:
  h = jnp.einsum("td,edr->ter", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
  h = h * w[:, :, None]
  return jnp.einsum("ter,ero->to", h, b.astype(jnp.float32), preferred_element_type=jnp.float32)


def sort_assignments(experts: Array, num_experts: int):
  """Order of the flattened assignments by expert (stable), group sizes and group starts."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts)
  starts = jnp.cumsum(counts) - counts
  return flat, order, counts, starts


def sorted_layout(flat: Array, order: Array, counts: Array, starts: Array, num_experts: int, block: int):
  """Blocks of `block` rows, each holding one expert's assignments in sorted order, in a static number of blocks
  (`sorted_rows`; shared with the Pallas kernels' tiles).

  Returns each block's expert, each row's assignment (index into `flat`; 0 on empty rows), each row's validity, and
  each assignment's row."""
  n = flat.shape[0]
  blocks_per_expert = (counts + block - 1) // block
  block_end = jnp.cumsum(blocks_per_expert)
  first_block = block_end - blocks_per_expert
  num_blocks = sorted_rows(n, 1, num_experts, block) // block
  block_expert = jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right")
  block_valid = block_expert < num_experts
  block_expert = jnp.minimum(block_expert, num_experts - 1)
  row_expert = jnp.repeat(block_expert, block)
  rank = jnp.arange(num_blocks * block) - first_block[row_expert] * block
  row_valid = jnp.repeat(block_valid, block) & (rank < counts[row_expert])
  assignment = order[jnp.where(row_valid, starts[row_expert] + rank, 0)]
  row = first_block[flat] * block + _group_ranks(order, starts, flat)
  return block_expert, assignment, row_valid, row


def _group_ranks(order: Array, starts: Array, flat: Array) -> Array:
  """Position of each assignment inside its expert's group (stable: in token order)."""
  n = flat.shape[0]
  sorted_pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return sorted_pos - starts[flat]


def _sorted(x: Array, a: Array, b: Array, experts: Array, weights: Array, block: int) -> Array:
  tokens, k = experts.shape
  num_experts = a.shape[0]
  flat, order, counts, starts = sort_assignments(experts, num_experts)
  block_expert, assignment, row_valid, row = sorted_layout(flat, order, counts, starts, num_experts, block)
  row_weight = jnp.where(row_valid, weights.reshape(-1)[assignment], 0.0).astype(jnp.float32)
  h = _block_shrink(x, a, block_expert, assignment, k) * row_weight.reshape(block_expert.shape[0], block, 1)
  ys = jnp.einsum("nbr,nro->nbo", h, b[block_expert].astype(jnp.float32), preferred_element_type=jnp.float32)
  return _sum_slots(ys.reshape(row_weight.shape[0], -1), row.reshape(tokens, k))


def _block_shrink(x: Array, a: Array, block_expert: Array, assignment: Array, k: int) -> Array:
  """[blocks, block, r]: each block's token rows of x times its expert's A, gathered per block."""
  xs = x[assignment // k].reshape(block_expert.shape[0], -1, x.shape[-1])
  return jnp.einsum("nbd,ndr->nbr", xs, a[block_expert].astype(x.dtype), preferred_element_type=jnp.float32)


def _grid(x: Array, a: Array, b: Array, experts: Array, weights: Array, block: int) -> Array:
  """`grid`: h = x A[e] of every assignment from the grid of the smallest capacity that holds the largest group
  (else from `sorted`'s blocks of `block` rows), then `_expand_rows`."""
  tokens, k = experts.shape
  num_experts = a.shape[0]
  caps = grid_capacities(tokens, k, num_experts)
  flat, order, counts, starts = sort_assignments(experts, num_experts)
  grouped = (flat, order, counts, starts)
  branch = jnp.sum(jnp.max(counts) > jnp.asarray(caps))
  branches = [functools.partial(_grid_shrink, cap=cap, k=k) for cap in caps]
  branches.append(functools.partial(_sorted_shrink, block=block, k=k))
  h = jax.lax.switch(branch, branches, x, a, grouped)
  return _expand_rows(h * weights.reshape(-1, 1).astype(jnp.float32), b, flat, k)


def _grid_shrink(x: Array, a: Array, grouped, cap: int, k: int) -> Array:
  """[n, r] x[token] @ A[e] per assignment, computed on a grid whose row e*cap + i holds expert e's i-th
  assignment (empty rows: token 0), so the batched matmul reads A as it is."""
  flat, order, _, starts = grouped
  n = flat.shape[0]
  num_experts = a.shape[0]
  row = flat * cap + _group_ranks(order, starts, flat)
  assignment = jnp.full((num_experts * cap,), n, jnp.int32).at[row].set(jnp.arange(n, dtype=jnp.int32))
  xs = x[jnp.where(assignment < n, assignment // k, 0)].reshape(num_experts, cap, -1)
  h = jnp.einsum("ecd,edr->ecr", xs, a.astype(x.dtype), preferred_element_type=jnp.float32)
  return h.reshape(num_experts * cap, -1)[row]


def _sorted_shrink(x: Array, a: Array, grouped, block: int, k: int) -> Array:
  """[n, r] x[token] @ A[e] per assignment from `sorted`'s blocks (each with its expert's A gathered)."""
  flat, order, counts, starts = grouped
  block_expert, assignment, _, row = sorted_layout(flat, order, counts, starts, a.shape[0], block)
  h = _block_shrink(x, a, block_expert, assignment, k)
  return h.reshape(-1, h.shape[-1])[row]


def _expand_rows(h: Array, b: Array, flat: Array, k: int) -> Array:
  """out[t] = sum over t's k assignments of h[n] @ B[e[n]], token-major: each assignment's row is a sum of r rows of
  B (gathered in place, one loop fusion: no [E, capacity, d_out] products, no per-expert padding), and the k rows of a
  token are added by a scatter-add. The scatter also makes XLA:CPU compute the rows in row-major order: fused
  straight into a consumer that transposes (attention's q/k/v), the gathers of B ran column-wise, 2x slower."""
  num_experts, rank, d_out = b.shape
  n = flat.shape[0]
  rows_of_b = b.reshape(num_experts * rank, d_out).astype(jnp.float32)
  rows = h[:, 0, None] * rows_of_b[flat * rank]
  for i in range(1, rank):
    rows = rows + h[:, i, None] * rows_of_b[flat * rank + i]
  token = jnp.arange(n, dtype=jnp.int32) // k
  return jnp.zeros((n // k, d_out), jnp.float32).at[token].add(rows, indices_are_sorted=True)


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
  flat, order, counts, _ = sort_assignments(experts, num_experts)
  xs = x[order // k]
  h = jax.lax.ragged_dot(xs, a.astype(x.dtype), counts, preferred_element_type=jnp.float32)
  h = h * weights.reshape(-1)[order][:, None].astype(jnp.float32)
  ys = jax.lax.ragged_dot(h, b.astype(jnp.float32), counts, preferred_element_type=jnp.float32)
  out = jnp.zeros((tokens * k, ys.shape[-1]), jnp.float32).at[order].set(ys)
  return out.reshape(tokens, k, -1).sum(axis=1)
