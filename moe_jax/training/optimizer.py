"""Per-stage optimizers: which parameters train in each PHATGOOSE stage, AdamW on those only.

Frozen leaves go through `optax.set_to_zero()` (no state), so Adam moments exist only for the trainable leaves:
for expert or gate training on T5-XL that is megabytes of optimizer state instead of 2 x 12 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import gin
import jax
import optax

from moe_jax.errors import ConfigError
from moe_jax.models.experts import is_expert_param

STAGES = ("multitask", "expert", "gate")
_TRAINABLE: dict[str, Callable[[tuple[str, ...]], bool]] = {
    "multitask": lambda path: not is_expert_param(path),  # the backbone (a multitask model has no experts)
    "expert": lambda path: path[-1] in ("lora_a", "lora_b"),
    "gate": lambda path: path[-1] == "router",
}
TRAIN, FREEZE = "train", "freeze"


def trainable_mask(stage: str, params: Any) -> Any:
  """Tree of bools over the parameter dict's leaves (boxed or not): which ones `stage` trains."""
  if stage not in STAGES:
    raise ConfigError(f"unknown training stage {stage!r}; expected one of {STAGES}")
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: _TRAINABLE[stage](path) for path in flat}
  if not any(mask.values()):
    raise ConfigError(f"stage {stage!r} trains no parameter of this model (expert training needs lora_a/lora_b, "
                      "gate training router leaves: build the model with an ExpertConfig)")
  return flax.traverse_util.unflatten_dict(mask)


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen) subtrees of a parameter dict, by `mask`; `experts.merge(frozen, trainable)` inverts it."""
  flat, flat_mask = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(mask)
  pick = lambda keep: flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if flat_mask[k] == keep})
  return pick(True), pick(False)


def warmup_steps(warmup_fraction: float, total_steps: int) -> int:
  return math.ceil(warmup_fraction * total_steps)


def make_schedule(learning_rate: float, warmup_fraction: float, total_steps: int) -> optax.Schedule:
  """lr * min(step / W, 1) with W = ceil(warmup_fraction * total_steps): PHATGOOSE's linear warmup, then constant.

  As with HF's `get_constant_schedule_with_warmup`, the first update (step 0) has learning rate 0 when W > 0.
  """
  warmup = warmup_steps(warmup_fraction, total_steps)
  if warmup == 0:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                               optax.constant_schedule(learning_rate)], [warmup])


def _adamw(learning_rate, *, weight_decay: float, eps: float, b1: float, b2: float,
           clip: float) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  parts += [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
  return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


@gin.configurable(denylist=["stage", "params"])
def make_optimizer(stage: str, params: Any, learning_rate: float = 5e-3, weight_decay: float = 0.0,
                   eps: float = 1e-8, b1: float = 0.9, b2: float = 0.999, warmup_fraction: float = 0.06,
                   total_steps: int = 1000, clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (over the trainable leaves only) for the leaves `stage` trains; the rest get
  zero updates and no state. `params` (boxed or not) fixes the tree the optimizer applies to.

  The learning rate is an injected hyperparameter: `current_learning_rate(opt_state)` reads the last one used.
  """
  mask = trainable_mask(stage, params)
  labels = jax.tree.map(lambda m: TRAIN if m else FREEZE, mask)
  schedule = make_schedule(learning_rate, warmup_fraction, total_steps)
  inner = lambda learning_rate: _adamw(learning_rate, weight_decay=weight_decay, eps=eps, b1=b1, b2=b2, clip=clip)
  adamw = optax.inject_hyperparams(inner)(learning_rate=schedule)
  return optax.multi_transform({TRAIN: adamw, FREEZE: optax.set_to_zero()}, labels)


def current_learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate of the latest update (the schedule's value at the step before it), or None for an optimizer
  without an injected `learning_rate`."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate", None, lambda _, value: isinstance(value, jax.Array))
