"""Model and expert configuration.

Both configs are frozen dataclasses so they can be flax module attributes (hashable, static under jit) and gin
configurables (`gin/models/*.gin` bind their fields).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import gin
import jax.numpy as jnp

from moe_jax.errors import ConfigError

# PHATGOOSE puts an expert on every q/k/v/o of encoder self-, decoder self- and decoder cross-attention and on every
# feed-forward linear (wi_0/wi_1/wo for gated-GELU, wi/wo for ReLU): 432 modules on T5-XL.
PHATGOOSE_MODULES = r"(.*/)?((attention|self_attention|encoder_decoder_attention)/(query|key|value|out)|mlp/(wi|wi_0|wi_1|wo))"

FEED_FORWARDS = ("gated-gelu", "relu")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "tpu_flash")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and numerics of a T5X-style encoder-decoder (defaults: T5.1.1 small)."""

  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  feed_forward: str = "gated-gelu"
  tie_word_embeddings: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  remat: bool = False
  # Modules (a regex fullmatched on the module path, as `ExpertConfig.modules`) that add a separate `delta`
  # [d_in, d_out] to their kernel: in a low-precision compute dtype a merged weight update of ~1e-3 |W| folded into
  # W is rounded to W's grid (erased when W is already on it, as in a bf16 checkpoint); beside W it is kept
  # (`moe_jax.methods.merged`). "" = none.
  delta_modules: str = ""
  name: str = "t5_1_1_small"

  def __post_init__(self):
    if self.feed_forward not in FEED_FORWARDS:
      raise ConfigError(f"T5Config.feed_forward={self.feed_forward!r}; expected one of {FEED_FORWARDS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"T5Config.attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    for field in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_encoder_layers", "num_decoder_layers"):
      if getattr(self, field) <= 0:
        raise ConfigError(f"T5Config.{field} must be positive, got {getattr(self, field)}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # fail early on a misspelt dtype

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weights_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def architecture(self) -> dict[str, Any]:
    """The fields that decide parameter shapes and the function computed (not numerics or run settings)."""
    ignore = {"dropout_rate", "dtype", "param_dtype", "attention_impl", "remat", "delta_modules", "name"}
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}

  def fingerprint(self) -> str:
    """Short hash of `architecture()`: expert checkpoints record it so a mismatched backbone is caught."""
    blob = json.dumps(self.architecture(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """Which linears carry LoRA experts, how many, and how tokens are routed among them.

  An expert at a module is A (d_in x r), B (r x d_out) and a router vector (d_in); the module computes
  W x + sum_i w_i(x) B_i^T A_i^T x / r with the weights w from `router`. `impl` picks the routed-computation
  formulation (see `moe_jax.models.routed`).
  """

  num_experts: int = 1
  rank: int = 16
  modules: str = PHATGOOSE_MODULES
  init_std: float = 0.01
  router: Any = None  # a `moe_jax.models.routers.Router`; None means `Uniform()`
  impl: str = "auto"

  def __post_init__(self):
    if self.num_experts < 1 or self.rank < 1:
      raise ConfigError(f"ExpertConfig needs num_experts >= 1 and rank >= 1, got {self.num_experts}, {self.rank}")
