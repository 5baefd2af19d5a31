"""T5X-style encoder-decoder in flax.linen, with optional LoRA experts on any linear.

Pre-norm residual blocks with RMS layer norm, a relative-position bias shared per stack, unscaled dot-product
attention, ReLU (T5 1.0) or gated-GELU (T5.1.1, LM-adapted, FLAN-T5) feed-forward, tied (scaled by d_model**-0.5)
or untied output head. Parameter names follow T5X; every parameter carries logical axis names for sharding.

Cached decoding (the flax "cache" collection, written with `mutable=["cache"]`): `Transformer.init_decode_cache`
runs the encoder once and stores, per decoder layer, the cross-attention keys and values of the encoder output and
a zero self-attention key/value buffer of a fixed length; `Transformer.decode_step` appends l decoder tokens at the
cache index and returns their logits. Each step then costs O(cache length) attention instead of re-running the
decoder over the whole prefix. `t5_step_fn` packages both for `moe_jax.models.decoding.generate`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.models.attention import RelativePositionBias, attention, xla_attention
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.lora import Linear

Array = jax.Array


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.config.weights_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.config.layer_norm_epsilon)
    return (x * scale.astype(jnp.float32)).astype(self.config.compute_dtype)


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


class MultiHeadAttention(nn.Module):
  config: T5Config
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x_q: Array | None, x_kv: Array | None, bias: Array | None, kv_mask: Array | None, causal: bool,
               deterministic: bool, routing_ids: Array | None = None,
               segment_ids: tuple[Array, Array] | None = None, *, decode: bool = False,
               cache_index: Array | None = None) -> Array | None:
    """Attention of x_q over x_kv. With `decode` it works on the `cache` collection instead:

    - preparing (x_q None): self-attention (`causal`) stores zero keys/values [B, Lmax, H, D], shaped by `kv_mask`
      [B, Lmax]; cross-attention stores the keys/values of `x_kv` (the encoder output). Returns None.
    - a step: self-attention writes the keys/values of `x_kv` (the l new tokens) at `cache_index` and attends over
      the whole cache, query i at position cache_index + i (`kv_mask` [B, Lmax]: the cached tokens that are real);
      cross-attention (x_kv None) attends over the stored encoder keys/values. Routing of the new tokens depends on
      their own inputs only, as in the full forward, so routed experts need nothing extra.
    """
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    # T5X/Mesh-TF init: the query absorbs the 1/sqrt(d_kv) that T5 attention does not apply.
    q_init = nn.initializers.variance_scaling(1.0 / cfg.d_kv, "fan_in", "truncated_normal")

    def project(name: str, x: Array) -> Array:  # [B, L, d_model] -> [B, L, heads, d_kv]
      init = q_init if name == "query" else Linear.kernel_init
      t = Linear(inner, ("embed", "joined_kv"), cfg, self.experts, kernel_init=init, name=name)(x, routing_ids)
      return _constrain(t.reshape(t.shape[:2] + (cfg.num_heads, cfg.d_kv)), ("batch", "length", "heads", "kv"))

    if decode:
      out = self._cached_attention(project, x_q, x_kv, bias, kv_mask, causal, cache_index)
      if out is None:
        return None
    else:
      q, k, v = project("query", x_q), project("key", x_kv), project("value", x_kv)
      dropout = cfg.dropout_rate if not deterministic else 0.0
      rng = self.make_rng("dropout") if dropout > 0.0 else None
      out = attention(q, k, v, bias, kv_mask, causal, cfg.attention_impl, dropout, rng, segment_ids)
    out = out.reshape(out.shape[:2] + (inner,))
    return Linear(cfg.d_model, ("joined_kv", "embed"), cfg, self.experts, name="out")(out, routing_ids)

  def _cached_attention(self, project, x_q, x_kv, bias, kv_mask, causal, cache_index):
    """The decode=True path of `__call__` (called from it, so `project` makes the same compact submodules)."""
    cfg = self.config
    cache_axes = ("batch", "length", "heads", "kv")
    if x_q is None:  # preparing the cache
      if causal:
        k = v = _constrain(jnp.zeros(kv_mask.shape + (cfg.num_heads, cfg.d_kv), cfg.compute_dtype), cache_axes)
      else:
        k, v = project("key", x_kv), project("value", x_kv)
      self.put_variable("cache", "cached_key", k)
      self.put_variable("cache", "cached_value", v)
      return None
    if not self.has_variable("cache", "cached_key"):
      raise ValueError(f"{'/'.join(self.path)}: decoding needs a cache made by Transformer.init_decode_cache (apply "
                       "with mutable=['cache'] and pass the result back as variables['cache'])")
    k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    if causal:
      write = lambda cached, new: _constrain(jax.lax.dynamic_update_slice_in_dim(
          cached, new.astype(cached.dtype), cache_index, axis=1), cache_axes)
      k, v = write(k, project("key", x_kv)), write(v, project("value", x_kv))
      self.put_variable("cache", "cached_key", k)
      self.put_variable("cache", "cached_value", v)
    return xla_attention(project("query", x_q), k, v, bias, kv_mask, causal, query_offset=cache_index if causal else 0)


class MlpBlock(nn.Module):
  config: T5Config
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, routing_ids: Array | None = None) -> Array:
    cfg = self.config
    up = lambda name: Linear(cfg.d_ff, ("embed", "mlp"), cfg, self.experts, name=name)(x, routing_ids)
    if cfg.feed_forward == "gated-gelu":
      h = nn.gelu(up("wi_0"), approximate=True) * up("wi_1")
    else:
      h = nn.relu(up("wi"))
    h = _constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return Linear(cfg.d_model, ("mlp", "embed"), cfg, self.experts, name="wo")(h, routing_ids)


class EncoderLayer(nn.Module):
  config: T5Config
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x, bias, mask, deterministic, routing_ids=None, segment_ids=None):
    cfg = self.config
    drop = lambda t: nn.Dropout(cfg.dropout_rate)(t, deterministic=deterministic)
    h = RMSNorm(cfg, name="pre_attention_layer_norm")(x)
    self_segments = None if segment_ids is None else (segment_ids, segment_ids)
    x = x + drop(MultiHeadAttention(cfg, self.experts, name="attention")(h, h, bias, mask, False, deterministic,
                                                                         routing_ids, self_segments))
    h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    x = x + drop(MlpBlock(cfg, self.experts, name="mlp")(h, deterministic, routing_ids))
    return _constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, y, encoded, self_bias, encoder_mask, deterministic, routing_ids=None,
               decoder_segment_ids=None, encoder_segment_ids=None, *, decode: bool = False,
               cache_index: Array | None = None, key_mask: Array | None = None):
    """With `decode`, the cached path of `MultiHeadAttention` (`key_mask` [B, Lmax]: the real cached decoder
    tokens); y=None prepares the cache from `encoded` and returns None."""
    cfg = self.config
    self_attention = MultiHeadAttention(cfg, self.experts, name="self_attention")
    cross_attention = MultiHeadAttention(cfg, self.experts, name="encoder_decoder_attention")
    if decode and y is None:
      self_attention(None, None, None, key_mask, True, True, routing_ids, decode=True)
      cross_attention(None, encoded, None, encoder_mask, False, True, routing_ids, decode=True)
      return None
    drop = lambda t: nn.Dropout(cfg.dropout_rate)(t, deterministic=deterministic)
    packed = decoder_segment_ids is not None
    cached = dict(decode=True, cache_index=cache_index) if decode else {}
    h = RMSNorm(cfg, name="pre_self_attention_layer_norm")(y)
    y = y + drop(self_attention(h, h, self_bias, key_mask if decode else None, True, deterministic, routing_ids,
                                (decoder_segment_ids, decoder_segment_ids) if packed else None, **cached))
    h = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(y)
    y = y + drop(cross_attention(h, None if decode else encoded, None, encoder_mask, False, deterministic,
                                 routing_ids, (decoder_segment_ids, encoder_segment_ids) if packed else None,
                                 **cached))
    h = RMSNorm(cfg, name="pre_mlp_layer_norm")(y)
    y = y + drop(MlpBlock(cfg, self.experts, name="mlp")(h, deterministic, routing_ids))
    return _constrain(y, ("batch", "length", "embed"))


def _layer_class(cls, cfg: T5Config, deterministic_argnum: int):
  """Optionally rematerialise each layer in the backward pass (`deterministic` must stay a static argument)."""
  return nn.remat(cls, static_argnums=(deterministic_argnum,)) if cfg.remat else cls


class Encoder(nn.Module):
  config: T5Config
  embedder: nn.Module
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, tokens: Array, deterministic: bool = True, routing_ids: Array | None = None,
               segment_ids: Array | None = None, positions: Array | None = None) -> Array:
    cfg = self.config
    mask = tokens > 0
    length = tokens.shape[1]
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=True, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weights_dtype, name="relpos_bias")(length, length,
                                                                                  positions=positions)
    x = self.embedder(tokens).astype(cfg.compute_dtype)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    layer = _layer_class(EncoderLayer, cfg, 4)
    for i in range(cfg.num_encoder_layers):
      x = layer(cfg, self.experts, name=f"layers_{i}")(x, bias, mask, deterministic, routing_ids, segment_ids)
    x = RMSNorm(cfg, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  embedder: nn.Module
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, encoded: Array | None, encoder_mask: Array | None, tokens: Array | None,
               deterministic: bool = True, routing_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_segment_ids: Array | None = None,
               positions: Array | None = None, *, decode: bool = False, token_mask: Array | None = None,
               cache_length: int | None = None) -> Array | None:
    """Logits [B, L, vocab] float32 of decoder `tokens` [B, L] (teacher forcing, causal).

    decode=True, tokens=None: prepare the `cache` collection for `cache_length` decoder tokens from `encoded`
    (returns None). decode=True with tokens [B, l]: append them (`token_mask` [B, l], default all real) at the cache
    index and return their logits [B, l, vocab]; `encoded`/`encoder_mask` are then read from the cache (pass None).
    Query positions are the cache slots, so the relative position bias is that of the full forward.
    """
    cfg = self.config
    if (decoder_segment_ids is None) != (encoder_segment_ids is None):
      raise ValueError("packed rows need both encoder_segment_ids and decoder_segment_ids (cross-attention pairs "
                       "a decoder segment with the encoder tokens of the same id), or neither")
    relpos = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, bidirectional=False, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.weights_dtype, name="relpos_bias")
    cached = {}
    if decode:
      if decoder_segment_ids is not None or positions is not None:
        raise ValueError("cached decoding takes unpacked rows: no segment ids or positions")
      if tokens is None:
        self._prepare_cache(encoded, encoder_mask, routing_ids, cache_length)
        return None
      if not self.has_variable("cache", "cache_index"):
        raise ValueError("decoding needs a cache made by Transformer.init_decode_cache (apply with mutable=['cache'] "
                         "and pass the result back as variables['cache'])")
      index = self.get_variable("cache", "cache_index")
      if token_mask is None:
        token_mask = jnp.ones(tokens.shape, bool)
      key_mask = _constrain(jax.lax.dynamic_update_slice_in_dim(
          self.get_variable("cache", "key_mask"), token_mask.astype(bool), index, axis=1), ("batch", "length"))
      self.put_variable("cache", "key_mask", key_mask)
      self.put_variable("cache", "cache_index", index + tokens.shape[1])
      encoder_mask = self.get_variable("cache", "encoder_mask")
      bias = relpos(tokens.shape[1], key_mask.shape[1], offset=index)
      cached = dict(decode=True, cache_index=index, key_mask=key_mask)
      layer = DecoderLayer  # inference only: nothing to rematerialise
    else:
      length = tokens.shape[1]
      bias = relpos(length, length, positions=positions)
      layer = _layer_class(DecoderLayer, cfg, 5)
    y = self.embedder(tokens).astype(cfg.compute_dtype)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    for i in range(cfg.num_decoder_layers):
      y = layer(cfg, self.experts, name=f"layers_{i}")(y, encoded, bias, encoder_mask, deterministic, routing_ids,
                                                       decoder_segment_ids, encoder_segment_ids, **cached)
    y = RMSNorm(cfg, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      logits = self.embedder.attend(y.astype(jnp.float32) * cfg.d_model**-0.5)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, None, name="logits_dense")(y)
    return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _prepare_cache(self, encoded: Array, encoder_mask: Array, routing_ids: Array | None, cache_length: int):
    """The decode=True, tokens=None path of `__call__`: index 0, no real decoder token yet, the encoder mask, and
    every layer's cross-attention keys/values (computed here once, not per step: recomputing them would cost a
    projection of the whole encoder output per layer and step) and zero self-attention buffers."""
    if cache_length is None or cache_length < 1:
      raise ValueError(f"preparing a decode cache needs cache_length >= 1, got {cache_length}")
    self.put_variable("cache", "cache_index", jnp.zeros((), jnp.int32))
    key_mask = _constrain(jnp.zeros((encoded.shape[0], cache_length), bool), ("batch", "length"))
    self.put_variable("cache", "key_mask", key_mask)
    self.put_variable("cache", "encoder_mask", _constrain(encoder_mask, ("batch", "length")))
    for i in range(self.config.num_decoder_layers):
      DecoderLayer(self.config, self.experts, name=f"layers_{i}")(None, encoded, None, encoder_mask, True,
                                                                  routing_ids, decode=True, key_mask=key_mask)


def token_embedder(cfg: T5Config) -> nn.Embed:
  """The shared input/output embedding of a T5 (float32 lookups, the weights' dtype for storage); models built on
  T5's layers (the task-level MoE) use the same one, so their checkpoints share its parameter."""
  return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=cfg.weights_dtype,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))


