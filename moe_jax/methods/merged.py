"""Merged Experts: N LoRA experts averaged in weight space and run at (about) the backbone's cost, no routing.

PHATGOOSE's sources give two merges, both here under plain names:
- `merge_into_backbone`, the paper's Merged Experts: the (weighted) mean of the products, W + sum_i w_i A_i B_i / r.
  It equals uniform routing (the mean of the experts' outputs) exactly, as LoRA updates are linear. In float32
  compute the update is folded into the kernel; in bf16 compute an update of ~1e-3 |W| folded into W is rounded
  to W's bf16 grid (erased where W is already on it, as in a bf16 checkpoint), so it is kept as a separate
  float32 `delta` beside the kernel (`T5Config.delta_modules`, see `moe_jax.models.lora.Linear`).
  `merged_experts` makes that choice from the config.
- `average_factors`, the released code's `average_lora_weights`: the mean of the A's and the mean of the B's
  separately, one expert of rank r; W + mean(A) mean(B) / r, which is not the mean of the products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import experts as ex
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models.interface import build_model
from moe_jax.models.config import T5Config

Params = dict[str, Any]


def merge_into_backbone(backbone: Params, experts_tree: Params, weights: Sequence[float] | None = None,
                        keep_delta: bool = False) -> Params:
  """`backbone` (expert leaves, if any, are dropped) with every expert module's update sum_i w_i A_i B_i / r.

  `weights` [N] default to uniform 1/N. The update is computed in float32 (HIGHEST precision). By default it is
  added to the kernel in float32, then cast back to the kernel's dtype; with `keep_delta` the kernels are
  untouched and the update is added to the module's float32 `delta` leaf (created if absent), to run with
  `delta_config`. Raises ValueError for a module the backbone lacks or a weight count that is not N.
  """
  backbone, _ = ex.split(backbone)
  flat = flax.traverse_util.flatten_dict(backbone)
  experts = flax.traverse_util.flatten_dict(experts_tree)
  modules = _modules(experts, "merge_into_backbone")
  w = _weights(weights, experts[modules[0] + ("lora_a",)].shape[0], "merge_into_backbone")
  for module in modules:
    a, b = experts[module + ("lora_a",)], experts[module + ("lora_b",)]
    kernel_key = module + ("kernel",)
    if kernel_key not in flat:
      raise ValueError(f"merge_into_backbone: the backbone has no {'/'.join(kernel_key)}")
    kernel = flat[kernel_key]
    if a.shape[0] != w.shape[0] or (a.shape[1], b.shape[2]) != tuple(kernel.shape):
      raise ValueError(f"merge_into_backbone: expert {'/'.join(module)} is A{list(a.shape)} B{list(b.shape)}, "
                       f"kernel {list(kernel.shape)}, {w.shape[0]} experts expected")
    if keep_delta:
      flat[module + ("delta",)] = flat.get(module + ("delta",), 0.0) + _jit_update(a, b, w)
    else:
      flat[kernel_key] = _merged_kernel(kernel, a, b, w)
  return flax.traverse_util.unflatten_dict(flat)


def delta_config(config: T5Config, params: Params) -> T5Config:
  """`config` whose `delta_modules` are exactly the modules of `params` that have a `delta` leaf."""
  flat = flax.traverse_util.flatten_dict(params)
  return dataclasses.replace(config, delta_modules=ex.exact_modules(["/".join(k[:-1]) for k in flat
                                                                     if k[-1] == "delta"]))


def merged_experts(config: T5Config, backbone: Params, experts_tree: Params,
                   weights: Sequence[float] | None = None) -> tuple[T5Config, Params]:
  """(config, params) of the paper's Merged Experts, to run with `Transformer(config)`: the update folded into
  the kernels when `config` computes in float32 or wider (the backbone's cost), kept as `delta` leaves when it
  computes in a narrower dtype (one more matmul per expert module)."""
  keep_delta = jnp.finfo(config.compute_dtype).bits < 32
  params = merge_into_backbone(backbone, experts_tree, weights, keep_delta=keep_delta)
  return delta_config(config, params), params


def average_factors(experts_tree: Params, weights: Sequence[float] | None = None) -> Params:
  """A one-expert tree with A = sum_i w_i A_i and B = sum_i w_i B_i per module (`weights` default to 1/N) and zero
  router vectors: the released PHATGOOSE code's `average_lora_weights`. Run it as plain LoRA on the backbone,
  `ExpertConfig(num_experts=1, router=Uniform())` on the same modules and rank (the routed path, float32 update).
  Note mean(A) mean(B) != mean(A B): this is not `merge_into_backbone`."""
  experts = flax.traverse_util.flatten_dict(experts_tree)
  modules = _modules(experts, "average_factors")
  w = _weights(weights, experts[modules[0] + ("lora_a",)].shape[0], "average_factors")
  out = {}
  for module in modules:
    a, b = experts[module + ("lora_a",)], experts[module + ("lora_b",)]
    out[module + ("lora_a",)] = _average(a, w)
    out[module + ("lora_b",)] = _average(b, w)
    out[module + ("router",)] = jnp.zeros((1, a.shape[1]), a.dtype)
  return flax.traverse_util.unflatten_dict(out)


def _modules(experts: dict[tuple[str, ...], Any], caller: str) -> list[tuple[str, ...]]:
  modules = sorted(key[:-1] for key in experts if key[-1] == "lora_a")
  if not modules:
    raise ValueError(f"{caller}: the expert tree has no lora_a leaves")
  return modules


def _weights(weights: Sequence[float] | None, num_experts: int, caller: str) -> jax.Array:
  w = np.full((num_experts,), 1.0 / num_experts) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (num_experts,):
    raise ValueError(f"{caller}: {w.size} weights for {num_experts} experts")
  return jnp.asarray(w, jnp.float32)


def _update(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
  """float32 [d_in, d_out] sum_i w_i A_i B_i / r."""
  return jnp.einsum("e,edr,ero->do", w, a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST) / a.shape[-1]


_jit_update = jax.jit(_update)


@jax.jit
def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
  return (kernel.astype(jnp.float32) + _update(a, b, w)).astype(kernel.dtype)


@jax.jit
def _average(factor: jax.Array, w: jax.Array) -> jax.Array:
  """[E, ...] -> [1, ...] sum_i w_i factor_i, in float32, cast back to the factor's dtype."""
  return jnp.einsum("e,e...->...", w, factor.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)[None].astype(factor.dtype)


@register("merged")
def build_merged(experts: Experts) -> Method:
  """The paper's Merged Experts: W + mean_i A_i B_i / r, kept apart from W under bf16."""
  config, params = merged_experts(experts.config, experts.backbone, experts.moe_tree)
  return experts.method(build_model(config), params)


@register("merged_factors")
def build_merged_factors(experts: Experts) -> Method:
  """PHATGOOSE's released average_lora_weights and MTTL's uniform merge: the mean A and the mean B, one LoRA."""
  return experts.method(build_model(experts.config, experts.single()),
                        ex.merge(experts.backbone, average_factors(experts.moe_tree)))
