"""The task-level MoE's two training stages on top of `moe_jax.training.loop` (Ye, Zha & Ren 2022, section 6;
seed INK-USC/CrossTaskMoE).

Stage 1 (`train.stage = 'taskmoe_stage1'`, gin/taskmoe_stage1.gin): the pretrained backbone (`init_from`) is
expanded into m copies of every layer plus N(0, 1e-8) noise (`taskmoe.expand_pretrained`) and the copies, the
shared weights, the routers and the task embeddings train together (Gumbel-softmax routes by default).

Between the stages (`stage2_params`, the command `python -m moe_jax.taskmoe.stage2`): stage 1's routers and task
embeddings are kept and everything else is reset to the pretrained backbone, copies re-expanded with fresh noise
(the seed's example_scripts/build_a_checkpoint2.py).

Stage 2 (`train.stage = 'taskmoe_stage2'`, gin/taskmoe_stage2.gin, `train.expert_from` = that checkpoint):
routers and task embeddings frozen (the optimizer's mask), softmax routes with tau = max(300 exp(-1e-4 step), 1),
so the model starts from (nearly) average routing and moves to the learnt routes as the copies train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax
import gin
import jax

from moe_jax.checkpoints import identity
from moe_jax.errors import ConfigError, MismatchError
from moe_jax.models import experts as ex
from moe_jax.models.taskmoe import TaskMoE, TaskMoEConfig, expand_pretrained
from moe_jax.taskmoe import checkpoint as tckpt
from moe_jax.training import optimizer as opt

ROUTER = opt.TASKMOE_ROUTER


def expansion_key(seed: int, what: str = "stage1") -> jax.Array:
  """The key of a pretrained backbone's expansion (copy noise, fresh routers): the run's seed and what it is for."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(f"taskmoe/{what}".encode()))


def check_fits(params: Any, model: TaskMoE, where: str) -> None:
  """MismatchError unless `params` has exactly the shapes `model` wants (copies, task table, routers)."""
  from moe_jax.training import partitioning as part  # pylint: disable=g-import-not-at-top

  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  expected = nn.meta.unbox(part.abstract_params(model))
  mismatch = ex.first_mismatch(params, expected)
  if mismatch:
    raise MismatchError(f"{where} does not fit this TaskMoE ({model.moe.routing}, {model.moe.num_copies} copies, "
                        f"{model.moe.num_tasks} tasks x {model.moe.task_dim}) at {mismatch[0]}: found {mismatch[1]}, "
                        f"expected {mismatch[2]}")


def initial_params(stage: str, moe: TaskMoEConfig, model: TaskMoE, backbone: Any, seed: int,
                   expert_from: str | None) -> tuple[Any, dict[str, Any] | None]:
  """(a stage's starting parameters, the record of the checkpoint they came from or None). With `expert_from`, a
  TaskMoE checkpoint made on this backbone (stage 2's, from `moe_jax.taskmoe.stage2`; or a trained model to
  fine-tune); else, stage 1 only, the backbone expanded (`expand_pretrained`, task embeddings from
  `moe.task_embedding_file` when set)."""
  from moe_jax.training.backbone import check_same  # pylint: disable=g-import-not-at-top

  if expert_from is None:
    if stage == "taskmoe_stage2":
      raise ConfigError("train.stage='taskmoe_stage2' needs train.expert_from: the stage-2 checkpoint that python -m "
                        "moe_jax.taskmoe.stage2 builds from stage 1 (routers kept, copies reset)")
    # Copied: the train step donates its state, and expand_pretrained shares the non-layer leaves as they are.
    pretrained = jax.tree.map(lambda x: x.copy(), backbone.params)
    return expand_pretrained(pretrained, moe, expansion_key(seed)), None
  params, metadata = tckpt.load_taskmoe(expert_from)
  check_same(metadata.get("backbone"), backbone, f"TaskMoE checkpoint {expert_from}")
  check_fits(params, model, f"TaskMoE checkpoint {expert_from}")
  return params, {"config_hash": metadata.get("config_hash"), "weights": metadata.get("weights")}


