"""PHATGOOSE routing: every token at every expert module goes to the top-k experts whose trained gate vectors best
match it (`moe_jax.models.routers.Phatgoose`: standardised token and gate, dot product / sqrt(d_in), softmax over
the k). The gates are the experts' own router vectors, trained by the gate stage."""

from __future__ import annotations

from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models.routers import Phatgoose


@register("phatgoose")
def build_phatgoose(experts: Experts) -> Method:
  return experts.routed(Phatgoose(k=experts.top_k))
