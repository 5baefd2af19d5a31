"""T5 attention pieces: relative-position buckets and bias, and the attention op with fused kernels.

T5 attention has no 1/sqrt(d) scaling and adds a learned relative-position bias to the logits. Fused kernels that
accept an additive bias: cuDNN flash attention on GPU (`jax.nn.dot_product_attention(implementation="cudnn")`) and
the Pallas flash-attention kernel on TPU. The plain XLA path (`xla_attention`) is the fallback and the reference;
it is also the only path with attention-probability dropout. Packed rows add segment ids (query, key): the XLA
path masks with them, cuDNN gets them folded into the additive bias, the TPU kernel takes them as `SegmentIds`.
Cached decoding (`moe_jax.models.t5`, decode=True) uses the XLA path with a run-time query offset: a few queries
against a cache is memory-bound, and the fused kernels take no query offset for the causal mask.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import ConfigError

Array = jax.Array
NEG_INF = -1e10


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int,
                             xp=np):
  """Bucket ids (int32) of relative positions (key position - query position), as in T5; `xp` is numpy (static
  positions, at trace time) or jax.numpy (per-example positions of packed rows): one formula for both, so packed
  and unpacked examples get the same buckets.

  Half the buckets are exact offsets, the rest log-spaced up to `max_distance`; bidirectional stacks split the
  buckets between keys before and after the query.
  """
  n = -relative_position
  buckets = xp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (n < 0) * num_buckets
    n = xp.abs(n)
  else:
    n = xp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 like the reference implementations, so bucket edges agree with released checkpoints' behaviour.
  log_ratio = xp.log(xp.maximum(n, 1).astype(xp.float32) / xp.float32(max_exact)) / xp.float32(
      np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * xp.float32(num_buckets - max_exact)).astype(xp.int32)
  large = xp.minimum(large, num_buckets - 1)
  return (buckets + xp.where(is_small, n, large)).astype(xp.int32)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(qlen: int, klen: int, bidirectional: bool, num_buckets: int,
                              max_distance: int, offset: int = 0) -> np.ndarray:
  """[qlen, klen] bucket ids for query i at position offset + i and key j at j (unpacked rows and cached
  decoding): static, so computed once at trace time."""
  rel = np.arange(klen)[None, :] - (np.arange(qlen)[:, None] + offset)
  return relative_position_bucket(rel, bidirectional, num_buckets, max_distance)


class RelativePositionBias(nn.Module):
  """Learned per-head bias over relative-position buckets, shared by all layers of one stack (T5X `relpos_bias`)."""

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, offset: int | Array = 0, positions: Array | None = None) -> Array:
    """[1, heads, qlen, klen] for positions offset + arange(qlen) (queries) and arange(klen) (keys), or, given
    `positions` [B, L] (self-attention over packed rows, whose positions restart per segment; qlen = klen = L),
    [B, heads, L, L] from each example's own positions.

    `offset` may be a traced int32 scalar (cached decoding: the queries are the tokens written at the cache index,
    known only at run time; queries must then stay below `klen`): the buckets are then read at run time from a
    static table over every relative position -(klen - 1) .. klen - 1, so they are the very values of the static
    path (no float32 log evaluated twice, once in NumPy and once in XLA).
    """
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
                       (self.num_heads, self.num_buckets), self.param_dtype)
    if positions is None:
      if isinstance(offset, (int, np.integer)):
        buckets = jnp.asarray(relative_position_buckets(qlen, klen, self.bidirectional, self.num_buckets,
                                                        self.max_distance, int(offset)))
      else:
        # Row 0 of this table holds the bucket of relative position r at index r + klen - 1.
        by_relative = relative_position_buckets(1, 2 * klen - 1, self.bidirectional, self.num_buckets,
                                                self.max_distance, klen - 1)[0]
        rel = jnp.arange(klen)[None, :] - (offset + jnp.arange(qlen))[:, None]
        buckets = jnp.take(jnp.asarray(by_relative), rel + klen - 1, mode="clip")
      bias = jnp.take(table, buckets, axis=1)  # [heads, q, k]
      return bias[None].astype(self.dtype)
    if positions.shape[1:] != (qlen,) or qlen != klen:
      raise ValueError(f"positions {positions.shape} need qlen = klen = their length; got {qlen}, {klen}")
    rel = positions[:, None, :] - positions[:, :, None]  # [B, q, k]: key position - query position
    buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance, xp=jnp)
    return jnp.take(table, buckets, axis=1).transpose(1, 0, 2, 3).astype(self.dtype)  # [B, heads, q, k]


def xla_attention(q: Array, k: Array, v: Array, bias: Array | None, kv_mask: Array | None, causal: bool,
                  dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                  segment_ids: tuple[Array, Array] | None = None, query_offset: int | Array = 0) -> Array:
  """Reference attention. q [B, Tq, H, D], k/v [B, Tk, H, D], bias [1|B, H, Tq, Tk], kv_mask [B, Tk] bool,
  segment_ids (query [B, Tq], key [B, Tk]) int: a query sees only keys of its own segment (packed rows).
  `query_offset` (int or traced scalar): under `causal`, query i stands at key position query_offset + i (the
  queries of a cached decoding step against the whole cache)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  mask = _full_mask(q.shape[1], k.shape[1], kv_mask, causal, segment_ids, query_offset)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def _full_mask(qlen: int, klen: int, kv_mask: Array | None, causal: bool,
               segment_ids: tuple[Array, Array] | None = None, query_offset: int | Array = 0) -> Array | None:
  """[1|B, 1, Tq, Tk] bool, or None when nothing is masked; under `causal` query i sees keys 0 .. query_offset + i."""
  mask = None
  if kv_mask is not None:
    mask = kv_mask[:, None, None, :]
  if segment_ids is not None:
    q_segments, kv_segments = segment_ids
    same = q_segments[:, None, :, None] == kv_segments[:, None, None, :]
    mask = same if mask is None else mask & same
  if causal:
    tri = (jnp.arange(klen)[None, :] <= jnp.arange(qlen)[:, None] + query_offset)[None, None]
    mask = tri if mask is None else mask & tri
  return mask


