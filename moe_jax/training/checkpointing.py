"""Training checkpoints (orbax) and small expert files.

A training checkpoint holds what the run changes: the stage's trainable parameters, the optimizer state (Adam
moments exist only for those), the data position and a JSON metadata item. The frozen backbone is not copied into
every step; it comes back from where it was loaded. Orbax writes each step to `<step>.orbax-checkpoint-tmp` and
renames it when complete (on GCS: marks it with a commit file), so an interrupted save is never listed as a step.

An expert file is one safetensors file with the `lora_a`/`lora_b`/`router` leaves and JSON metadata, written to a
temporary name and renamed into place: the unit that expert libraries, routing and merging work on.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import flax
import gin
import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy for safetensors
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from moe_jax import fs
from moe_jax.errors import MismatchError, MissingFileError
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.training import optimizer as opt
from moe_jax.training.train_step import TrainState

_ITEMS = ("trainable", "opt_state", "data_position", "metadata")
EXPERT_FILE = "expert.safetensors"  # an expert or gate run's product, inside its model_dir
# Metadata that must match for a checkpoint to restore into this run, besides the fingerprint. The stage's other
# settings may change on resume (e.g. more steps); its product then records the settings of the run that ends it.
_MUST_MATCH = ("stage", "expert_modules", "rank", "num_experts", "task", "backbone_weights", "vocabulary")
_EXPERT_METADATA_KEY = "moe_jax_experts"


def checkpoint_metadata(stage: str, config: T5Config, experts: ExpertConfig | None, task: str,
                        backbone: dict[str, Any] | None = None,
                        stage_config: dict[str, Any] | None = None) -> dict[str, Any]:
  """What identifies a run's checkpoints: restoring checks the model fingerprint, stage, expert layout, task and
  the backbone's weights and vocabulary (`Backbone.record()`); `stage_config` is kept for the record."""
  return {
      "backbone_weights": None if backbone is None else backbone["weights"],
      "vocabulary": None if backbone is None else backbone["vocabulary"],
      "config": stage_config,
      "stage": stage,
      "model_name": config.name,
      "fingerprint": config.fingerprint(),
      "expert_modules": None if experts is None else experts.modules,
      "rank": None if experts is None else experts.rank,
      "num_experts": None if experts is None else experts.num_experts,
      "task": task,
  }


