"""Oracle routing: each example goes to the expert of its own task (an upper bound for routing among the experts;
a task without an expert of its own has no oracle score)."""

from __future__ import annotations

from collections.abc import Sequence

from moe_jax.errors import ConfigError
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.methods.routing import skill_of
from moe_jax.models.interface import build_model
from moe_jax.models.routers import Fixed


def oracle_expert(task: str, expert_tasks: Sequence[str]) -> int:
  """The expert of `task` (or of the task whose held-out template it is)."""
  if skill_of(task) not in expert_tasks:
    raise ConfigError(f"oracle routing: evaluation task {task!r} has no expert of its own (experts: "
                      f"{list(expert_tasks)[:5]}...); leave 'oracle' out of the methods")
  return list(expert_tasks).index(skill_of(task))


@register("oracle")
def build_oracle(experts: Experts) -> Method:
  ids = lambda task, examples: [oracle_expert(task, experts.expert_tasks)] * len(examples)
  return experts.method(build_model(experts.config, experts.layout(Fixed())), experts.with_experts, ids)