def stage2_params(stage1: Any, pretrained: Any, moe: TaskMoEConfig, rng: jax.Array) -> Any:
  """Stage 2's starting point: `pretrained` (a plain T5 tree) expanded into `moe.num_copies` copies with
  N(0, moe.noise_std^2) noise, with stage 1's `router/` (routers and task embeddings) bit for bit. The routers
  must have the shapes `moe` makes (same copies, tasks, task dimension and router width)."""
  if ROUTER not in stage1:
    raise ConfigError("the stage-1 model has no routers or task embeddings to keep (average or frozen random "
                      "routing): stage 2 needs a learnt routing (gumbel or softmax)")
  fresh = expand_pretrained(pretrained, dataclasses.replace(moe, task_embedding_file=""), rng)
  mismatch = ex.first_mismatch(stage1[ROUTER], fresh.get(ROUTER, {}))
  if mismatch or set(_paths(stage1[ROUTER])) != set(_paths(fresh.get(ROUTER, {}))):
    raise MismatchError(f"stage 1's routers do not fit the stage-2 TaskMoEConfig "
                        f"({mismatch[0] if mismatch else 'different parameters'})")
  return {**fresh, ROUTER: jax.tree.map(lambda x: x, stage1[ROUTER])}


def _paths(tree: Any) -> list[tuple[str, ...]]:
  return list(flax.traverse_util.flatten_dict(tree))


def build_stage2(stage1: str, backbone: Any, output: str, moe: TaskMoEConfig | None = None, seed: int = 0,
                 noise_std: float | None = None) -> str:
  """Write the stage-2 checkpoint at `output` from the stage-1 checkpoint `stage1` (a stage-1 model_dir or its
  `taskmoe/`) and the loaded pretrained `backbone` (the one stage 1 was expanded from; checked). `moe`: stage 2's
  TaskMoEConfig (default: stage 1's with softmax routing on the schedule); `noise_std` overrides its copy noise
  (the seed's 1e-8). Returns `output`."""
  from moe_jax.training.backbone import check_same  # pylint: disable=g-import-not-at-top

  params, metadata = tckpt.load_taskmoe(stage1)
  check_same(metadata.get("backbone"), backbone, f"stage-1 checkpoint {stage1}")
  config, stage1_moe = tckpt.configs(metadata)
  if config.fingerprint() != backbone.config.fingerprint():
    raise MismatchError(f"stage-1 checkpoint {stage1} is a {config.name}; the backbone is a {backbone.config.name}")
  moe = moe or dataclasses.replace(stage1_moe, routing="softmax", temperature=None, gumbel_at_eval=False)
  if noise_std is not None:
    moe = dataclasses.replace(moe, noise_std=noise_std)
  pretrained = jax.device_get(backbone.params)
  new = stage2_params(jax.device_get(params), pretrained, moe, expansion_key(seed, "stage2"))
  record = {"stage": "taskmoe_stage2_init", "backbone": metadata.get("backbone"),
            "vocabulary": metadata.get("vocabulary"), "vocabulary_path": metadata.get("vocabulary_path"),
            "parent": {"path": stage1, "config_hash": metadata.get("config_hash"),
                       "weights": metadata.get("weights"), "router_weights": identity.weights_checksum(new[ROUTER])},
            "task": metadata.get("task"), "task_ids": metadata.get("task_ids")}
  tckpt.save_taskmoe(output, new, config, moe, record)
  return output


_UNBOUND = object()


@contextlib.contextmanager
def gin_bound(bindings: Mapping[str, Any]) -> Iterator[None]:
  """Gin bindings (e.g. {'make_optimizer.learning_rate': 1e-5}) for the stages run inside the block, the previous
  values (or the function's default) back after it: one job runs stages whose optimizers differ, and the stage
  records (`loop.stage_record`) read the bindings, so each product records the settings it was trained with."""
  previous = {}
  with gin.unlock_config():
    for name, value in bindings.items():
      try:
        previous[name] = gin.query_parameter(name)
      except ValueError:
        previous[name] = _UNBOUND
      gin.bind_parameter(name, value)
  try:
    yield
  finally:
    with gin.unlock_config():
      for name, value in previous.items():
        gin.bind_parameter(name, _default(name) if value is _UNBOUND else value)


def _default(name: str) -> Any:
  """The default of a configurable's argument, `configurable.argument` (the binding that restores 'unbound')."""
  configurable, argument = name.rsplit(".", 1)
  fn = gin.config._REGISTRY.get_match(configurable).wrapped  # pylint: disable=protected-access
  return inspect.signature(fn).parameters[argument].default
