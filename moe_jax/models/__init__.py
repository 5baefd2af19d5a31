"""Model layer: a T5X-style encoder-decoder and decoder-only causal LMs (BLOOM, Llama family) behind one interface
(`interface`), LoRA experts, routers and routed computation (no TensorFlow)."""

from moe_jax.models.causal import CAUSAL_LM_MODULES, CausalLM, CausalLMConfig
from moe_jax.models.config import PHATGOOSE_MODULES, ExpertConfig, T5Config
from moe_jax.models.interface import build_model, is_decoder_only
from moe_jax.models.routers import Arrow, Fixed, Phatgoose, Router, Routing, SigmoidGate, Uniform
from moe_jax.models.t5 import Transformer

__all__ = [
    "Arrow", "CAUSAL_LM_MODULES", "CausalLM", "CausalLMConfig", "PHATGOOSE_MODULES", "ExpertConfig", "T5Config", "Fixed",
    "Phatgoose", "Router", "Routing", "SigmoidGate", "Uniform", "Transformer", "build_model", "is_decoder_only",
]
