"""Expert parameters as a unit: add fresh experts to a backbone, split a tree into backbone and experts.

Expert leaves are the `lora_a`, `lora_b` and `router` parameters of the modules that `ExpertConfig.modules` selects;
everything else is the (frozen) backbone. Trees here are plain nested dicts of arrays (the `params` collection,
unboxed), as `moe_jax.checkpoints.hf.load_hf_t5` returns them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import ConfigError, MismatchError
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.interface import build_model

EXPERT_PARAMS = ("lora_a", "lora_b", "router")
Params = dict[str, Any]


def is_expert_param(path: tuple[str, ...]) -> bool:
  return path[-1] in EXPERT_PARAMS


def layout(expert_tree: Params) -> tuple[list[str], int, int]:
  """(sorted module paths, number of experts, rank) of a tree holding expert leaves."""
  flat = flax.traverse_util.flatten_dict(expert_tree)
  modules = sorted("/".join(key[:-1]) for key in flat if key[-1] == "lora_a")
  if not modules:
    raise MismatchError("the tree has no lora_a leaves")
  num_experts, _, rank = flat[tuple(modules[0].split("/")) + ("lora_a",)].shape
  return modules, int(num_experts), int(rank)


def exact_modules(paths: Sequence[str]) -> str:
  """A regex that fullmatches exactly these module paths (escaped alternation, sorted), e.g. for
  `ExpertConfig.modules` or `T5Config.delta_modules`."""
  return "|".join(re.escape(p) for p in sorted(paths))


def layout_config(modules: Sequence[str], num_experts: int, rank: int,
                  base: ExpertConfig | None = None) -> ExpertConfig:
  """The ExpertConfig of an expert file: experts on exactly `modules`, with the file's count and rank; router,
  impl and init_std from `base`. Taking the layout from the file rather than gin means a narrower or wider
  `base.modules` cannot drop or invent experts. Raises ValueError for an empty module list."""
  if not modules:
    raise ConfigError("layout_config: no modules given")
  return dataclasses.replace(base or ExpertConfig(), modules=exact_modules(modules), num_experts=num_experts,
                             rank=rank)


def first_mismatch(found: Params, expected: Params, skip_leading: bool = False) -> tuple[str, Any, Any] | None:
  """(path, found shape, expected shape) of the first leaf, in path order, that is absent on one side ("absent")
  or shaped differently; None if the trees fit. `skip_leading` ignores the first (expert) axis."""
  found, expected = flax.traverse_util.flatten_dict(found), flax.traverse_util.flatten_dict(expected)
  shape = lambda tree, key: "absent" if key not in tree else tuple(tree[key].shape)
  for key in sorted(set(found) | set(expected)):
    a, b = shape(found, key), shape(expected, key)
    if a == "absent" or b == "absent" or (a[1:] != b[1:] if skip_leading else a != b):
      return "/".join(key), a, b
  return None


def split(params: Params) -> tuple[Params, Params]:
  """(backbone, experts) of a full parameter tree."""
  flat = flax.traverse_util.flatten_dict(params)
  backbone = {k: v for k, v in flat.items() if not is_expert_param(k)}
  experts = {k: v for k, v in flat.items() if is_expert_param(k)}
  return flax.traverse_util.unflatten_dict(backbone), flax.traverse_util.unflatten_dict(experts)


def merge(backbone: Params, experts: Params) -> Params:
  """`backbone` with the leaves of `experts` added or replaced (the inverse of `split`; any two subtrees)."""
  flat = flax.traverse_util.flatten_dict(backbone)
  flat.update(flax.traverse_util.flatten_dict(experts))
  return flax.traverse_util.unflatten_dict(flat)


def init_experts(config: T5Config, experts: ExpertConfig, rng: jax.Array) -> Params:
  """Fresh expert parameters only (A ~ N(0, init_std^2), B = 0, router vectors 0); the backbone init is traced but
  dead-code eliminated under jit, so this is cheap even for T5-XXL."""
  tokens = jnp.ones((1, 1), jnp.int32)

  def init() -> Params:
    params = nn.meta.unbox(build_model(config, experts).init(rng, tokens, tokens, routing_ids=jnp.zeros((1,), jnp.int32)))["params"]
    return split(params)[1]

  return jax.jit(init)()


def add_experts(backbone: Params, config: T5Config, experts: ExpertConfig, rng: jax.Array) -> Params:
  """A backbone tree (e.g. a loaded Hugging Face T5) with `experts.num_experts` fresh experts on the chosen modules.

  Raises ValueError if the backbone already carries expert parameters or does not fit `config`.
  """
  if any(is_expert_param(k) for k in flax.traverse_util.flatten_dict(backbone)):
    raise ValueError("add_experts: the backbone tree already has expert parameters; use `split` first")
  tokens = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(build_model(config).init(jax.random.PRNGKey(0), tokens, tokens)))
  mismatch = first_mismatch(backbone, shapes["params"])
  if mismatch:
    path, found, want = mismatch
    raise MismatchError(f"add_experts: backbone parameter {path} is {found}, but {config.name} expects {want}")
  return merge(backbone, init_experts(config, experts, rng))


def stack(trees: Sequence[Params], names: Sequence[str]) -> Params:
  """Expert trees concatenated on the `expert` axis, in the given order (expert i of the result comes from the
  i-th tree). All trees must cover the same modules with the same shapes; the error names the odd one out."""
  if not trees:
    raise ConfigError("stack: no expert trees given")
  for name, tree in zip(names[1:], trees[1:]):
    mismatch = first_mismatch(tree, trees[0], skip_leading=True)
    if mismatch:
      raise MismatchError(f"expert {name!r} does not match expert {names[0]!r} at {mismatch[0]}: {mismatch[1]} vs "
                          f"{mismatch[2]}")
  flats = [flax.traverse_util.flatten_dict(t) for t in trees]
  return flax.traverse_util.unflatten_dict(
      {key: np.concatenate([np.asarray(flat[key]) for flat in flats], axis=0) for key in flats[0]})
