"""A task-level MoE's checkpoint: every parameter (layer copies, shared weights, routers, task embeddings) in one
orbax directory, with a JSON record that says how to rebuild and check it: the T5 and TaskMoE configs, the
backbone it was expanded from (`Backbone.record()`, whose vocabulary it uses), its weights' checksum and the run
that made it. The stages of `moe_jax.training.loop` write it as their product (`<model_dir>/taskmoe`); the stage-2
command (`moe_jax.taskmoe.stage2`) writes the stage-2 starting point in the same format. Writes are atomic (orbax
writes a temporary directory and renames it when done).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from moe_jax import fs
from moe_jax.checkpoints.identity import weights_checksum
from moe_jax.errors import MismatchError, MissingFileError
from moe_jax.models.config import T5Config
from moe_jax.models.taskmoe import TaskMoE, TaskMoEConfig

TASKMOE_DIR = "taskmoe"


def checkpoint_dir(path: str) -> str:
  """A TaskMoE checkpoint directory: `path` itself, or the `taskmoe/` of a stage's model_dir."""
  inner = fs.join(path, TASKMOE_DIR)
  return inner if fs.isdir(inner) else path


def save_taskmoe(directory: str, params: Any, config: T5Config, moe: TaskMoEConfig,
                 record: dict[str, Any] | None = None) -> None:
  """Save `params` (unboxed, host or device) with the configs and `record` (backbone, stage, ...)."""
  metadata = {"model_name": config.name, "fingerprint": config.fingerprint(), "model": dataclasses.asdict(config),
              "taskmoe": dataclasses.asdict(moe), "weights": weights_checksum(params), **(record or {})}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(fs.absolute(directory), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True)


def read_metadata(path: str) -> dict[str, Any]:
  """The JSON record of a TaskMoE checkpoint (or of a model_dir holding one)."""
  directory = fs.absolute(checkpoint_dir(path))
  if not fs.isdir(fs.join(directory, "metadata")):
    raise MissingFileError(f"no TaskMoE checkpoint in {path} (expected a taskmoe stage's model_dir, its "
                           f"{TASKMOE_DIR}/, or the output of python -m moe_jax.taskmoe.stage2)")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(directory, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def configs(metadata: dict[str, Any]) -> tuple[T5Config, TaskMoEConfig]:
  """The T5 and TaskMoE configs a checkpoint was saved with."""
  return T5Config(**metadata["model"]), TaskMoEConfig(**metadata["taskmoe"])


def load_taskmoe(path: str, shardings: Any = None) -> tuple[Any, dict[str, Any]]:
  """(params, metadata) of a TaskMoE checkpoint, restored to the saved configs' shapes (placed per `shardings`,
  a tree of shardings of those params, when given); a damaged checkpoint (checksum) is an error."""
  metadata = read_metadata(path)
  config, moe = configs(metadata)
  abstract = nn.meta.unbox(_abstract_params(TaskMoE(config, moe)))
  if shardings is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  directory = fs.absolute(checkpoint_dir(path))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    params = checkpointer.restore(directory, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))["params"]
  if metadata.get("weights") not in (None, weights_checksum(params)):
    raise MismatchError(f"TaskMoE checkpoint {directory}: its weights' checksum differs from the one it was saved "
                        "with; the checkpoint is damaged")
  return params, metadata


def _abstract_params(model: TaskMoE) -> Any:
  from moe_jax.training import partitioning as part  # pylint: disable=g-import-not-at-top

  return part.abstract_params(model)
