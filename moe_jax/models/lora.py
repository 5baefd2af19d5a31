"""Linear layer that may carry E LoRA experts with router vectors (the unit PHATGOOSE works on).

Parameters of an expert module at path P (T5X names, stacked on the `expert` axis):
  P/kernel  [d_in, d_out]      the frozen backbone weight
  P/lora_a  [E, d_in, r]       N(0, init_std^2)
  P/lora_b  [E, r, d_out]      zeros
  P/router  [E, d_in]          zeros; the sigmoid gate's v during gate training, the router vector afterwards
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
  """y = x W (+ routed LoRA when this module's path matches `experts.modules`)."""

  features: int
  axes: tuple[str, str]
  config: T5Config
  experts: ExpertConfig | None = None
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

  @nn.compact
  def __call__(self, x: Array, routing_ids: Array | None = None) -> Array:
    cfg = self.config
    d_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (d_in, self.features), cfg.weights_dtype)
    x = x.astype(cfg.compute_dtype)
    y = jnp.dot(x, kernel.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    if has_experts(self.experts, module_path(self)):
      y = y + self._experts(x, d_in, routing_ids)
    return y.astype(cfg.compute_dtype)

  def _experts(self, x: Array, d_in: int, routing_ids: Array | None) -> Array:
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
    return routed_lora(x, a, b, routing, ex.impl)
