"""Training: mesh and logical sharding rules, per-stage optimizers, the sharded train step, checkpoints."""

from moe_jax.training.checkpointing import (Checkpointer, checkpoint_metadata, expert_metadata, load_experts,
                                            save_experts)
from moe_jax.training.optimizer import STAGES, make_optimizer, make_schedule, trainable_mask
from moe_jax.training.partitioning import DEFAULT_RULES, axis_rules, make_mesh, shard_batch
from moe_jax.training.train_step import TrainState, create_train_state, make_eval_loss, make_train_step

__all__ = [
    "Checkpointer", "checkpoint_metadata", "expert_metadata", "load_experts", "save_experts", "STAGES",
    "make_optimizer", "make_schedule", "trainable_mask", "DEFAULT_RULES", "axis_rules", "make_mesh", "shard_batch",
    "TrainState", "create_train_state", "make_eval_loss", "make_train_step",
]