class Transformer(nn.Module):
  """The encoder-decoder. `routing_ids` [batch] feeds routers that take per-example ids (e.g. `Fixed`); they are
  per row, so every example packed into one row gets that row's id.

  Packed rows (seqio `EncDecFeatureConverter(pack=True)`) pass `*_segment_ids` (1, 2, ... per example, 0 on
  padding) and `*_positions` (restarting at 0 per example): attention stays within an example and the relative
  position bias uses each example's own positions, so a packed example gets the logits it gets alone in a row.
  """

  config: T5Config
  experts: ExpertConfig | None = None

  def setup(self):
    cfg = self.config
    self.token_embedder = token_embedder(cfg)
    self.encoder = Encoder(cfg, self.token_embedder, self.experts)
    self.decoder = Decoder(cfg, self.token_embedder, self.experts)

  def encode(self, encoder_input_tokens: Array, deterministic: bool = True, routing_ids: Array | None = None, *,
             encoder_segment_ids: Array | None = None, encoder_positions: Array | None = None) -> Array:
    return self.encoder(encoder_input_tokens, deterministic, routing_ids, encoder_segment_ids, encoder_positions)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             deterministic: bool = True, routing_ids: Array | None = None, *,
             encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None) -> Array:
    return self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens, deterministic, routing_ids,
                        decoder_segment_ids, encoder_segment_ids, decoder_positions)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, deterministic: bool = True,
               routing_ids: Array | None = None, *, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
    """Logits [batch, decoder_length, vocab] in float32."""
    encoded = self.encode(encoder_input_tokens, deterministic, routing_ids, encoder_segment_ids=encoder_segment_ids,
                          encoder_positions=encoder_positions)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, deterministic, routing_ids,
                       encoder_segment_ids=encoder_segment_ids, decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions)

  def init_decode_cache(self, encoder_input_tokens: Array, max_decode_length: int,
                        routing_ids: Array | None = None) -> None:
    """Fill the `cache` collection for decoding up to `max_decode_length` decoder tokens (the start token
    included) against `encoder_input_tokens` [B, Li]: runs the encoder once. Apply with mutable=["cache"]."""
    encoded = self.encode(encoder_input_tokens, True, routing_ids)
    self.decoder(encoded, encoder_input_tokens > 0, None, True, routing_ids, decode=True,
                 cache_length=max_decode_length)

  def decode_step(self, decoder_tokens: Array, decoder_mask: Array | None = None,
                  routing_ids: Array | None = None) -> Array:
    """Append `decoder_tokens` [B, l] (`decoder_mask` [B, l] 0/1, default all real) to the cache and return their
    logits [B, l, vocab] float32, equal to the full `decode`'s logits at those positions. Apply with
    variables {"params", "cache"} and mutable=["cache"]. Writes past the cache length are not caught under jit
    (XLA clamps the slot): size the cache for every token fed."""
    return self.decoder(None, None, decoder_tokens, True, routing_ids, decode=True, token_mask=decoder_mask)


