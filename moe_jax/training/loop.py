"""The training loop behind `python -m moe_jax.train`: one gin-configured function for every stage.

Stages and what each leaves in `model_dir` (data flows one way):
  multitask  the whole backbone trains            -> `backbone/` (orbax; the next stages' `init_from`)
  expert     one LoRA expert, backbone frozen     -> `expert.safetensors` (lora_a, lora_b, zero router) + metadata
  gate       the expert's sigmoid gate only       -> `expert.safetensors` with the trained gate as router vector
  taskmoe_stage1/2  a task-level MoE (`train.taskmoe`; `moe_jax.taskmoe.stages`) -> `taskmoe/` (orbax, every
             parameter; `moe_jax.taskmoe.checkpoint`)
With `validate_every`, expert and gate runs also keep `best.safetensors` (the lowest validation loss so far), which
becomes the product.
Every stage also writes `config.gin` (the effective configuration), `checkpoints/` (orbax; resumed automatically),
`metrics.jsonl` and `tensorboard/`. Products and checkpoints record the backbone's weights checksum and vocabulary, the
task and the stage's settings (`stage_record`): a stage whose product exists is skipped only when that record is
what this run would make. SIGTERM (preemption) saves a checkpoint of the current step and exits with status 143; the
same command then resumes (`moe_jax.training.preemption`). Paths may be local or URLs (`moe_jax.fs`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import numpy as np
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.checkpoints import identity
from moe_jax.data import vocab
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.routers import SigmoidGate, Uniform
from moe_jax.models import interface
from moe_jax.models.interface import build_model
from moe_jax.models.taskmoe import TaskMoEConfig, gumbel_temperature, softmax_temperature
from moe_jax.taskmoe import tasks as taskmoe_tasks  # its gin configurables (task ids), registered before gin locks
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import optimizer as opt
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import BACKBONE_DIR, Backbone, check_same, load_backbone, read_backbone_metadata
from moe_jax.training.backbone import save_backbone
from moe_jax.training.metrics import METRICS_FILE, MetricsWriter
from moe_jax.training.preemption import Preempted, PreemptionWatch
from moe_jax.training.train_step import create_train_state, make_eval_loss, make_train_step
from moe_jax.training.validation import BEST_FILE, KeepBest

CHECKPOINT_DIR = "checkpoints"


def stage_product(model_dir: str, stage: str) -> str:
  """Where a finished stage's product lives."""
  if stage in opt.TASKMOE_STAGES:
    from moe_jax.taskmoe.checkpoint import TASKMOE_DIR  # pylint: disable=g-import-not-at-top
    return fs.join(model_dir, TASKMOE_DIR)
  return fs.join(model_dir, BACKBONE_DIR if stage == "multitask" else ckpt.EXPERT_FILE)


def stage_experts(stage: str, experts: ExpertConfig | None) -> ExpertConfig | None:
  """The expert layout a stage trains: none for multitask, one expert (plain LoRA) for expert training, one expert
  behind a sigmoid gate for gate training. `experts` supplies the modules, rank and init. A task-level MoE's
  stages train the `TaskMoEConfig` given."""
  if isinstance(experts, TaskMoEConfig):
    return experts
  if stage == "multitask":
    return None
  base = experts or ExpertConfig()
  router = Uniform() if stage == "expert" else SigmoidGate()
  return dataclasses.replace(base, num_experts=1, router=router)


