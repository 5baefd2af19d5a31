"""Linear layer that may carry E LoRA experts with router vectors (the unit PHATGOOSE works on).

Parameters of an expert module at path P (T5X names, stacked on the `expert` axis):
  P/kernel  [d_in, d_out]      the frozen backbone weight
  P/lora_a  [E, d_in, r]       N(0, init_std^2)
  P/lora_b  [E, r, d_out]      zeros
  P/router  [E, d_in]          zeros; the sigmoid gate's v during gate training, the router vector afterwards
A module at a path matching `T5Config.delta_modules` also has
  P/delta   [d_in, d_out]      float32 zeros; a merged weight update kept beside the kernel (see `Linear`)
A module built with `use_bias=True` (BLOOM's linears, Qwen2's q/k/v; never T5) also has
  P/bias    [d_out]            the frozen backbone bias
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.routed import routed_lora
from moe_jax.models.routers import Uniform

Array = jax.Array


def module_path(module: nn.Module) -> str:
  return "/".join(module.path)


def has_experts(experts: ExpertConfig | None, path: str) -> bool:
  return experts is not None and re.fullmatch(experts.modules, path) is not None


class Linear(nn.Module):
  """y = x W (+ b) (+ x D when the path matches `config.delta_modules`) (+ routed LoRA when it matches
  `experts.modules`).

  `config` is any model config with `compute_dtype`, `weights_dtype` and `delta_modules` (`T5Config`,
  `moe_jax.models.causal.CausalLMConfig`). The optional bias is part of the frozen backbone, so the experts' update
  (a function of x alone) is the same with or without it.

  D (`delta`) holds a merged update of ~1e-3 |W|: folded into W it would be rounded to W's bf16 grid (relative
  step 2^-8), which erases it where W is already on that grid (a bf16 checkpoint) and leaves it as rounding noise
  elsewhere; as its own matrix its bf16 rounding is relative to the update, and both products accumulate in float32.
  """

  features: int
  axes: tuple[str, str]
  config: T5Config
  experts: ExpertConfig | None = None
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, routing_ids: Array | None = None) -> Array:
    cfg = self.config
    d_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (d_in, self.features), cfg.weights_dtype)
    x = x.astype(cfg.compute_dtype)
    y = jnp.dot(x, kernel.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), cfg.weights_dtype)
      y = y + bias.astype(jnp.float32)
    if cfg.delta_modules and re.fullmatch(cfg.delta_modules, module_path(self)):
      delta = self.param("delta", nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                         (d_in, self.features), jnp.float32)
      y = y + jnp.dot(x, delta.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    if has_experts(self.experts, module_path(self)):
      y = self._experts(x, d_in, routing_ids, y)
    return y.astype(cfg.compute_dtype)

  def _experts(self, x: Array, d_in: int, routing_ids: Array | None, y: Array) -> Array:
    """y plus the routed experts' update (added by the routed computation: the CPU kernel adds in place)."""
    ex = self.experts
    in_axis, out_axis = self.axes
    dtype = self.config.weights_dtype
    a = self.param("lora_a", nn.with_logical_partitioning(nn.initializers.normal(ex.init_std),
                                                          ("expert", in_axis, "lora_rank")),
                   (ex.num_experts, d_in, ex.rank), dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("expert", "lora_rank", out_axis)),
                   (ex.num_experts, ex.rank, self.features), dtype)
    vectors = self.param("router", nn.with_logical_partitioning(nn.initializers.zeros, ("expert", in_axis)),
                         (ex.num_experts, d_in), dtype)
    router = ex.router if ex.router is not None else Uniform()
    routing = router(x, vectors, routing_ids)
    routing = routing._replace(weights=routing.weights / ex.rank)
    return routed_lora(x, a, b, routing, ex.impl, base=y)