@flax.struct.dataclass
class T5Step:
  """A `moe_jax.models.decoding.generate` step function for a `Transformer`: a pytree whose leaves are the
  parameters and routing ids and whose static part is the model, so `generate` compiles once per model and shapes
  rather than once per call (a closure would be a new static value each time, with the parameters baked in)."""

  model: Transformer = flax.struct.field(pytree_node=False)
  params: Any
  routing_ids: Array | None = None

  def __call__(self, cache: Any, tokens: Array, mask: Array) -> tuple[Array, Any]:
    logits, variables = self.model.apply({"params": self.params, "cache": cache}, tokens, mask, self.routing_ids,
                                         method="decode_step", mutable=["cache"])
    return logits, variables["cache"]


def t5_step_fn(model: Transformer, params: Any, encoder_tokens: Array, max_decode_length: int,
               routing_ids: Array | None = None) -> tuple[T5Step, Any]:
  """(step_fn, cache) for `decoding.generate` with the encoder run on `encoder_tokens` [B, Li] (0 = padding).

  The prompt `generate` feeds is the decoder start token (0) [B, 1]: the cache holds `max_decode_length` decoder
  tokens, so generating N tokens after it needs max_decode_length >= N (the last one is never fed back).
  """
  return T5Step(model, params, routing_ids), _decode_cache(model, params, encoder_tokens, max_decode_length,
                                                           routing_ids)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_cache(model: Transformer, params: Any, encoder_tokens: Array, max_decode_length: int,
                  routing_ids: Array | None) -> Any:
  """Jitted, so a call outside jit does not run the encoder op by op; inside a jitted caller it is inlined."""
  _, variables = model.apply({"params": params}, encoder_tokens, max_decode_length, routing_ids,
                             method="init_decode_cache", mutable=["cache"])
  return variables["cache"]
