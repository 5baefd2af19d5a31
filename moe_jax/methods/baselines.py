"""The two methods that need no method of their own: the multitask model (a separate model trained on every task
at once, or the backbone itself) and uniform routing (every expert, weighted equally: the mean of their outputs)."""

from __future__ import annotations

from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models.interface import build_model
from moe_jax.models.routers import Uniform


@register("multitask")
def build_multitask(experts: Experts) -> Method:
  params = experts.backbone if experts.multitask is None else experts.multitask
  return experts.method(build_model(experts.config), params)


@register("uniform")
def build_uniform(experts: Experts) -> Method:
  return experts.routed(Uniform())