def expert_key(seed: int, task: str) -> jax.Array:
  """The key of a task's fresh expert (its LoRA A): the run's seed and the task name, so experts of different
  tasks start apart and the same task starts the same way in every run."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(task.encode("utf-8")))


def load_expert_file(path: str, config: T5Config, experts: ExpertConfig, backbone: Backbone) -> tuple[Any, dict]:
  """(expert leaves, metadata) of an expert stage's file, checked against the backbone it must have been trained
  on and the configured layout."""
  try:
    path = ckpt.expert_file(path)
  except FileNotFoundError as e:
    raise MissingFileError(f"{e}: run the expert stage first (train.expert_from)") from None
  params, metadata = ckpt.load_experts(path, config)
  check_same(metadata.get("backbone"), backbone, f"expert file {path} (task {metadata.get('task')!r})")
  expected = jax.eval_shape(lambda: ex.init_experts(config, experts, jax.random.PRNGKey(0)))
  mismatch = ex.first_mismatch(params, expected)
  if mismatch:
    raise MismatchError(f"expert file {path} (task {metadata.get('task')!r}) does not fit this model at "
                        f"{mismatch[0]}: found {mismatch[1]}, expected {mismatch[2]}")
  return params, metadata


def effective_settings(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
  """A gin configurable's arguments as a call would see them: its defaults, overridden by the gin bindings."""
  bound = gin.get_bindings(fn)
  return {name: bound.get(name, p.default) for name, p in inspect.signature(fn).parameters.items()
          if name not in skip and p.default is not inspect.Parameter.empty}


def stage_record(stage: str, task: str, config: T5Config, layout: ExpertConfig | None, **settings: Any
                 ) -> dict[str, Any]:
  """What decides a stage's product besides its backbone: the stage, task, model, expert layout, the loop's settings
  and the optimizer, step and data settings gin gives them. Products record it (with its hash); a run whose record
  differs does not reuse them. Sharding, microbatching, logging and checkpoint cadence are left out: they do not
  change what is computed."""
  if isinstance(layout, TaskMoEConfig):  # its own settings: the routing, its schedules and learning rates
    settings["taskmoe"] = {**dataclasses.asdict(layout), "learning_rates": opt.taskmoe_learning_rates(),
                           "gumbel_temperature": effective_settings(gumbel_temperature, ("step",)),
                           "softmax_temperature": effective_settings(softmax_temperature, ("step",))}
    layout = None
  return identity.plain({
      "stage": stage, "task": task, "model": {**config.architecture(), "dtype": config.dtype},
      "experts": None if layout is None else {"modules": layout.modules, "rank": layout.rank,
                                              "init_std": layout.init_std},
      **settings,
      "optimizer": effective_settings(opt.make_optimizer, ("total_steps",)),
      "train_step": effective_settings(make_train_step, ("num_microbatches",)),
      "data": {"pack": bool(gin.get_bindings("moe_jax.data.pipeline.train_batches").get("pack", False))},
  })


def planned_record(stage: str, task: str, config: T5Config, experts: ExpertConfig | None, total_steps: int,
                   feature_lengths: Mapping[str, int], seed: int | None = None) -> dict[str, Any]:
  """The `stage_record` that `train` will give a stage called with these arguments, the rest of its settings
  (batch size, seed, validation) taken from gin as `train` takes them: known before the stage runs, so the
  pipeline can tell whether a library already holds its product. A gate's parent expert is left out."""
  settings = effective_settings(train)
  validate_every = settings["validate_every"]
  return stage_record(stage, task, config, stage_experts(stage, experts), total_steps=total_steps,
                      batch_size=settings["batch_size"], feature_lengths=dict(sorted(feature_lengths.items())),
                      seed=settings["seed"] if seed is None else seed, validate_every=validate_every,
                      validation_batches=settings["validation_batches"] if validate_every else None, expert=None)


def _product_record(product: str, stage: str) -> dict[str, Any]:
  """The record an existing product was made with (see `stage_record`), in the form `_expected_record` gives."""
  if stage in opt.TASKMOE_STAGES:
    from moe_jax.taskmoe.checkpoint import read_metadata  # pylint: disable=g-import-not-at-top
    found = read_metadata(product)
  else:
    found = read_backbone_metadata(product) if stage == "multitask" else ckpt.read_expert_metadata(product)
  backbone = found.get("parent") if stage == "multitask" else found.get("backbone")
  return {"backbone_weights": (backbone or {}).get("weights"),
          "vocabulary": (backbone or {}).get("vocabulary"), "config": found.get("config")}


