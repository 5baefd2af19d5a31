"""A BERT encoder in flax.linen: the sentence embedder of ELM's and PHATGOOSE's retrieval baselines (all-MiniLM-L6-v2
is a 6-layer BERT), computing what HF's `BertModel` computes for its last hidden states.

Embeddings (word + absolute position + token type, then LayerNorm), post-LN layers (x = norm(x + attention(x)),
x = norm(x + mlp(x))), exact (erf) GELU as HF's "gelu", biases on every linear. No pooler: sentence embedders pool
the last hidden states themselves. Float32 throughout, matmuls at HIGHEST precision, so a GPU's TF32 does not move
the embeddings away from the PyTorch reference (the model is small; retrieval compares embeddings across runs).

Parameter paths (a plain nested dict; `moe_jax.checkpoints.hf_bert.load_hf_bert` fills it from HF weights):
`embeddings/{word,position,token_type}/embedding`, `embeddings/norm/{scale,bias}`,
`layers_{i}/attention/{query,key,value,out}/{kernel,bias}`, `layers_{i}/attention_norm/{scale,bias}`,
`layers_{i}/mlp/{wi,wo}/{kernel,bias}`, `layers_{i}/mlp_norm/{scale,bias}`. Kernels are [d_in, d_out].
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.attention import NEG_INF

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The shape of a BERT encoder, named as HF's `config.json` names it (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) <= 0:
        raise ConfigError(f"BertConfig.{field.name} must be positive, got {getattr(self, field.name)}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"BertConfig: hidden_size={self.hidden_size} is not a multiple of "
                        f"num_attention_heads={self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, precision=HIGHEST, name=name)


def _norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch's layer_norm: E[x^2] - E[x]^2 loses digits the 1e-4 parity needs.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


class SelfAttention(nn.Module):
  """Bidirectional multi-head attention over the real keys (`mask` [B, L], 1 = real token), scaled by 1/sqrt(d)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    cfg = self.config
    batch, length = x.shape[:2]
    heads = lambda name: _dense(cfg.hidden_size, name)(x).reshape(batch, length, cfg.num_attention_heads,
                                                                  cfg.head_dim)
    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * cfg.head_dim**-0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None, None, :] > 0, logits, NEG_INF), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=HIGHEST).reshape(batch, length, cfg.hidden_size)
    return _dense(cfg.hidden_size, "out")(out)


class Mlp(nn.Module):
  """`wi`, exact GELU, `wo`: HF BERT's intermediate and output dense layers."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.gelu(_dense(self.config.intermediate_size, "wi")(x), approximate=False)
    return _dense(self.config.hidden_size, "wo")(h)


class Layer(nn.Module):
  """Post-LN residual layer, as BERT: the norm follows each residual sum."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    x = _norm(self.config, "attention_norm")(x + SelfAttention(self.config, name="attention")(x, mask))
    return _norm(self.config, "mlp_norm")(x + Mlp(self.config, name="mlp")(x))


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, summed then normalised (before the first layer, as BERT)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
    cfg = self.config
    embed = lambda size, name: nn.Embed(size, cfg.hidden_size, name=name)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (embed(cfg.vocab_size, "word")(input_ids) + embed(cfg.max_position_embeddings, "position")(positions)
         + embed(cfg.type_vocab_size, "token_type")(token_type_ids))
    return _norm(cfg, "norm")(x)


class Bert(nn.Module):
  """BERT's last hidden states [B, L, hidden] float32 for right-padded `input_ids` [B, L] and `attention_mask`
  [B, L] (1 on real tokens). `token_type_ids` default to 0 (one segment, as a sentence embedder feeds it).
  Positions are 0..L-1 whatever the mask, as HF's absolute embeddings, so rows must be padded on the right."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None) -> Array:
    types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    x = Embeddings(self.config, name="embeddings")(input_ids, types)
    for i in range(self.config.num_hidden_layers):
      x = Layer(self.config, name=f"layers_{i}")(x, attention_mask)
    return x
