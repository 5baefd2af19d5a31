"""moe_jax: modular language models (routed LoRA experts on a frozen T5X-style encoder-decoder) in JAX/Flax."""

__version__ = "0.1.0"
