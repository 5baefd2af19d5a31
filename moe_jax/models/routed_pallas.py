"""Routed LoRA forward as two Pallas kernels (Triton lowering on GPU): delta[t] = sum_s w[t, s] * x[t] A[e] B[e].

The layout follows the segmented-gather matmul of Punica / S-LoRA: sort the T*k (token, slot) assignments by expert
and cut each expert's group into fixed-size row tiles (the last tile of a group padded), so that every tile uses one
expert. Then
- `shrink`: per tile, gather its token rows of x and multiply by A[e] of the tile's expert, looping over d_in in
  blocks with a float32 accumulator; the rank-r result is scaled by each row's routing weight and kept in float32
  (a low-precision intermediate is a known bug class in routed LoRA code);
- `expand`: per tile and d_out block, the float32 [tile, r] rows times B[e] (in float32), float32 accumulation.
The tile's expert id is read inside the kernel and indexes A and B dynamically: the Triton lowering has no scalar
prefetch, so a BlockSpec index_map cannot depend on data. Nothing gathers A[e] or B[e] per tile into HBM, which is
what the XLA `sorted` formulation pays for. Tiles past the last group are skipped. Each assignment's output row is
gathered back and the k slots are summed in XLA, which is deterministic (no scatter-add of duplicate tokens).

Forward only, with no custom VJP: training tunes one expert or one gate at a time (plain LoRA, no grouped backward),
and routed inference needs no gradient. Triton wants power-of-two block sizes of at least 16 for its dots, so r is
padded to a power of two >= 16 and d_in, d_out to a multiple of their block (a no-op for the usual model widths).
`interpret=True` runs the same kernels through the Pallas interpreter on any backend; the tests compare it with the
float64 oracle in `moe_jax.models.reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moe_jax.errors import ConfigError
from moe_jax.models import routed

try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # A jax build without the Triton dialect: only `interpret=True` can run.
  pltriton = None

Array = jax.Array

MIN_BLOCK = 16  # Triton's dot needs every operand dimension >= 16.


def available() -> bool:
  """Whether the compiled kernels can run here: a GPU backend and the Pallas Triton lowering."""
  return pltriton is not None and jax.default_backend() == "gpu"


def _power_of_two(size: int) -> int:
  """The smallest power of two >= max(size, MIN_BLOCK)."""
  return 1 << (max(size, MIN_BLOCK) - 1).bit_length()


def _feature_block(size: int, block: int) -> int:
  """The block for a feature dimension: `block`, or the dimension's power of two when that is smaller."""
  return min(block, _power_of_two(size))


def _pad_to(x: Array, axis: int, size: int) -> Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _tile_layout(experts: Array, weights: Array, num_experts: int, block_tokens: int):
  """`routed.sorted_layout`'s blocks as tiles: the expert of each tile (-1 past the last group), the token and
  routing weight of each row (weight 0 on padding rows), and the row holding each assignment."""
  k = experts.shape[1]
  flat, order, counts, starts = routed.sort_assignments(experts.astype(jnp.int32), num_experts)
  tile_expert, assignment, row_valid, assignment_row = routed.sorted_layout(flat, order, counts, starts, num_experts,
                                                                            block_tokens)
  tile_valid = row_valid.reshape(-1, block_tokens)[:, 0]  # a tile in use has its first row filled
  tile_expert = jnp.where(tile_valid, tile_expert, -1).astype(jnp.int32)
  row_token = (assignment // k).astype(jnp.int32)
  row_weight = jnp.where(row_valid, weights.reshape(-1)[assignment].astype(jnp.float32), 0.0)
  return tile_expert, row_token, row_weight, assignment_row


def _shrink_kernel(expert_ref, token_ref, weight_ref, x_ref, a_ref, h_ref, *, block_d: int):
  """h[tile] = w[:, None] * (x[tokens] @ A[e]) in float32, over d_in in blocks of `block_d`."""
  e = expert_ref[0]

  @pl.when(e >= 0)
  def _():
    rows = token_ref[...]

    def step(i, acc):
      cols = pl.ds(pl.multiple_of(i * block_d, block_d), block_d)
      xs = x_ref[rows, cols]
      return acc + jnp.dot(xs, a_ref[e, cols, :].astype(xs.dtype), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_d, step, jnp.zeros(h_ref.shape, jnp.float32))
    h_ref[...] = acc * weight_ref[...][:, None]

  @pl.when(e < 0)
  def _():
    h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)