def _expected_record(backbone: Backbone, record: dict[str, Any]) -> dict[str, Any]:
  return {"backbone_weights": backbone.weights, "vocabulary": backbone.vocabulary.record(), "config": record}


def _clear(model_dir: str, checkpoint_dir: str, product: str) -> None:
  """Remove what an earlier, different run left in `model_dir` (overwrite=True)."""
  for path in (product, fs.join(model_dir, BEST_FILE), checkpoint_dir, fs.join(model_dir, METRICS_FILE)):
    fs.remove(path)


@gin.configurable(denylist=["gin_config_str", "backbone"])
def train(model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED, stage: str = "multitask",
          model_config: T5Config | None = None, experts: ExpertConfig | None = None,
          feature_lengths: Mapping[str, int] | None = None, batch_size: int = 1024,
          num_microbatches: int = 1, total_steps: int = 1000, init_from: str | None = None,
          expert_from: str | None = None, save_every: int = 100, log_every: int = 10, seed: int = 42,
          resume: bool = True, validate_every: int = 0, validation_batches: int = 8, overwrite: bool = False,
          checkpoint_dir: str | None = None, gin_config_str: str = "", backbone: Backbone | None = None,
          taskmoe: TaskMoEConfig | None = None) -> str:
  """Train one stage and return the path of its product (see the module docstring).

  `batch_size` is the global batch per optimizer step, split into `num_microbatches` accumulated microbatches
  (PHATGOOSE: 1024). `resume=True` continues from the newest checkpoint in `checkpoint_dir` (default
  `model_dir/checkpoints`) when there is one; a run with the same data and configuration then ends with the same
  parameters as an uninterrupted one. `validate_every > 0` (expert and gate stages; PHATGOOSE: 100) computes the
  loss on `validation_batches` batches of the validation split every that many steps and at the end, and the
  product is the expert with the lowest one (`moe_jax.training.validation`); 0 keeps the last step's.

  An existing product is reused only when it was made on this backbone's weights with this stage's settings
  (`stage_record`); otherwise the run stops, saying what differs, unless `overwrite=True`, which replaces the
  product and the checkpoints of the other run. `backbone`: an already loaded `Backbone` (the pipeline loads it
  once for all its stages); else `init_from` is loaded.

  `taskmoe` (the task-level MoE's stages `taskmoe_stage1` / `taskmoe_stage2`, `moe_jax.taskmoe.stages`): the
  model is a `TaskMoE` on the backbone of `init_from`, expanded (stage 1) or loaded from the TaskMoE checkpoint
  `expert_from` (stage 2: the output of `python -m moe_jax.taskmoe.stage2`); batches must be unpacked and carry
  `task_ids`.
  """
  config = model_config or T5Config()
  model_dir = fs.absolute(model_dir)
  checkpoint_dir = fs.absolute(checkpoint_dir or fs.join(model_dir, CHECKPOINT_DIR))
  if stage not in opt.STAGES:
    raise ConfigError(f"train.stage={stage!r}; expected one of {opt.STAGES}")
  if stage == "gate" and expert_from is None:
    raise ConfigError("train.stage='gate' needs train.expert_from (the expert stage's model_dir or expert file)")
  if batch_size % num_microbatches:
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by train.num_microbatches={num_microbatches}")
  if validate_every and stage == "multitask":
    raise ConfigError("train.validate_every keeps the best expert: it applies to the expert and gate stages only")
  if stage in opt.TASKMOE_STAGES or taskmoe is not None:
    _check_taskmoe(stage, taskmoe, validate_every)
    experts = taskmoe
  mesh, rules = part.make_mesh(), part.axis_rules()
  shards = part.batch_shards(mesh, rules)
  if (batch_size // num_microbatches) % shards:
    raise ConfigError(f"train.batch_size={batch_size} / num_microbatches={num_microbatches} is not divisible by the "
                      f"{shards} batch shards of the mesh (data x fsdp x expert)")
  if batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {jax.process_count()} processes")
  backbone_model = build_model(config)
  if backbone is None:
    backbone = load_backbone(init_from, config, part.logical_shardings(part.abstract_params(backbone_model), mesh,
                                                                       rules), seed)
  with vocab.using(backbone.vocabulary):
    return _train_stage(model_dir, checkpoint_dir, mixture_or_task_name, stage, config, experts,
                        dict(feature_lengths or {"inputs": 512, "targets": 128}), batch_size, num_microbatches,
                        total_steps, expert_from, save_every, log_every, seed, resume, validate_every,
                        validation_batches, overwrite, gin_config_str, backbone, mesh, rules)


def _check_taskmoe(stage: str, taskmoe: TaskMoEConfig | None, validate_every: int) -> None:
  """A task-level MoE's stage needs its config, unpacked batches (a row is routed by its one task) and no expert
  validation."""
  if stage not in opt.TASKMOE_STAGES:
    raise ConfigError(f"train.taskmoe is set but train.stage={stage!r}; the task-level MoE trains in "
                      f"{opt.TASKMOE_STAGES}")
  if taskmoe is None:
    raise ConfigError(f"train.stage={stage!r} needs train.taskmoe = @TaskMoEConfig() (gin/taskmoe_stage1.gin)")
  if gin.get_bindings("moe_jax.data.pipeline.train_batches").get("pack", False):
    raise ConfigError("the task-level MoE routes each row by its task: set train_batches.pack = False")
  if validate_every:
    raise ConfigError("train.validate_every keeps the best expert file; the task-level MoE stages keep their last "
                      "step (set train.validate_every = 0)")


def _stage_params(stage: str, task: str, config: Any, layout: ExpertConfig | None, seed: int,
                  expert_from: str | None, backbone: Backbone) -> tuple[Any, dict[str, Any] | None]:
  """(initial parameters, the parent expert's record or None): the backbone (copied: the train step donates its
  state, and the backbone may be shared) with fresh experts (expert stage) or the expert to gate (gate stage)."""
  if isinstance(layout, TaskMoEConfig):
    from moe_jax.taskmoe.stages import initial_params  # pylint: disable=g-import-not-at-top
    return initial_params(stage, layout, build_model(config, layout), backbone, seed, expert_from)
  params = jax.tree.map(lambda x: x.copy(), backbone.params)
  if stage == "expert":
    return ex.merge(params, ex.init_experts(config, layout, expert_key(seed, task))), None
  if stage == "gate":
    expert_params, expert_meta = load_expert_file(expert_from, config, layout, backbone)
    parent = {"config_hash": expert_meta.get("config_hash"), "weights": identity.weights_checksum(expert_params)}
    return ex.merge(params, expert_params), parent
  return params, None


def _reuse_product(product: str, stage: str, backbone: Backbone, record: dict[str, Any], overwrite: bool,
                   model_dir: str, checkpoint_dir: str) -> bool:
  """Whether the stage's existing product was made by this run (reuse it). One made by another run stops the run,
  or with `overwrite` is cleared with that run's checkpoints."""
  if not fs.exists(product):
    return False
  differs = identity.differences(_product_record(product, stage), _expected_record(backbone, record))
  if not differs:
    print(f"{stage} stage already done: {product}")
    return True
  if not overwrite:
    raise MismatchError(f"{product} was made by another run ({'; '.join(differs[:4])}): rerun with "
                        "--gin.train.overwrite=True to replace it, or choose a new model_dir")
  _clear(model_dir, checkpoint_dir, product)
  return False


def _resume(state: Any, checkpointer: ckpt.Checkpointer, metadata: dict[str, Any], overwrite: bool,
            model_dir: str, checkpoint_dir: str, product: str) -> tuple[Any, int, ckpt.Checkpointer]:
  """(state, data position, checkpointer) from the newest checkpoint; another run's checkpoints stop the run, or
  with `overwrite` are cleared and the run starts afresh in their place."""
  try:
    state, data_position = checkpointer.restore(state)
    print(f"resumed from {checkpoint_dir} at step {int(state.step)}")
    return state, data_position, checkpointer
  except MismatchError:
    if not overwrite:
      raise
    checkpointer.close()
    _clear(model_dir, checkpoint_dir, product)
    return state, 0, ckpt.Checkpointer(checkpoint_dir, metadata)


def _train_stage(model_dir: str, checkpoint_dir: str, task: str, stage: str, config: Any,
                 experts: ExpertConfig | None, lengths: dict[str, int], batch_size: int, num_microbatches: int,
                 total_steps: int, expert_from: str | None, save_every: int, log_every: int, seed: int,
                 resume: bool, validate_every: int, validation_batches: int, overwrite: bool, gin_config_str: str,
                 backbone: Backbone, mesh: Any, rules: Any) -> str:
  """`train` after its checks, with the backbone loaded and its vocabulary active."""
  from moe_jax.data import pipeline  # the seqio data layer (TensorFlow) only when training

  layout = stage_experts(stage, experts)
  params, parent = _stage_params(stage, task, config, layout, seed, expert_from, backbone)
  record = stage_record(stage, task, config, layout, total_steps=total_steps, batch_size=batch_size,
                        feature_lengths=dict(sorted(lengths.items())), seed=seed, validate_every=validate_every,
                        validation_batches=validation_batches if validate_every else None, expert=parent)
  product = stage_product(model_dir, stage)
  if _reuse_product(product, stage, backbone, record, overwrite, model_dir, checkpoint_dir):
    return product
  fs.makedirs(model_dir)
  if jax.process_index() == 0 and gin_config_str:
    fs.write_text(fs.join(model_dir, "config.gin"), f"{gin_config_str}\n# This stage's settings, as its product "
                  f"records them (config_hash {identity.config_hash(record)}):\n# {json.dumps(record)}\n")
  vocab.check_tasks([task], backbone.vocabulary, config.vocab_size, config.name)

  model = build_model(config, layout)
  optimizer = opt.make_optimizer(stage, part.abstract_params(model), total_steps=total_steps)
  state = create_train_state(params, model, optimizer, mesh, rules)
  del params
  metadata = ckpt.checkpoint_metadata(stage, config, None if isinstance(layout, TaskMoEConfig) else layout, task,
                                      backbone.record(), record)
  checkpointer = ckpt.Checkpointer(checkpoint_dir, metadata)
  data_position = 0
  if resume and checkpointer.latest_step() is not None:
    state, data_position, checkpointer = _resume(state, checkpointer, metadata, overwrite, model_dir, checkpoint_dir,
                                                 product)

  decoder_only = interface.is_decoder_only(config)
  batches = pipeline.train_batches(task, lengths, batch_size // jax.process_count(), seed=seed,
                                   start_batch=data_position, shard_index=jax.process_index(),
                                   num_shards=jax.process_count(), decoder_only=decoder_only)
  if isinstance(layout, TaskMoEConfig):
    batches = _with_task_ids(batches, task, layout)
  step_fn = make_train_step(model, optimizer, stage, mesh, rules, num_microbatches)
  writer = MetricsWriter(model_dir, resume_step=int(state.step))
  product_metadata = {"stage": stage, "backbone": backbone.record(), "config": record,
                      "config_hash": identity.config_hash(record)}
  keep_best = None
  if validate_every:
    held_out = pipeline.validation_batches(task, lengths, batch_size // num_microbatches // jax.process_count(),
                                           validation_batches, jax.process_index(), jax.process_count(),
                                           decoder_only=decoder_only)
    keep_best = KeepBest(model_dir, make_eval_loss(model, mesh, rules), held_out, mesh, rules, validate_every, config,
                         task, product_metadata)
  bar = tqdm(total=total_steps, initial=int(state.step), desc=f"{stage} {task}", unit="step",
             disable=jax.process_index() != 0)
  try:
    with PreemptionWatch() as watch:
      state = _run(state, step_fn, batches, mesh, rules, checkpointer, writer, bar, watch, total_steps, log_every,
                   save_every, keep_best)
  finally:  # an interrupted run still completes its last checkpoint and flushes its metrics
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  _save_product(product, stage, state.params, config, task, record, backbone, keep_best, product_metadata)
  return product


def _save_product(product: str, stage: str, params: Any, config: Any, task: str, record: dict[str, Any],
                  backbone: Backbone, keep_best: KeepBest | None, product_metadata: dict[str, Any]) -> None:
  """A finished stage's product: the whole backbone (multitask), the best validated expert, or the last one."""
  if stage in opt.TASKMOE_STAGES:
    from moe_jax.taskmoe.checkpoint import save_taskmoe  # pylint: disable=g-import-not-at-top
    moe = TaskMoEConfig(**{k: v for k, v in record["taskmoe"].items() if k in TaskMoEConfig.__dataclass_fields__})
    save_taskmoe(product, params, config, moe, {
        "stage": stage, "task": task, "config": record, "config_hash": identity.config_hash(record),
        "backbone": backbone.record(), "vocabulary": backbone.vocabulary.record(),
        "vocabulary_path": backbone.vocabulary.path, "task_ids": _task_ids(task)})
  elif stage == "multitask":
    save_backbone(product, params, config, {
        "task": task, "config": record, "config_hash": identity.config_hash(record), "parent": backbone.record(),
        "vocabulary": backbone.vocabulary.record(), "vocabulary_path": backbone.vocabulary.path})
  elif keep_best is not None:
    keep_best.finish(product)
  else:
    ckpt.save_experts(product, params, ckpt.expert_metadata(params, config, task, **product_metadata))


def _task_ids(task: str) -> dict[str, int]:
  """The ids `moe_jax.taskmoe.tasks.with_task_ids` gave the tasks of `task`, for the TaskMoE product to record."""
  return taskmoe_tasks.known_ids(task)


def _with_task_ids(batches: Any, task: str, moe: TaskMoEConfig) -> Any:
  """The batches, checked on the first: a routing that reads the task needs each example's `task_ids`."""
  import itertools  # pylint: disable=g-import-not-at-top

  first = next(batches)
  if "task_ids" not in first and moe.routing not in ("average", "random_instance"):
    raise ConfigError(f"{task}: its batches carry no task_ids, which routing={moe.routing!r} reads; train on a "
                      "CrossFit mixture or on moe_jax.taskmoe.tasks.with_task_ids(...)")
  return itertools.chain([first], batches)


def _run(state: Any, step_fn: Any, batches: Any, mesh: Any, rules: Any, checkpointer: ckpt.Checkpointer,
         writer: MetricsWriter, bar: Any, watch: PreemptionWatch, total_steps: int, log_every: int,
         save_every: int, keep_best: KeepBest | None = None) -> Any:
  """Steps from `state.step` to `total_steps`: log every `log_every`, validate (`keep_best`), checkpoint every
  `save_every` and at the end; after SIGTERM, checkpoint the step just finished and raise `Preempted`."""
  tick, tokens, since_log = time.perf_counter(), 0, 0
  for step in range(int(state.step) + 1, total_steps + 1):
    batch = next(batches)
    tokens += int(np.sum(batch.get("encoder_input_tokens", 0) > 0) + np.sum(batch["decoder_target_tokens"] > 0))
    state, metrics = step_fn(state, part.shard_batch(batch, mesh, rules))
    bar.update(1)
    since_log += 1
    if step % log_every == 0 or step == total_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tick
      metrics["steps_per_second"] = since_log / elapsed
      metrics["tokens_per_second"] = tokens * jax.process_count() / elapsed
      writer.write(step, metrics)
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
      tick, tokens, since_log = time.perf_counter(), 0, 0
    if keep_best is not None:
      keep_best(step, state, writer, last=step == total_steps)
    preempted = watch.reached(step)
    if step % save_every == 0 or step == total_steps or preempted:
      checkpointer.save(state, data_position=step)
    if preempted:
      print(f"SIGTERM: saved a checkpoint at step {step} in {checkpointer.directory}; the same command resumes "
            "there", file=sys.stderr, flush=True)
      raise Preempted(step)
  return state
