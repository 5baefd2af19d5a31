"""The training loop behind `python -m moe_jax.train`: one gin-configured function for every stage.

Stages and what each leaves in `model_dir` (data flows one way):
  multitask  the whole backbone trains            -> `backbone/` (orbax; the next stages' `init_from`)
  expert     one LoRA expert, backbone frozen     -> `expert.safetensors` (lora_a, lora_b, zero router) + metadata
  gate       the expert's sigmoid gate only       -> `expert.safetensors` with the trained gate as router vector
With `validate_every`, expert and gate runs also keep `best.safetensors` (the lowest validation loss so far), which
becomes the product.
Every stage also writes `config.gin` (the effective configuration), `checkpoints/` (orbax; resumed automatically),
`metrics.jsonl` and `tensorboard/`. A stage whose product exists is skipped. SIGTERM (preemption) saves a checkpoint
of the current step and exits with status 143; the same command then resumes (`moe_jax.training.preemption`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from moe_jax.checkpoints.hf import CONFIG_FILE, load_hf_t5
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.routers import SigmoidGate, Uniform
from moe_jax.models.t5 import Transformer
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import optimizer as opt
from moe_jax.training import partitioning as part
from moe_jax.training.metrics import MetricsWriter
from moe_jax.training.preemption import Preempted, PreemptionWatch
from moe_jax.training.train_step import create_train_state, make_eval_loss, make_train_step
from moe_jax.training.validation import KeepBest

BACKBONE_DIR = "backbone"
CHECKPOINT_DIR = "checkpoints"


def stage_product(model_dir: str, stage: str) -> str:
  """Where a finished stage's product lives."""
  return os.path.join(model_dir, BACKBONE_DIR if stage == "multitask" else ckpt.EXPERT_FILE)


def stage_experts(stage: str, experts: ExpertConfig | None) -> ExpertConfig | None:
  """The expert layout a stage trains: none for multitask, one expert (plain LoRA) for expert training, one expert
  behind a sigmoid gate for gate training. `experts` supplies the modules, rank and init."""
  if stage == "multitask":
    return None
  base = experts or ExpertConfig()
  router = Uniform() if stage == "expert" else SigmoidGate()
  return dataclasses.replace(base, num_experts=1, router=router)


def load_backbone(init_from: str | None, config: T5Config, shardings: Any, seed: int) -> Any:
  """Backbone parameters (no experts): random (`init_from=None`), a Hugging Face T5 directory, or the `backbone/`
  of a multitask run (`init_from` = that run's model_dir or the backbone dir itself)."""
  if init_from is None:
    tokens = jnp.ones((1, 1), jnp.int32)
    init = lambda: nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens))["params"]
    return jax.jit(init, out_shardings=shardings)()
  if not os.path.exists(init_from) and not init_from.startswith("gs://"):
    raise FileNotFoundError(f"init_from={init_from!r} does not exist (expected a Hugging Face T5 directory or the "
                            "model_dir of a multitask run)")
  if os.path.isfile(os.path.join(init_from, CONFIG_FILE)):
    return load_hf_t5(init_from, config)
  directory = os.path.join(init_from, BACKBONE_DIR) if os.path.isdir(os.path.join(init_from, BACKBONE_DIR)) \
      else init_from
  return restore_backbone(directory, config, shardings)


def save_backbone(directory: str, params: Any, config: T5Config) -> None:
  """Orbax save of the backbone with the model's fingerprint (atomic: a temporary directory renamed when done)."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(os.path.abspath(directory), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        metadata=ocp.args.JsonSave({"model_name": config.name, "fingerprint": config.fingerprint()})))


def restore_backbone(directory: str, config: T5Config, shardings: Any) -> Any:
  """Backbone saved by `save_backbone`, placed per `shardings`; refuses one written for another model."""
  path = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(path, "metadata")):
    raise FileNotFoundError(f"no backbone checkpoint in {directory} (expected a multitask run's {BACKBONE_DIR}/)")
  abstract = nn.meta.unbox(part.abstract_params(Transformer(config)))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    found = checkpointer.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    if found.get("fingerprint") != config.fingerprint():
      raise ValueError(f"backbone checkpoint {directory} belongs to model {found.get('model_name')!r} (fingerprint "
                       f"{found.get('fingerprint')}), but this run's model is {config.name!r} "
                       f"(fingerprint {config.fingerprint()})")
    return checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]


def load_expert_file(path: str, config: T5Config, experts: ExpertConfig) -> Any:
  """Expert leaves from an expert stage's file, checked against the backbone and the configured modules."""
  try:
    path = ckpt.expert_file(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}: run the expert stage first (train.expert_from)") from None
  params, metadata = ckpt.load_experts(path, config)
  expected = jax.eval_shape(lambda: ex.init_experts(config, experts, jax.random.PRNGKey(0)))
  mismatch = ex.first_mismatch(params, expected)
  if mismatch:
    raise ValueError(f"expert file {path} (task {metadata.get('task')!r}) does not fit this model at {mismatch[0]}: "
                     f"found {mismatch[1]}, expected {mismatch[2]}")
  return params


