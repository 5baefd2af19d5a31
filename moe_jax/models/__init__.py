"""Model layer: T5X-style encoder-decoder, LoRA experts, routers and routed computation (no TensorFlow)."""

from moe_jax.models.config import PHATGOOSE_MODULES, ExpertConfig, T5Config
from moe_jax.models.routers import Fixed, Phatgoose, Router, Routing, SigmoidGate, Uniform
from moe_jax.models.t5 import Transformer

__all__ = [
    "PHATGOOSE_MODULES", "ExpertConfig", "T5Config", "Fixed", "Phatgoose", "Router", "Routing", "SigmoidGate",
    "Uniform", "Transformer",
]