def _expand_kernel(expert_ref, h_ref, b_ref, y_ref):
  """y[tile, d_out block] = h[tile] @ B[e][:, d_out block], float32 operands and accumulation."""
  e = expert_ref[0]
  block_out = y_ref.shape[1]
  cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_out, block_out), block_out)

  @pl.when(e >= 0)
  def _():
    y_ref[...] = jnp.dot(h_ref[...], b_ref[e, :, cols].astype(jnp.float32), preferred_element_type=jnp.float32)

  @pl.when(e < 0)
  def _():
    y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_tokens", "block_features"))
def routed_lora_pallas(x2: Array, a: Array, b: Array, experts: Array, weights: Array, *, interpret: bool = False,
                       block_tokens: int = 16, block_features: int = 128) -> Array:
  """x2 [T, d_in], a [E, d_in, r], b [E, r, d_out], experts/weights [T, k] -> float32 [T, d_out].

  `block_tokens` rows per tile (one expert each) and `block_features` columns per d_in / d_out block: powers of two
  >= 16, as Triton needs. A small tile wastes less padding when groups are small (decoding, many experts)."""
  for name, size in (("block_tokens", block_tokens), ("block_features", block_features)):
    if size < MIN_BLOCK or size & (size - 1):
      raise ConfigError(f"routed_lora_pallas {name}={size}; expected a power of two >= {MIN_BLOCK}")
  tokens, d_in = x2.shape
  num_experts, _, rank = a.shape
  d_out = b.shape[-1]
  block_d, block_out = _feature_block(d_in, block_features), _feature_block(d_out, block_features)
  rank_p = _power_of_two(rank)
  d_in_p, d_out_p = pl.cdiv(d_in, block_d) * block_d, pl.cdiv(d_out, block_out) * block_out
  x2 = _pad_to(x2, 1, d_in_p)
  a = _pad_to(_pad_to(a, 1, d_in_p), 2, rank_p)
  b = _pad_to(_pad_to(b, 1, rank_p), 2, d_out_p)

  tile_expert, row_token, row_weight, assignment_row = _tile_layout(experts, weights, num_experts, block_tokens)
  num_tiles = tile_expert.shape[0]
  rows = num_tiles * block_tokens
  params = None if pltriton is None else pltriton.CompilerParams()
  tile_spec = pl.BlockSpec((1,), lambda i, *_: (i,))
  row_spec = pl.BlockSpec((block_tokens,), lambda i: (i,))

  h = pl.pallas_call(
      functools.partial(_shrink_kernel, block_d=block_d),
      grid=(num_tiles,),
      in_specs=[tile_spec, row_spec, row_spec, pl.BlockSpec(x2.shape, lambda i: (0, 0)),
                pl.BlockSpec(a.shape, lambda i: (0, 0, 0))],
      out_specs=pl.BlockSpec((block_tokens, rank_p), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, rank_p), jnp.float32),
      compiler_params=params,
      interpret=interpret,
      name="routed_lora_shrink",
  )(tile_expert, row_token, row_weight, x2, a)

  y = pl.pallas_call(
      _expand_kernel,
      grid=(num_tiles, d_out_p // block_out),
      in_specs=[tile_spec, pl.BlockSpec((block_tokens, rank_p), lambda i, j: (i, 0)),
                pl.BlockSpec(b.shape, lambda i, j: (0, 0, 0))],
      out_specs=pl.BlockSpec((block_tokens, block_out), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((rows, d_out_p), jnp.float32),
      compiler_params=params,
      interpret=interpret,
      name="routed_lora_expand",
  )(tile_expert, h, b)

  return y[assignment_row, :d_out].reshape(tokens, experts.shape[1], d_out).sum(axis=1)