@gin.configurable(denylist=["gin_config_str"])
def train(model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED, stage: str = "multitask",
          model_config: T5Config | None = None, experts: ExpertConfig | None = None,
          feature_lengths: Mapping[str, int] | None = None, batch_size: int = 1024,
          num_microbatches: int = 1, total_steps: int = 1000, init_from: str | None = None,
          expert_from: str | None = None, save_every: int = 100, log_every: int = 10, seed: int = 42,
          resume: bool = True, validate_every: int = 0, validation_batches: int = 8,
          gin_config_str: str = "") -> str:
  """Train one stage and return the path of its product (see the module docstring).

  `batch_size` is the global batch per optimizer step, split into `num_microbatches` accumulated microbatches
  (PHATGOOSE: 1024). `resume=True` continues from the newest checkpoint in `model_dir/checkpoints` when there is
  one; a run with the same data and configuration then ends with the same parameters as an uninterrupted one.
  `validate_every > 0` (expert and gate stages; PHATGOOSE: 100) computes the loss on `validation_batches` batches
  of the validation split every that many steps and at the end, and the product is the expert with the lowest one
  (`moe_jax.training.validation`); 0 keeps the last step's.
  """
  config = model_config or T5Config()
  model_dir = model_dir if "://" in model_dir else os.path.abspath(model_dir)  # orbax wants absolute paths
  if stage not in opt.STAGES:
    raise ValueError(f"train.stage={stage!r}; expected one of {opt.STAGES}")
  if stage == "gate" and expert_from is None:
    raise ValueError("train.stage='gate' needs train.expert_from (the expert stage's model_dir or expert file)")
  if batch_size % num_microbatches:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by train.num_microbatches={num_microbatches}")
  if validate_every and stage == "multitask":
    raise ValueError("train.validate_every keeps the best expert: it applies to the expert and gate stages only")
  product = stage_product(model_dir, stage)
  if os.path.exists(product):
    print(f"{stage} stage already done: {product}")
    return product
  os.makedirs(model_dir, exist_ok=True)
  if jax.process_index() == 0 and gin_config_str:
    with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(gin_config_str)

  mesh, rules = part.make_mesh(), part.axis_rules()
  shards = part.batch_shards(mesh, rules)
  if (batch_size // num_microbatches) % shards:
    raise ValueError(f"train.batch_size={batch_size} / num_microbatches={num_microbatches} is not divisible by the "
                     f"{shards} batch shards of the mesh (data x fsdp x expert)")
  if batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the {jax.process_count()} processes")
  layout = stage_experts(stage, experts)
  model = Transformer(config, layout)
  backbone_model = Transformer(config)
  backbone_shardings = part.logical_shardings(part.abstract_params(backbone_model), mesh, rules)
  params = load_backbone(init_from, config, backbone_shardings, seed)
  if stage == "expert":
    params = ex.merge(params, ex.init_experts(config, layout, jax.random.PRNGKey(seed)))
  elif stage == "gate":
    params = ex.merge(params, load_expert_file(expert_from, config, layout))

  optimizer = opt.make_optimizer(stage, part.abstract_params(model), total_steps=total_steps)
  state = create_train_state(params, model, optimizer, mesh, rules)
  del params
  checkpointer = ckpt.Checkpointer(os.path.join(model_dir, CHECKPOINT_DIR),
                                   ckpt.checkpoint_metadata(stage, config, layout, mixture_or_task_name))
  data_position = 0
  if resume and checkpointer.latest_step() is not None:
    state, data_position = checkpointer.restore(state)
    print(f"resumed from {model_dir}/{CHECKPOINT_DIR} at step {int(state.step)}")

  from moe_jax.data import pipeline  # the seqio data layer (TensorFlow) only when training

  lengths = dict(feature_lengths or {"inputs": 512, "targets": 128})
  batches = pipeline.train_batches(mixture_or_task_name, lengths, batch_size // jax.process_count(), seed=seed,
                          start_batch=data_position, shard_index=jax.process_index(),
                          num_shards=jax.process_count())
  step_fn = make_train_step(model, optimizer, stage, mesh, rules, num_microbatches)
  writer = MetricsWriter(model_dir)
  keep_best = None
  if validate_every:
    held_out = pipeline.validation_batches(mixture_or_task_name, lengths, batch_size // num_microbatches
                                           // jax.process_count(), validation_batches, jax.process_index(),
                                           jax.process_count())
    keep_best = KeepBest(model_dir, make_eval_loss(model, mesh, rules), held_out, mesh, rules, validate_every, config,
                         mixture_or_task_name, stage)
  start = int(state.step)
  bar = tqdm(total=total_steps, initial=start, desc=f"{stage} {mixture_or_task_name}", unit="step",
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
  if stage == "multitask":
    save_backbone(product, state.params, config)
  elif keep_best is not None:
    keep_best.finish(product)
  else:
    ckpt.save_experts(product, state.params, ckpt.expert_metadata(state.params, config, mixture_or_task_name,
                                                                  stage=stage))
  return product


def _run(state: Any, step_fn: Any, batches: Any, mesh: Any, rules: Any, checkpointer: ckpt.Checkpointer,
         writer: MetricsWriter, bar: Any, watch: PreemptionWatch, total_steps: int, log_every: int,
         save_every: int, keep_best: KeepBest | None = None) -> Any:
  """Steps from `state.step` to `total_steps`: log every `log_every`, validate (`keep_best`), checkpoint every
  `save_every` and at the end; after SIGTERM, checkpoint the step just finished and raise `Preempted`."""
  tick, tokens, since_log = time.perf_counter(), 0, 0
  for step in range(int(state.step) + 1, total_steps + 1):
    batch = next(batches)
    tokens += int(np.sum(batch["encoder_input_tokens"] > 0) + np.sum(batch["decoder_loss_weights"] > 0))
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
