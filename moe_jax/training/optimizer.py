"""Per-stage optimizers: which parameters train in each PHATGOOSE stage, AdamW on those only.

Frozen leaves go through `optax.set_to_zero()` (no state), so Adam moments exist only for the trainable leaves:
for expert or gate training on T5-XL that is megabytes of optimizer state instead of 2 x 12 GB.

The task-level MoE (`moe_jax.models.taskmoe`) has two stages: `taskmoe_stage1` trains everything (layer copies,
shared embeddings, routers, task embeddings), `taskmoe_stage2` everything but `router/` (the routers and task
embeddings stage 1 learnt stay bit-identical). The seed gives routers and task embeddings their own learning rates
(`taskmoe_learning_rates`) under one global gradient-norm clip, and decays all of them linearly to 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import flax
import gin
import jax
import optax

from moe_jax.errors import ConfigError
from moe_jax.models.experts import is_expert_param

TASKMOE_STAGES = ("taskmoe_stage1", "taskmoe_stage2")
STAGES = ("multitask", "expert", "gate") + TASKMOE_STAGES
TASKMOE_ROUTER = "router"  # the TaskMoE's top-level collection of routers and task embeddings
_TRAINABLE: dict[str, Callable[[tuple[str, ...]], bool]] = {
    "multitask": lambda path: not is_expert_param(path),  # the backbone (a multitask model has no experts)
    "expert": lambda path: path[-1] in ("lora_a", "lora_b"),
    "gate": lambda path: path[-1] == "router",
    "taskmoe_stage1": lambda path: not is_expert_param(path),  # copies, shared weights, routers, task embeddings
    "taskmoe_stage2": lambda path: path[0] != TASKMOE_ROUTER,  # routers and task embeddings frozen
}
TRAIN, FREEZE = "train", "freeze"
ROUTER, TASK_EMBEDDING = "router", "task_embedding"  # TaskMoE's own learning-rate groups


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


@gin.configurable
def taskmoe_learning_rates(router: float | None = None, task_embedding: float | None = None,
                           linear_decay: bool = True) -> dict[str, Any]:
  """TaskMoE stages' own settings: the learning rate of the router MLPs (`router/*` but the task embeddings) and of
  the task embedding table (None: `make_optimizer.learning_rate`, as the rest), and whether every rate decays
  linearly to 0 at `total_steps` after the warmup (the seed's `get_linear_schedule_with_warmup`) rather than
  staying constant. Seed: lr 1e-5, router_lr 1e-3, task_model_lr 1e-3 (cli_heterogenous.py defaults; 1e-2 in
  example_scripts/train_routing_bart.sh). Kept out of `make_optimizer`'s arguments so that the records of the
  other stages' products (`loop.stage_record`) do not change."""
  for name, value in (("router", router), ("task_embedding", task_embedding)):
    if value is not None and value < 0:
      raise ConfigError(f"taskmoe_learning_rates.{name}={value} must be >= 0 or None")
  return {"router": router, "task_embedding": task_embedding, "linear_decay": linear_decay}


def _taskmoe_label(path: tuple[str, ...], rates: dict[str, Any]) -> str:
  if path[0] != TASKMOE_ROUTER:
    return TRAIN
  if path[-1] == "task_embedding":
    return TASK_EMBEDDING if rates["task_embedding"] is not None else TRAIN
  return ROUTER if rates["router"] is not None else TRAIN


def warmup_steps(warmup_fraction: float, total_steps: int) -> int:
  return math.ceil(warmup_fraction * total_steps)


def make_schedule(learning_rate: float, warmup_fraction: float, total_steps: int,
                  linear_decay: bool = False) -> optax.Schedule:
  """lr * min(step / W, 1) with W = ceil(warmup_fraction * total_steps): PHATGOOSE's linear warmup, then constant.

  As with HF's `get_constant_schedule_with_warmup`, the first update (step 0) has learning rate 0 when W > 0.
  `linear_decay`: after the warmup, lr * (total_steps - step) / (total_steps - W), HF's
  `get_linear_schedule_with_warmup` (Task-level MoE's schedule).
  """
  warmup = warmup_steps(warmup_fraction, total_steps)
  if linear_decay:
    decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))
    return decay if warmup == 0 else optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), decay],
                                                          [warmup])
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
  if stage in TASKMOE_STAGES:
    return _taskmoe_optimizer(mask, learning_rate, warmup_fraction, total_steps, clip,
                              dict(weight_decay=weight_decay, eps=eps, b1=b1, b2=b2))
  labels = jax.tree.map(lambda m: TRAIN if m else FREEZE, mask)
  schedule = make_schedule(learning_rate, warmup_fraction, total_steps)
  inner = lambda learning_rate: _adamw(learning_rate, weight_decay=weight_decay, eps=eps, b1=b1, b2=b2, clip=clip)
  adamw = optax.inject_hyperparams(inner)(learning_rate=schedule)
  return optax.multi_transform({TRAIN: adamw, FREEZE: optax.set_to_zero()}, labels)


def _taskmoe_optimizer(mask: Any, learning_rate: float, warmup_fraction: float, total_steps: int, clip: float,
                       adam: dict[str, float]) -> optax.GradientTransformation:
  """AdamW per learning-rate group (the rest, routers, task embeddings; `taskmoe_learning_rates`) after one
  gradient-norm clip over all of them, as the seed clips `all_parameters` once and steps one AdamW with parameter
  groups. Each group's rate is injected under its own name (`learning_rate`, `router_learning_rate`, ...), so
  `current_learning_rate` reads the main one."""
  rates = taskmoe_learning_rates()
  flat = flax.traverse_util.flatten_dict(mask)
  labels = flax.traverse_util.unflatten_dict({path: _taskmoe_label(path, rates) if trainable else FREEZE
                                              for path, trainable in flat.items()})
  group_rates = {TRAIN: learning_rate, ROUTER: rates["router"], TASK_EMBEDDING: rates["task_embedding"]}
  used = set(jax.tree.leaves(labels))
  transforms = {FREEZE: optax.set_to_zero()}
  for group in (TRAIN, ROUTER, TASK_EMBEDDING):
    if group in used:
      name = "learning_rate" if group == TRAIN else f"{group}_learning_rate"
      schedule = make_schedule(group_rates[group], warmup_fraction, total_steps, rates["linear_decay"])
      transforms[group] = optax.inject_hyperparams(_named_adamw(name, adam))(**{name: schedule})
  inner = optax.multi_transform(transforms, labels)
  return optax.chain(optax.clip_by_global_norm(clip), inner) if clip > 0 else inner


def _named_adamw(name: str, adam: dict[str, float]) -> Callable[..., optax.GradientTransformation]:
  """An AdamW factory whose one argument (the learning rate) is called `name`, for `inject_hyperparams`."""
  def factory(**kwargs: Any) -> optax.GradientTransformation:
    return _adamw(kwargs[name], clip=0.0, **adam)

  factory.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY)])
  return factory


def current_learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate of the latest update (the schedule's value at the step before it), or None for an optimizer
  without an injected `learning_rate`."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate", None, lambda _, value: isinstance(value, jax.Array))
