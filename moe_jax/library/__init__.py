"""The expert library (MTTL-style): experts with their metadata and auxiliary data on local, in-memory, GCS or
Hugging Face Hub storage; `python -m moe_jax.library` lists, copies, removes, imports and exports them."""

from moe_jax.library.backends import open_store
from moe_jax.library.expert import Expert, ExpertInfo, check_name, make_expert, stack_experts
from moe_jax.library.library import CorruptExpertError, ExpertLibrary, ReadOnlyError, copy_library

__all__ = ["CorruptExpertError", "Expert", "ExpertInfo", "ExpertLibrary", "ReadOnlyError", "check_name",
           "copy_library", "make_expert", "open_store", "stack_experts"]
