"""T5X-style encoder-decoder in flax.linen, with optional LoRA experts on any linear.

Pre-norm residual blocks with RMS layer norm, a relative-position bias shared per stack, unscaled dot-product
attention, ReLU (T5 1.0) or gated-GELU (T5.1.1, LM-adapted, FLAN-T5) feed-forward, tied (scaled by d_model**-0.5)
or untied output head. Parameter names follow T5X; every parameter carries logical axis names for sharding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models.attention import RelativePositionBias, attention
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
  def __call__(self, x_q: Array, x_kv: Array, bias: Array | None, kv_mask: Array | None, causal: bool,
               deterministic: bool, routing_ids: Array | None = None,
               segment_ids: tuple[Array, Array] | None = None) -> Array:
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    # T5X/Mesh-TF init: the query absorbs the 1/sqrt(d_kv) that T5 attention does not apply.
    q_init = nn.initializers.variance_scaling(1.0 / cfg.d_kv, "fan_in", "truncated_normal")
    dense = lambda name, init=Linear.kernel_init: Linear(inner, ("embed", "joined_kv"), cfg, self.experts,
                                                          kernel_init=init, name=name)
    split = lambda t: _constrain(t.reshape(t.shape[:2] + (cfg.num_heads, cfg.d_kv)),
                                 ("batch", "length", "heads", "kv"))
    q = split(dense("query", q_init)(x_q, routing_ids))
    k = split(dense("key")(x_kv, routing_ids))
    v = split(dense("value")(x_kv, routing_ids))
    dropout = cfg.dropout_rate if not deterministic else 0.0
    rng = self.make_rng("dropout") if dropout > 0.0 else None
    out = attention(q, k, v, bias, kv_mask, causal, cfg.attention_impl, dropout, rng, segment_ids)
    out = out.reshape(out.shape[:2] + (inner,))
    return Linear(cfg.d_model, ("joined_kv", "embed"), cfg, self.experts, name="out")(out, routing_ids)


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
               decoder_segment_ids=None, encoder_segment_ids=None):
    cfg = self.config
    drop = lambda t: nn.Dropout(cfg.dropout_rate)(t, deterministic=deterministic)
    packed = decoder_segment_ids is not None
    h = RMSNorm(cfg, name="pre_self_attention_layer_norm")(y)
    y = y + drop(MultiHeadAttention(cfg, self.experts, name="self_attention")(
        h, h, self_bias, None, True, deterministic, routing_ids,
        (decoder_segment_ids, decoder_segment_ids) if packed else None))
    h = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(y)
    y = y + drop(MultiHeadAttention(cfg, self.experts, name="encoder_decoder_attention")(
        h, encoded, None, encoder_mask, False, deterministic, routing_ids,
        (decoder_segment_ids, encoder_segment_ids) if packed else None))
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
  def __call__(self, encoded: Array, encoder_mask: Array, tokens: Array, deterministic: bool = True,
               routing_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_segment_ids: Array | None = None, positions: Array | None = None) -> Array:
    cfg = self.config
    if (decoder_segment_ids is None) != (encoder_segment_ids is None):
      raise ValueError("packed rows need both encoder_segment_ids and decoder_segment_ids (cross-attention pairs "
                       "a decoder segment with the encoder tokens of the same id), or neither")
    length = tokens.shape[1]
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=False, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weights_dtype, name="relpos_bias")(length, length,
                                                                                  positions=positions)
    y = self.embedder(tokens).astype(cfg.compute_dtype)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    layer = _layer_class(DecoderLayer, cfg, 5)
    for i in range(cfg.num_decoder_layers):
      y = layer(cfg, self.experts, name=f"layers_{i}")(y, encoded, bias, encoder_mask, deterministic, routing_ids,
                                                       decoder_segment_ids, encoder_segment_ids)
    y = RMSNorm(cfg, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      logits = self.embedder.attend(y.astype(jnp.float32) * cfg.d_model**-0.5)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, None, name="logits_dense")(y)
    return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


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
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=cfg.weights_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))
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
