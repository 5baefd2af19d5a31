"""Decoder-only causal language models (BLOOM; Llama, Mistral, Qwen2) in flax.linen, with optional LoRA experts.

Two families share one module tree, so expert regexes and sharding rules work across them:
  bloom  word embeddings + embedding LayerNorm, ALiBi, pre-LN blocks with LayerNorm (scale and bias), biases on
         every linear, GELU (tanh approximation) MLP `wi`/`wo`, final LayerNorm, head tied to the embedding.
  llama  RMSNorm, rotary embeddings (HF's rotate_half layout, so HF's q/k weights load unpermuted), grouped-query
         attention, SwiGLU MLP `wi_0` (gate) / `wi_1` (up) / `wo` (down), optional q/k/v (Qwen2) or q/k/v/o
         (Llama `attention_bias`) biases, tied or untied head. Mistral's and Qwen2's sliding windows are not
         implemented: logits are exact while a sequence (prompt + generated) fits in the window.

Parameter paths: `token_embedder/embedding`, `embedding_norm` (bloom), `layers_{i}/pre_attention_layer_norm`,
`layers_{i}/attention/{query,key,value,out}`, `layers_{i}/pre_mlp_layer_norm`, `layers_{i}/mlp/{wi,wo}` (bloom) or
`layers_{i}/mlp/{wi_0,wi_1,wo}` (llama), `final_norm`, `logits_dense` (untied head). Every linear of attention and
MLP is our `Linear`, so `ExpertConfig.modules` (default for these models: `CAUSAL_LM_MODULES`) puts experts on it.

Positions are counted over real tokens (`cumsum(attention_mask) - 1`, clipped at 0), so left- and right-padded rows
get the logits of the unpadded sequence at their real tokens (RoPE and ALiBi only see position differences).

Generation uses a flax "cache" collection per attention layer (`init_cache`, `causal_step_fn` for
`moe_jax.models.decoding.generate`); see `CausalSelfAttention`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import ConfigError
from moe_jax.models.attention import NEG_INF, attention, resolve_impl
from moe_jax.models.config import ATTENTION_IMPLS, ExpertConfig
from moe_jax.models.lora import Linear

Array = jax.Array

FAMILIES = ("bloom", "llama")
# Every attention and MLP linear of a causal LM (the default expert modules; the head is never included).
CAUSAL_LM_MODULES = r"(.*/)?(attention/(query|key|value|out)|mlp/(wi|wi_0|wi_1|wo))"
# Biases BLOOM always has; for llama they default to off.
_BIAS_FIELDS = ("attention_bias", "attention_out_bias", "mlp_bias")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
  """Shape and numerics of a decoder-only LM (defaults: Llama-2-7B).

  `num_kv_heads` and `head_dim` left at None are resolved as HF does (num_heads; d_model // num_heads). Bias
  fields left at None take the family's value (bloom: True; llama: False). `attention_bias` is q/k/v
  (Qwen2: True), `attention_out_bias` the output projection (HF Llama's `attention_bias` sets both).
  `rope_theta` is unused (and not part of the architecture) for bloom.
  """

  family: str = "llama"
  vocab_size: int = 32000
  d_model: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int | None = None  # None: num_heads (no grouped-query attention)
  head_dim: int | None = None  # None: d_model // num_heads
  d_ff: int = 11008
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  attention_bias: bool | None = None
  attention_out_bias: bool | None = None
  mlp_bias: bool | None = None
  tie_word_embeddings: bool = False
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  remat: bool = False
  # As `T5Config.delta_modules`: modules that keep a merged update beside their kernel. "" = none.
  delta_modules: str = ""
  name: str = "llama2_7b"

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f"CausalLMConfig.family={self.family!r}; expected one of {FAMILIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"CausalLMConfig.attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    # None fields are resolved here, so equal models have equal configs and fingerprints.
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.num_heads <= 0 or self.d_model % self.num_heads:
        raise ConfigError(f"CausalLMConfig: head_dim=None needs d_model={self.d_model} to be a multiple of "
                          f"num_heads={self.num_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff"):
      if getattr(self, field) <= 0:
        raise ConfigError(f"CausalLMConfig.{field} must be positive, got {getattr(self, field)}")
    if self.norm_eps <= 0 or self.rope_theta <= 0:
      raise ConfigError(f"CausalLMConfig needs norm_eps > 0 and rope_theta > 0, got {self.norm_eps}, "
                        f"{self.rope_theta}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"CausalLMConfig.dropout_rate={self.dropout_rate}; expected 0 <= rate < 1")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"CausalLMConfig: num_heads={self.num_heads} is not a multiple of "
                        f"num_kv_heads={self.num_kv_heads} (each key/value head serves a group of query heads)")
    bloom = self.family == "bloom"
    for field in _BIAS_FIELDS:
      if getattr(self, field) is None:
        object.__setattr__(self, field, bloom)
      if bloom and not getattr(self, field):
        raise ConfigError(f"CausalLMConfig.{field}=False, but BLOOM has a bias on every linear")
    if bloom:
      if self.num_kv_heads != self.num_heads:
        raise ConfigError(f"CausalLMConfig: BLOOM has no grouped-query attention; num_kv_heads={self.num_kv_heads} "
                          f"must equal num_heads={self.num_heads}")
      if self.num_heads * self.head_dim != self.d_model or self.d_ff != 4 * self.d_model:
        raise ConfigError(f"CausalLMConfig: BLOOM needs num_heads * head_dim = d_model and d_ff = 4 d_model; got "
                          f"{self.num_heads} * {self.head_dim}, d_model={self.d_model}, d_ff={self.d_ff}")
    elif self.head_dim % 2:
      raise ConfigError(f"CausalLMConfig.head_dim={self.head_dim}: rotary embeddings need an even head_dim")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # fail early on a misspelt dtype

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weights_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def is_bloom(self) -> bool:
    return self.family == "bloom"

  def architecture(self) -> dict[str, Any]:
    """The fields that decide parameter shapes and the function computed (not numerics or run settings)."""
    ignore = {"dropout_rate", "dtype", "param_dtype", "attention_impl", "remat", "delta_modules", "name"}
    if self.is_bloom:
      ignore.add("rope_theta")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}

  def fingerprint(self) -> str:
    """Short hash of `architecture()`: expert checkpoints record it so a mismatched backbone is caught."""
    blob = json.dumps(self.architecture(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def positions_from_mask(mask: Array, offset: Array | int = 0) -> Array:
  """[B, L] int32 position of each token among the real ones, continuing from `offset` ([B] or scalar) real tokens
  seen before; padding gets its neighbour's position (clipped at 0), which no real token ever attends to."""
  offset = jnp.asarray(offset, jnp.int32)
  offset = offset[:, None] if offset.ndim else offset
  return jnp.maximum(offset + jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """[heads] float32 ALiBi slopes: a geometric sequence for the largest power of two n <= heads, then every other
  slope of the 2n sequence for the remaining heads (BLOOM's formula for head counts that are not powers of two)."""
  n = 2**math.floor(math.log2(num_heads))
  base = 2.0**(-(2.0**-(math.log2(n) - 3)))
  slopes = [base**p for p in range(1, n + 1)]
  if n != num_heads:
    extra = 2.0**(-(2.0**-(math.log2(2 * n) - 3)))
    slopes += [extra**p for p in range(1, 2 * min(n, num_heads - n), 2)]
  return np.asarray(slopes, np.float32)


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """RoPE in HF's rotate_half layout: dimension i pairs with i + D/2 (not 2i with 2i+1), so HF's q_proj/k_proj
  weights are used as stored. x [B, L, H, D], positions [B, L]; angles in float32."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta**(np.arange(0, dim, 2, dtype=np.float64) / dim))
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _grouped_attention(q: Array, k: Array, v: Array, bias: Array | None, valid: Array, scale: float) -> Array:
  """Plain XLA attention with grouped key/value heads (no repeat): q [B, Tq, H, D], k/v [B, Tk, KV, D], bias
  [B, H, Tq, Tk] float32 or None, valid [B, 1, Tq, Tk] bool. Query head h uses key/value head h // (H / KV), as HF's
  `repeat_kv`."""
  batch, qlen, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, qlen, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(batch, heads, qlen, k.shape[1])
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(jnp.where(valid, logits, NEG_INF), axis=-1)
  probs = probs.reshape(batch, kv_heads, heads // kv_heads, qlen, k.shape[1]).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(batch, qlen, heads, dim).astype(q.dtype)


class Norm(nn.Module):
  """BLOOM's LayerNorm (centred, scale and bias) or Llama's RMSNorm (scale only); statistics in float32."""

  config: CausalLMConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    features = x.shape[-1]
    x = x.astype(jnp.float32)
    if cfg.is_bloom:
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (features,),
                       cfg.weights_dtype)
    x = x * scale.astype(jnp.float32)
    if cfg.is_bloom:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (features,),
                        cfg.weights_dtype)
      x = x + bias.astype(jnp.float32)
    return x.astype(cfg.compute_dtype)


class CausalSelfAttention(nn.Module):
  """Causal self-attention with RoPE (llama) or ALiBi (bloom), grouped key/value heads, and a KV cache.

  Cache (`decode=True`; flax "cache" collection, sized by the tokens the model was initialised with):
    cached_key, cached_value [B, max_len, kv_heads, head_dim] (keys after RoPE), in the compute dtype
    cached_mask              [B, max_len] bool: which slots hold real tokens (not padding, not yet written)
    cache_index              int32: the next slot to write
  A call writes its L tokens at cache_index (a prefill writes the prompt, a step one token) and attends to every
  real slot up to its own. Positions continue from the real tokens already cached, so left-padded prompts and rows
  that pad a step (mask 0) keep RoPE and ALiBi right. Slots past max_len are not checked (the write would be
  clamped under jit): callers size the cache for prompt + new tokens.
  """

  config: CausalLMConfig
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, routing_ids: Array | None = None,
               decode: bool = False) -> Array:
    cfg = self.config
    batch, length = x.shape[:2]

    def dense(name: str, heads: int) -> Array:
      out = Linear(heads * cfg.head_dim, ("embed", "joined_kv"), cfg, self.experts, use_bias=cfg.attention_bias,
                   name=name)(x, routing_ids)
      return out.reshape(batch, length, heads, cfg.head_dim)

    q = nn.with_logical_constraint(dense("query", cfg.num_heads), ("batch", "length", "heads", "kv"))
    k = dense("key", cfg.num_kv_heads)
    v = dense("value", cfg.num_kv_heads)

    cached = decode and self.has_variable("cache", "cached_key")
    if decode:
      cache_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cache_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cache_mask = self.variable("cache", "cached_mask", jnp.zeros, mask.shape, jnp.bool_)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if cached:
      # New tokens continue after the real tokens already in the cache.
      positions = positions_from_mask(mask, jnp.sum(cache_mask.value, axis=1, dtype=jnp.int32))
    if not cfg.is_bloom:
      q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)

    if cached:
      index = cache_index.value
      cache_k.value = jax.lax.dynamic_update_slice(cache_k.value, k, (0, index, 0, 0))
      cache_v.value = jax.lax.dynamic_update_slice(cache_v.value, v, (0, index, 0, 0))
      cache_mask.value = jax.lax.dynamic_update_slice(cache_mask.value, mask.astype(jnp.bool_), (0, index))
      cache_index.value = index + length
      # The step function constrains its own cache (as `decoding` expects): rows over the batch axes, and heads
      # over the model axis unless grouped key/value heads may not divide it.
      axes = ("batch", "length", "heads" if cfg.num_kv_heads == cfg.num_heads else None, "kv")
      cache_k.value = nn.with_logical_constraint(cache_k.value, axes)
      cache_v.value = nn.with_logical_constraint(cache_v.value, axes)
      k, v, key_mask = cache_k.value, cache_v.value, cache_mask.value
      key_positions = positions_from_mask(key_mask)
      query_slots = index + jnp.arange(length)
    else:
      key_mask, key_positions, query_slots = mask.astype(jnp.bool_), positions, jnp.arange(length)
    causal = jnp.arange(k.shape[1])[None, :] <= query_slots[:, None]  # [Tq, Tk]
    valid = key_mask[:, None, None, :] & causal[None, None]

    bias = None
    if cfg.is_bloom:
      # slope * (key position - query position): HF adds slope * key position, which differs by a per-query
      # constant that softmax removes; the relative form stays bounded on long sequences.
      distance = (key_positions[:, None, :] - positions[:, :, None]).astype(jnp.float32)  # [B, Tq, Tk]
      bias = jnp.asarray(alibi_slopes(cfg.num_heads))[None, :, None, None] * distance[:, None]

    scale = cfg.head_dim**-0.5
    # Cached decoding is memory-bound and its query slots are offset, which the fused kernels' causal masks do
    # not express: it always takes the XLA path.
    impl = "xla" if cached else resolve_impl(cfg.attention_impl, q.dtype, cfg.head_dim, False)
    if impl == "xla":
      out = _grouped_attention(q, k, v, bias, valid, scale)
    else:
      # Fused kernels take an additive bias but no arbitrary mask or key groups: fold the mask (left padding
      # included) into the bias and repeat the key/value heads.
      groups = cfg.num_heads // cfg.num_kv_heads
      # The bias is materialised as [B, H, T, T] (the TPU kernel indexes it per head), as the XLA path's logits.
      full = jnp.where(valid, 0.0 if bias is None else bias, NEG_INF).astype(q.dtype)
      full = jnp.broadcast_to(full, (batch, cfg.num_heads, length, k.shape[1]))
      out = attention((q * scale).astype(q.dtype), jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2),
                      full, None, False, impl)
    out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
    return Linear(cfg.d_model, ("joined_kv", "embed"), cfg, self.experts, use_bias=cfg.attention_out_bias,
                  name="out")(out, routing_ids)


class Mlp(nn.Module):
  """BLOOM: GELU (tanh approximation) between `wi` and `wo`. Llama: SwiGLU silu(`wi_0` x) * `wi_1` x into `wo`."""

  config: CausalLMConfig
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x: Array, routing_ids: Array | None = None) -> Array:
    cfg = self.config
    up = lambda name: Linear(cfg.d_ff, ("embed", "mlp"), cfg, self.experts, use_bias=cfg.mlp_bias,
                             name=name)(x, routing_ids)
    if cfg.is_bloom:
      h = nn.gelu(up("wi").astype(jnp.float32), approximate=True)
    else:
      h = nn.silu(up("wi_0").astype(jnp.float32)) * up("wi_1").astype(jnp.float32)
    h = nn.with_logical_constraint(h.astype(cfg.compute_dtype), ("batch", "length", "mlp"))
    return Linear(cfg.d_model, ("mlp", "embed"), cfg, self.experts, use_bias=cfg.mlp_bias, name="wo")(h, routing_ids)


class Block(nn.Module):
  """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

  config: CausalLMConfig
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, routing_ids: Array | None, decode: bool,
               deterministic: bool) -> Array:
    cfg = self.config
    drop = lambda t: nn.Dropout(cfg.dropout_rate)(t, deterministic=deterministic)
    h = Norm(cfg, name="pre_attention_layer_norm")(x)
    x = x + drop(CausalSelfAttention(cfg, self.experts, name="attention")(h, mask, positions, routing_ids, decode))
    h = Norm(cfg, name="pre_mlp_layer_norm")(x)
    x = x + drop(Mlp(cfg, self.experts, name="mlp")(h, routing_ids))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CausalLM(nn.Module):
  """The decoder-only LM. `routing_ids` [batch] feeds routers that take per-example ids (e.g. `Fixed`).

  Routing under the KV cache: the routers here (`Phatgoose`, `SigmoidGate`, `Uniform`, `Fixed`) weigh experts
  from each token's own module input (or the row's id), so a generated token is routed exactly as in the uncached
  forward over the whole sequence; the cached keys and values of earlier tokens already hold their routed updates.
  A router that pooled over the sequence would not have this property.
  """

  config: CausalLMConfig
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, tokens: Array, attention_mask: Array | None = None, routing_ids: Array | None = None,
               decode: bool = False, deterministic: bool = True) -> Array:
    """float32 logits [B, L, vocab] for tokens [B, L] int32; attention_mask [B, L] is 1 on real tokens (padding
    on either side), None for all real. With `decode=True` the tokens are appended to the KV cache (see
    `CausalSelfAttention`); initialising with decode=True creates an empty cache as long as `tokens`."""
    cfg = self.config
    mask = jnp.ones(tokens.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    positions = positions_from_mask(mask)
    embedder = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=cfg.weights_dtype,
                        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                        name="token_embedder")
    x = embedder(tokens).astype(cfg.compute_dtype)
    if cfg.is_bloom:
      x = Norm(cfg, name="embedding_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    # Rematerialised blocks keep `decode` and `deterministic` static (args 5 and 6, counting the module).
    block = nn.remat(Block, static_argnums=(5, 6)) if cfg.remat else Block
    for i in range(cfg.num_layers):
      x = block(cfg, self.experts, name=f"layers_{i}")(x, mask, positions, routing_ids, decode, deterministic)
    x = Norm(cfg, name="final_norm")(x)
    if cfg.tie_word_embeddings:
      table = embedder.embedding.astype(cfg.compute_dtype)
      logits = jnp.dot(x.astype(cfg.compute_dtype), table.T, preferred_element_type=jnp.float32)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, None, name="logits_dense")(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_cache(model: CausalLM, batch: int, max_len: int) -> Any:
  """An empty KV cache (the "cache" collection) for `batch` rows of up to `max_len` tokens (prompt + generated).
  Shapes come from an abstract init, so no parameters are materialised."""
  tokens = jnp.zeros((batch, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@flax.struct.dataclass
class CausalStep:
  """A `moe_jax.models.decoding.generate` step function: `step(cache, tokens [B, l], mask [B, l]) -> (float32
  logits [B, l, V], cache)` appends the tokens to the cache (prefill: the prompt; then one token a step) and returns
  their logits. A pytree whose leaves are the parameters and routing ids and whose static part is the model, so
  `generate` compiles once per model and shapes (a closure would be a new static value each call, with the
  parameters baked into the program)."""

  model: CausalLM = flax.struct.field(pytree_node=False)
  params: Any
  routing_ids: Array | None = None

  def __call__(self, cache: Any, tokens: Array, mask: Array) -> tuple[Array, Any]:
    logits, variables = self.model.apply({"params": self.params, "cache": cache}, tokens, mask, self.routing_ids,
                                         decode=True, mutable=["cache"])
    return logits, variables["cache"]


def causal_step_fn(model: CausalLM, params: Any, routing_ids: Array | None = None) -> CausalStep:
  """The step function of `model` with `params` (and per-row `routing_ids`) for `decoding.generate`; start it
  from `init_cache(model, batch, prompt_length + max_new_tokens)`."""
  return CausalStep(model, params, routing_ids)