def _check_fingerprint(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
  if found.get("fingerprint") != expected["fingerprint"]:
    raise MismatchError(f"{where} belongs to model {found.get('model_name')!r} (fingerprint {found.get('fingerprint')}), "
                     f"but this run's model is {expected['model_name']!r} (fingerprint {expected['fingerprint']})")


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and target shardings of a tree of arrays (or of ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@gin.configurable(denylist=["directory", "metadata"])
class Checkpointer:
  """Saves and restores one run's train states under `directory`; the caller decides when to save."""

  def __init__(self, directory: str | os.PathLike, metadata: dict[str, Any], max_to_keep: int | None = 3,
               async_save: bool = True):
    self.directory = fs.absolute(directory)  # orbax wants absolute paths; it writes gs:// itself
    self.metadata = metadata
    policy = None if max_to_keep is None else ocp.checkpoint_managers.LatestN(n=max_to_keep)
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    """The newest completely written step (None if there is none)."""
    return self._manager.latest_step()

  def save(self, state: TrainState, data_position: int) -> bool:
    """Save at `state.step`, with `data_position` = batches consumed so far. Returns once device arrays are copied
    (the write may continue in the background: `wait()` before exiting)."""
    trainable, _ = opt.partition(state.params, opt.trainable_mask(self.metadata["stage"], state.params))
    args = ocp.args.Composite(
        trainable=ocp.args.StandardSave(trainable),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data_position=ocp.args.JsonSave({"data_position": int(data_position)}),
        metadata=ocp.args.JsonSave(self.metadata))
    return self._manager.save(int(state.step), args=args)

  def read_metadata(self, step: int) -> dict[str, Any]:
    """The JSON metadata item of `step` (what `checkpoint_metadata` built for the run that wrote it)."""
    return self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

  def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, int]:
    """(state, data_position) of `step` (default: the latest). `template` is a state of this run (arrays or
    ShapeDtypeStructs with shardings) whose frozen parameters must be real arrays: they are kept as they are."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise MissingFileError(f"no complete checkpoint in {self.directory}")
    where = f"checkpoint {self.directory} step {step}"
    found = self.read_metadata(step)
    _check_fingerprint(found, self.metadata, where)
    for key in _MUST_MATCH:
      if found.get(key) != self.metadata.get(key):
        raise MismatchError(f"{where} has {key}={found.get(key)!r}, but this run has {key}={self.metadata.get(key)!r}: "
                            "resume it with the settings it was started with, or choose a new model_dir")
    trainable, frozen = opt.partition(template.params, opt.trainable_mask(self.metadata["stage"], template.params))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(_abstract(trainable)),
        opt_state=ocp.args.StandardRestore(_abstract(template.opt_state)),
        data_position=ocp.args.JsonRestore()))
    step_array = jax.device_put(np.asarray(step, np.int32), template.step.sharding)
    state = TrainState(step_array, ex.merge(frozen, restored["trainable"]), restored["opt_state"])
    return state, int(restored["data_position"]["data_position"])

  def wait(self) -> None:
    """Block until a background save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def expert_metadata(params: Any, model_config: T5Config, task: str, /, **extra: Any) -> dict[str, Any]:
  """Metadata of the expert leaves of `params`: base model, module paths, rank and expert count (from the arrays);
  `extra` adds the stage, the backbone record, the stage's settings (`config`) and whatever else a caller records."""
  modules, num_experts, rank = ex.layout(ex.split(params)[1])
  return {"base_model": model_config.name, "fingerprint": model_config.fingerprint(), "modules": modules,
          "rank": rank, "num_experts": num_experts, "task": task, **extra}


def expert_file(path: str | os.PathLike) -> str:
  """An expert file, or the `expert.safetensors` of a run directory (local or a URL); MissingFileError naming what
  was looked for."""
  path = os.fspath(path)
  path = fs.join(path, EXPERT_FILE) if fs.isdir(path) else path
  if not fs.isfile(path):
    raise MissingFileError(f"expert file {path} does not exist (expected an expert/gate run's model_dir or its "
                           f"{EXPERT_FILE})")
  return path


def save_experts(path: str | os.PathLike, params: Any, metadata: dict[str, Any]) -> None:
  """Write the expert leaves of `params` (a full tree or just the experts) and `metadata` to one safetensors file,
  atomically (`moe_jax.fs.write_bytes`): readers see the old file or the complete new one, never a partial write."""
  _, experts = ex.split(params)
  flat = flax.traverse_util.flatten_dict(experts)
  if not flat:
    raise ValueError("save_experts: the tree has no lora_a/lora_b/router leaves")
  arrays = multihost_utils.process_allgather(flat, tiled=True)  # the global arrays, on every process
  path = os.fspath(path)
  if jax.process_index() == 0:
    fs.write_bytes(path, save_safetensors({"/".join(k): np.ascontiguousarray(v) for k, v in arrays.items()},
                                          metadata={_EXPERT_METADATA_KEY: json.dumps(metadata, sort_keys=True)}))
  if jax.process_count() > 1:  # the other processes read the file next (e.g. the gate stage): wait for it
    multihost_utils.sync_global_devices(f"save_experts {path}")


def _header_metadata(data: bytes) -> dict[str, str]:
  """The `__metadata__` of a safetensors file's JSON header (the format: u64 little-endian length, then JSON)."""
  (length,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + length]).get("__metadata__", {})


def read_expert_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """An expert file's metadata (locally without reading its tensors)."""
  path = os.fspath(path)
  if fs.is_url(path):
    return json.loads(_header_metadata(fs.read_bytes(path))[_EXPERT_METADATA_KEY])
  with safe_open(path, framework="np") as f:
    return json.loads(f.metadata()[_EXPERT_METADATA_KEY])


def load_experts(path: str | os.PathLike, config: T5Config | None = None) -> tuple[Any, dict[str, Any]]:
  """(expert parameter tree of NumPy arrays, metadata) from `save_experts`; with `config`, checks it is the same
  backbone architecture the experts were trained on."""
  path = os.fspath(path)
  if fs.is_url(path):
    data = fs.read_bytes(path)
    metadata = json.loads(_header_metadata(data)[_EXPERT_METADATA_KEY])
    tensors = load_safetensors(data)
  else:
    with safe_open(path, framework="np") as f:
      metadata = json.loads(f.metadata()[_EXPERT_METADATA_KEY])
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tensors.items()})
  if config is not None:
    _check_fingerprint({"model_name": metadata.get("base_model"), **metadata},
                       {"model_name": config.name, "fingerprint": config.fingerprint()}, f"expert file {path}")
  return params, metadata