def resolve_impl(impl: str, dtype: jnp.dtype, head_dim: int, dropout: bool) -> str:
  """Choose the attention kernel for this platform. `auto` prefers a fused kernel when one applies."""
  if dropout or impl == "xla":
    return "xla"
  platform = jax.default_backend()
  if impl == "auto":
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
      return "cudnn"
    if platform == "tpu":
      return "tpu_flash"
    return "xla"
  return impl


def attention(q: Array, k: Array, v: Array, bias: Array | None, kv_mask: Array | None, causal: bool, impl: str,
              dropout_rate: float = 0.0, dropout_rng: Array | None = None,
              segment_ids: tuple[Array, Array] | None = None) -> Array:
  """Dispatch to the chosen kernel. Padding must be on the right (true for seqio batches, packed or not): the
  fused kernels take per-example key lengths rather than arbitrary masks. `segment_ids` (query, key) keep packed
  examples apart; padding is segment 0, so real tokens never attend to it."""
  impl = resolve_impl(impl, q.dtype, q.shape[-1], dropout_rate > 0.0 and dropout_rng is not None)
  if impl == "xla":
    return xla_attention(q, k, v, bias, kv_mask, causal, dropout_rate, dropout_rng, segment_ids)
  if impl == "cudnn":
    lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
    # cuDNN takes no segment ids: jax folds a boolean mask into the additive bias (`combine_bias_and_mask`, with
    # a large negative number cuDNN handles), so packed rows pay for a [B, H, Tq, Tk] bias.
    mask = None if segment_ids is None else _full_mask(q.shape[1], k.shape[1], None, False, segment_ids)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
                                        scale=1.0, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation="cudnn")
  if impl == "tpu_flash":
    return _tpu_flash(q, k, v, bias, kv_mask, causal, segment_ids)
  raise ConfigError(f"attention impl={impl!r}; expected auto, xla, cudnn or tpu_flash")


def _tpu_flash(q, k, v, bias, kv_mask, causal, segment_ids):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top

  batch = q.shape[0]
  if segment_ids is not None:  # padding keys are segment 0, which no real query has
    segment_ids = fa.SegmentIds(q=segment_ids[0].astype(jnp.int32), kv=segment_ids[1].astype(jnp.int32))
  elif kv_mask is not None:
    segment_ids = fa.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32), kv=kv_mask.astype(jnp.int32))
  ab = None if bias is None else jnp.broadcast_to(bias, (batch,) + bias.shape[1:]).astype(jnp.float32)
  out = fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), ab=ab,
                           segment_ids=segment_ids, causal=causal, sm_scale=1.0)
  return out.transpose(0, 2, 1, 3)
