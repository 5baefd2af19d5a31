"""T5 attention pieces: relative-position buckets and bias, and the attention op with fused kernels.

T5 attention has no 1/sqrt(d) scaling and adds a learned relative-position bias to the logits. Fused kernels that
accept an additive bias: cuDNN flash attention on GPU (`jax.nn.dot_product_attention(implementation="cudnn")`) and
the Pallas flash-attention kernel on TPU. The plain XLA path (`xla_attention`) is the fallback and the reference;
it is also the only path with attention-probability dropout.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e10


@functools.lru_cache(maxsize=64)
def relative_position_buckets(qlen: int, klen: int, bidirectional: bool, num_buckets: int,
                              max_distance: int, offset: int = 0) -> np.ndarray:
  """[qlen, klen] bucket ids of (key position - query position), as in T5 (static, computed at trace time).

  Half the buckets are exact offsets, the rest log-spaced up to `max_distance`; bidirectional stacks split the
  buckets between keys before and after the query. `offset` shifts query positions (cached decoding).
  """
  rel = np.arange(klen)[None, :] - (np.arange(qlen)[:, None] + offset)
  n = -rel
  buckets = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    buckets += (n < 0) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 like the reference implementations, so bucket edges agree with released checkpoints' behaviour.
  log_ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
      np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, n, large)).astype(np.int32)


class RelativePositionBias(nn.Module):
  """Learned per-head bias over relative-position buckets, shared by all layers of one stack (T5X `relpos_bias`)."""

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, offset: int = 0) -> Array:
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
                       (self.num_heads, self.num_buckets), self.param_dtype)
    buckets = relative_position_buckets(qlen, klen, self.bidirectional, self.num_buckets, self.max_distance, offset)
    bias = jnp.take(table, jnp.asarray(buckets), axis=1)  # [heads, q, k]
    return bias[None].astype(self.dtype)


def xla_attention(q: Array, k: Array, v: Array, bias: Array | None, kv_mask: Array | None, causal: bool,
                  dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Reference attention. q [B, Tq, H, D], k/v [B, Tk, H, D], bias [1|B, H, Tq, Tk], kv_mask [B, Tk] bool."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  mask = _full_mask(q.shape[1], k.shape[1], kv_mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def _full_mask(qlen: int, klen: int, kv_mask: Array | None, causal: bool) -> Array | None:
  mask = None
  if kv_mask is not None:
    mask = kv_mask[:, None, None, :]
  if causal:
    tri = jnp.tril(jnp.ones((qlen, klen), bool))[None, None]
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
              dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Dispatch to the chosen kernel. Padding must be on the right (true for unpacked seqio batches): the fused
  kernels take per-example key lengths rather than arbitrary masks."""
  impl = resolve_impl(impl, q.dtype, q.shape[-1], dropout_rate > 0.0 and dropout_rng is not None)
  if impl == "xla":
    return xla_attention(q, k, v, bias, kv_mask, causal, dropout_rate, dropout_rng)
  if impl == "cudnn":
    lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), scale=1.0,
                                        is_causal=causal, key_value_seq_lengths=lengths, implementation="cudnn")
  if impl == "tpu_flash":
    return _tpu_flash(q, k, v, bias, kv_mask, causal)
  raise ValueError(f"attention impl={impl!r}; expected auto, xla, cudnn or tpu_flash")


def _tpu_flash(q, k, v, bias, kv_mask, causal):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top

  batch = q.shape[0]
  segment_ids = None
  if kv_mask is not None:
    segment_ids = fa.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32), kv=kv_mask.astype(jnp.int32))
  ab = None if bias is None else jnp.broadcast_to(bias, (batch,) + bias.shape[1:]).astype(jnp.float32)
  out = fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), ab=ab,
                           segment_ids=segment_ids, causal=causal, sm_scale=1.0)
  return out.transpose(0, 2, 1, 3)
