"""Shared by the benchmarks: presets under flags, and random parameters made on device leaf by leaf (no full-model
init to compile)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util


def apply_preset(args: Any, preset: dict[str, Any]) -> None:
  """Fill the flags left unset (None) from the preset: flags given on the command line win."""
  for name, value in preset.items():
    if getattr(args, name, None) is None:
      setattr(args, name, value)


def random_params(abstract_params: Any, d_kv: int, seed: int) -> dict[str, Any]:
  """Random values for a (boxed or plain) abstract parameter tree: kernels and LoRA factors N(0, 1/fan_in)
  (queries also / sqrt(d_kv), as T5X folds the attention scale into them) so activations stay O(1) through many
  layers; norm scales 1; router vectors, embeddings and position biases N(0, 1). Never zeros: timing on zeros
  can flatter a kernel, and zero LoRA B would hide wrong routing."""
  shapes = traverse_util.flatten_dict(nn.unbox(abstract_params))
  key = jax.random.key(seed, impl="rbg")  # cheap to compile, unlike threefry at these sizes
  params = {}
  for i, (path, leaf) in enumerate(shapes.items()):
    name = path[-1]
    if name == "scale":
      params[path] = jnp.ones(leaf.shape, leaf.dtype)
      continue
    fan_in = {"kernel": leaf.shape[0], "lora_a": leaf.shape[1], "lora_b": leaf.shape[1]}.get(name, 1)
    std = fan_in**-0.5 / (d_kv**0.5 if "query" in path and name in ("kernel", "lora_a") else 1.0)
    params[path] = _normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, std)
  return traverse_util.unflatten_dict(params)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "std"))
def _normal(key, shape, dtype, std):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
