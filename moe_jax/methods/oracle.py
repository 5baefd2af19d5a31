"""Oracle routing: each example goes to the expert trained on its own task (an upper bound for routing among the
experts; a task without an expert of its own has no oracle score)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from moe_jax.errors import ConfigError
from moe_jax.methods.registry import Experts, Method, own_expert, register
from moe_jax.models.interface import build_model
from moe_jax.models.routers import Fixed


def oracle_expert(task: str, skills: Sequence[Sequence[str]]) -> int:
  """The first expert whose training tasks `skills[i]` hold `task` (or the task whose held-out template it is)."""
  found = own_expert(task, skills)
  if found is None:
    raise ConfigError(f"oracle routing: evaluation task {task!r} has no expert of its own (experts trained on "
                      f"{[list(s) for s in skills][:5]}...); leave 'oracle' out of the methods")
  return found


@register("oracle")
def build_oracle(experts: Experts) -> Method:
  ids = lambda task, examples: [oracle_expert(task, experts.expert_skills())] * len(examples)
  method = experts.method(build_model(experts.config, experts.layout(Fixed())), experts.with_experts, ids)
  return dataclasses.replace(method, diagnose=False)
