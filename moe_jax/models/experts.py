"""Expert parameters as a unit: add fresh experts to a backbone, split a tree into backbone and experts.

Expert leaves are the `lora_a`, `lora_b` and `router` parameters of the modules that `ExpertConfig.modules` selects;
everything else is the (frozen) backbone. Trees here are plain nested dicts of arrays (the `params` collection,
unboxed), as `moe_jax.checkpoints.hf.load_hf_t5` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.t5 import Transformer

EXPERT_PARAMS = ("lora_a", "lora_b", "router")
Params = dict[str, Any]


def is_expert_param(path: tuple[str, ...]) -> bool:
  return path[-1] in EXPERT_PARAMS


def split(params: Params) -> tuple[Params, Params]:
  """(backbone, experts) of a full parameter tree."""
  flat = flax.traverse_util.flatten_dict(params)
  backbone = {k: v for k, v in flat.items() if not is_expert_param(k)}
  experts = {k: v for k, v in flat.items() if is_expert_param(k)}
  return flax.traverse_util.unflatten_dict(backbone), flax.traverse_util.unflatten_dict(experts)


def merge(backbone: Params, experts: Params) -> Params:
  """Inverse of `split`."""
  flat = flax.traverse_util.flatten_dict(backbone)
  flat.update(flax.traverse_util.flatten_dict(experts))
  return flax.traverse_util.unflatten_dict(flat)


def init_experts(config: T5Config, experts: ExpertConfig, rng: jax.Array) -> Params:
  """Fresh expert parameters only (A ~ N(0, init_std^2), B = 0, router vectors 0); the backbone init is traced but
  dead-code eliminated under jit, so this is cheap even for T5-XXL."""
  tokens = jnp.ones((1, 1), jnp.int32)

  def init() -> Params:
    params = nn.meta.unbox(Transformer(config, experts).init(rng, tokens, tokens, routing_ids=jnp.zeros((1,), jnp.int32)))["params"]
    return split(params)[1]

  return jax.jit(init)()


def add_experts(backbone: Params, config: T5Config, experts: ExpertConfig, rng: jax.Array) -> Params:
  """A backbone tree (e.g. a loaded Hugging Face T5) with `experts.num_experts` fresh experts on the chosen modules.

  Raises ValueError if the backbone already carries expert parameters or does not fit `config`.
  """
  flat = flax.traverse_util.flatten_dict(backbone)
  if any(is_expert_param(k) for k in flat):
    raise ValueError("add_experts: the backbone tree already has expert parameters; use `split` first")
  tokens = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens)))
  expected = flax.traverse_util.flatten_dict(shapes["params"])
  for key in sorted(set(expected) | set(flat)):
    if key not in flat or key not in expected or tuple(flat[key].shape) != tuple(expected[key].shape):
      found = tuple(flat[key].shape) if key in flat else "absent"
      want = tuple(expected[key].shape) if key in expected else "absent"
      raise ValueError(f"add_experts: backbone parameter {'/'.join(key)} is {found}, but {config.name} expects "
                       f"{want}")
  return merge(backbone, init_experts(config, experts, rng))


def stack(trees: Sequence[Params], names: Sequence[str]) -> Params:
  """Expert trees concatenated on the `expert` axis, in the given order (expert i of the result comes from the
  i-th tree). All trees must cover the same modules with the same shapes; the error names the odd one out."""
  if not trees:
    raise ValueError("stack: no expert trees given")
  flats = [flax.traverse_util.flatten_dict(t) for t in trees]
  first = flats[0]
  for name, flat in zip(names[1:], flats[1:]):
    for key in sorted(set(first) | set(flat)):
      if key not in flat or key not in first or tuple(flat[key].shape[1:]) != tuple(first[key].shape[1:]):
        found = tuple(flat[key].shape) if key in flat else "absent"
        want = tuple(first[key].shape) if key in first else "absent"
        raise ValueError(f"expert {name!r} does not match expert {names[0]!r} at {'/'.join(key)}: {found} vs {want}")
  return flax.traverse_util.unflatten_dict(
      {key: np.concatenate([np.asarray(flat[key]) for flat in flats], axis=0) for key in first})
