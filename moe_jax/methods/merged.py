"""Merged Experts: fold N LoRA experts into the backbone weights, W += sum_i w_i A_i B_i / r.

The result is an ordinary backbone (no expert leaves) that runs with `Transformer(config, None)` at the backbone's
cost: the baseline of averaging experts in weight space instead of routing among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import experts as ex

Params = dict[str, Any]


def merge_into_backbone(backbone: Params, experts_tree: Params, weights: Sequence[float] | None = None) -> Params:
  """`backbone` (expert leaves, if any, are dropped) with every expert module's kernel += sum_i w_i A_i B_i / r.

  `weights` [N] default to uniform 1/N. The update is computed in float32 (HIGHEST precision) and added to the
  kernel in float32, then cast back to the kernel's dtype. Raises ValueError for a module the backbone lacks or
  a weight count that is not N.
  """
  backbone, _ = ex.split(backbone)
  flat = flax.traverse_util.flatten_dict(backbone)
  experts = flax.traverse_util.flatten_dict(experts_tree)
  modules = sorted(key[:-1] for key in experts if key[-1] == "lora_a")
  if not modules:
    raise ValueError("merge_into_backbone: the expert tree has no lora_a leaves")
  num_experts = experts[modules[0] + ("lora_a",)].shape[0]
  w = np.full((num_experts,), 1.0 / num_experts) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (num_experts,):
    raise ValueError(f"merge_into_backbone: {w.size} weights for {num_experts} experts")
  w = jnp.asarray(w, jnp.float32)
  for module in modules:
    a, b = experts[module + ("lora_a",)], experts[module + ("lora_b",)]
    kernel_key = module + ("kernel",)
    if kernel_key not in flat:
      raise ValueError(f"merge_into_backbone: the backbone has no {'/'.join(kernel_key)}")
    kernel = flat[kernel_key]
    if a.shape[0] != num_experts or (a.shape[1], b.shape[2]) != tuple(kernel.shape):
      raise ValueError(f"merge_into_backbone: expert {'/'.join(module)} is A{list(a.shape)} B{list(b.shape)}, "
                       f"kernel {list(kernel.shape)}, {num_experts} experts expected")
    flat[kernel_key] = _merged_kernel(kernel, a, b, w)
  return flax.traverse_util.unflatten_dict(flat)


@jax.jit
def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
  rank = a.shape[-1]
  delta = jnp.einsum("e,edr,ero->do", w, a.astype(jnp.float32), b.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST) / rank
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
