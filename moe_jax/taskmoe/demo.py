"""The task-level MoE end to end on the built-in demo (tiny T5, generated tasks, CPU minutes, no network):

  python -m moe_jax.train --gin_file=gin/taskmoe_demo.gin

A tiny T5 pretrained here on generic text (`demo_pretrain`, as gin/phatgoose.gin does) -> TextEmb task embeddings
of the demo's held-in tasks (`moe_jax.taskmoe.embeddings`) -> stage 1 with each routing (gumbel, softmax, average,
random_task, random_instance) on those tasks, every one with its task id (`with_task_ids`, ids in EXPERT_TASKS
order) -> stage 2 from the Gumbel stage 1 (routers kept, copies reset, softmax on the tau schedule) -> a dense
multitask T5 trained as long on the same tasks -> every model scored on the tasks' validation split (rank
classification) -> `run_dir/results.md` (accuracy per task and mean, one row per model) and, per TaskMoE, the
routing analysis in `run_dir/eval/<model>/` (heat maps per layer, tasks clustered by route).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax

from moe_jax import fs
from moe_jax.data import vocab
from moe_jax.errors import ConfigError
from moe_jax.models.config import T5Config
from moe_jax.models.interface import build_model
from moe_jax.models.taskmoe import ROUTINGS, TaskMoEConfig
from moe_jax.plots import task_label
from moe_jax.progress import JobProgress
from moe_jax.taskmoe import analysis
from moe_jax.taskmoe import evaluate as tevaluate
from moe_jax.taskmoe.embeddings import task_embeddings
from moe_jax.taskmoe.tasks import TASK_VECS, with_task_ids
from moe_jax.taskmoe.stages import build_stage2, gin_bound
from moe_jax.training import partitioning as part

DENSE = "dense multitask T5"


def model_name(stage: int, routing: str) -> str:
  return f"stage{stage} {routing}"


@gin.configurable(denylist=["gin_config_str"])
def taskmoe_demo(run_dir: str = gin.REQUIRED, init_from: str | None = None,
                 pretrain_mixture: str = "demo_pretrain", pretrain_steps: int = 300,
                 tasks: Sequence[str] | None = None, routings: Sequence[str] = ROUTINGS,
                 taskmoe: TaskMoEConfig | None = None, stage1_steps: int = 150, stage2_steps: int = 150,
                 dense_steps: int | None = None, learning_rate: float = 1e-3, stage2_learning_rate: float = 1e-3,
                 pretrain_learning_rate: float = 3e-3, embedding_kind: str = "text", embedding_dim: int | None = None,
                 eval_split: str = "validation", max_eval_examples: int | None = 100, eval_batch_size: int = 32,
                 feature_lengths: Mapping[str, int] | None = None, model_config: T5Config | None = None,
                 gin_config_str: str = "") -> str:
  """Run every stage under `run_dir` (a stage whose product exists with the same record is skipped) and return
  the path of `results.md`. `taskmoe` supplies the copies and router sizes (routing, task count, dimension and
  embedding file are set here); the softmax stage-1 variant routes at a fixed tau = 1 (the schedule of
  `softmax_temperature` is stage 2's). `dense_steps` (default `stage1_steps`, 0 = none): the dense baseline.
  Learning rates: `learning_rate` for stage 1 and the dense model (routers and task embeddings as
  `taskmoe_learning_rates` says), `stage2_learning_rate` for stage 2, `pretrain_learning_rate` for the backbone."""
  from tasks import demo, synthetic  # pylint: disable=g-import-not-at-top  (seqio)

  from moe_jax.training import loop  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  unknown = [r for r in routings if r not in ROUTINGS]
  if unknown:
    raise ConfigError(f"taskmoe_demo.routings: unknown {unknown}; expected some of {ROUTINGS}")
  config = model_config or T5Config()
  lengths = dict(feature_lengths or synthetic.FEATURE_LENGTHS)
  task_list = list(tasks or demo.EXPERT_TASKS)
  dense_steps = stage1_steps if dense_steps is None else dense_steps
  stage2 = "gumbel" in routings and stage2_steps > 0
  fs.makedirs(run_dir)
  if gin_config_str and jax.process_index() == 0:
    fs.write_text(fs.join(run_dir, "config.gin"), gin_config_str)
  progress = JobProgress("taskmoe_demo", pretrain_steps + len(routings) * stage1_steps + stage2 * stage2_steps
                         + dense_steps + 20 * (len(routings) + stage2 + bool(dense_steps)))
  common = dict(model_config=config, feature_lengths=lengths, gin_config_str=gin_config_str, validate_every=0)

  backbone_dir = init_from
  if pretrain_steps > 0:
    backbone_dir = fs.join(run_dir, "backbone")
    with gin_bound({"make_optimizer.learning_rate": pretrain_learning_rate}):
      loop.train(model_dir=backbone_dir, mixture_or_task_name=pretrain_mixture, stage="multitask",
                 total_steps=pretrain_steps, init_from=init_from, **common)
    progress.done("pretraining", pretrain_steps)
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(backbone_dir, config, part.logical_shardings(
      part.abstract_params(build_model(config)), mesh, rules), seed=0)
  mixture = with_task_ids(task_list, "taskmoe_demo_tasks")
  embedding_dir = task_embeddings(output_dir=fs.join(run_dir, "task_embeddings"), tasks=task_list,
                                  kind=embedding_kind, init_from=backbone_dir, model_config=config,
                                  dim=embedding_dim, feature_lengths=lengths, max_examples=200, backbone=backbone)
  base = dataclasses.replace(taskmoe or TaskMoEConfig(), num_tasks=len(task_list),
                             task_dim=embedding_dim or config.d_model,
                             task_embedding_file=fs.join(embedding_dir, TASK_VECS))
  results, routes = {}, {}
  stage_args = dict(mixture_or_task_name=mixture, init_from=backbone_dir, backbone=backbone, **common)
  with gin_bound({"make_optimizer.learning_rate": learning_rate}):
    for routing in routings:
      moe = dataclasses.replace(base, routing=routing, temperature=1.0 if routing == "softmax" else base.temperature)
      name = model_name(1, routing)
      loop.train(model_dir=fs.join(run_dir, f"stage1_{routing}"), stage="taskmoe_stage1",
                 total_steps=stage1_steps, taskmoe=moe, **stage_args)
      progress.done(f"stage 1 ({routing})", stage1_steps)
      results[name], routes[name] = _evaluate_taskmoe(fs.join(run_dir, f"stage1_{routing}"), run_dir, name,
                                                      task_list, eval_split, eval_batch_size, lengths,
                                                      max_eval_examples, mesh, rules)
      progress.done(f"evaluation of {name}", 20)
    if dense_steps:
      dense_dir = fs.join(run_dir, "dense")
      product = loop.train(model_dir=dense_dir, stage="multitask", total_steps=dense_steps, **stage_args)
      progress.done("dense multitask baseline", dense_steps)
      results[DENSE] = _evaluate_dense(product, config, task_list, eval_split, eval_batch_size, lengths,
                                       max_eval_examples, mesh, rules)
      progress.done(f"evaluation of {DENSE}", 20)
  if stage2:
    init = build_stage2(fs.join(run_dir, "stage1_gumbel"), backbone, fs.join(run_dir, "stage2_init"),
                        dataclasses.replace(base, routing="softmax", temperature=None))
    name = model_name(2, "softmax (from stage1 gumbel)")
    with gin_bound({"make_optimizer.learning_rate": stage2_learning_rate}):
      loop.train(model_dir=fs.join(run_dir, "stage2"), stage="taskmoe_stage2", total_steps=stage2_steps,
                 taskmoe=dataclasses.replace(base, routing="softmax", temperature=None), expert_from=init,
                 **stage_args)
    progress.done("stage 2", stage2_steps)
    results[name], routes[name] = _evaluate_taskmoe(fs.join(run_dir, "stage2"), run_dir, name, task_list,
                                                    eval_split, eval_batch_size, lengths, max_eval_examples, mesh,
                                                    rules)
    progress.done(f"evaluation of {name}", 20)
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    return write_table(run_dir, results, task_list, seconds)
  return fs.join(run_dir, "results.md")


def _evaluate_taskmoe(model_dir: str, run_dir: str, name: str, task_list: Sequence[str], split: str,
                      batch_size: int, lengths: Mapping[str, int], max_examples: int | None, mesh: Any,
                      rules: Any) -> tuple[dict[str, float], dict]:
  """({task: accuracy}, routes) of a TaskMoE product; its routing analysis goes to run_dir/eval/<model>/."""
  from moe_jax.evaluation.evaluate import primary_metric, write_results  # pylint: disable=g-import-not-at-top

  loaded = tevaluate.load(model_dir, mesh=mesh, rules=rules)
  out_dir = fs.join(run_dir, "eval", name.replace(" ", "_").replace("(", "").replace(")", ""))
  with vocab.using(loaded.vocabulary), part.activate(mesh, rules):
    metrics, predictions = tevaluate.score_tasks(loaded, task_list, split, batch_size, lengths, "rank", True,
                                                 max_examples, desc=f"evaluate {name}")
    routes = tevaluate.routes_of_tasks(loaded, task_list, split, lengths)
  if jax.process_index() == 0:
    write_results(metrics, out_dir, predictions)
    analysis.write_routing_analysis(out_dir, routes, analysis.layer_names(loaded.model), name)
  return {t: primary_metric(m) for t, m in metrics.items()}, routes


def _evaluate_dense(product: str, config: T5Config, task_list: Sequence[str], split: str, batch_size: int,
                    lengths: Mapping[str, int], max_examples: int | None, mesh: Any, rules: Any) -> dict[str, float]:
  from moe_jax.evaluation.evaluate import evaluate_task, primary_metric  # pylint: disable=g-import-not-at-top
  from moe_jax.training import loop  # pylint: disable=g-import-not-at-top

  model = build_model(config)
  dense = loop.load_backbone(fs.dirname(product), config, part.logical_shardings(part.abstract_params(model), mesh,
                                                                                 rules))
  out = {}
  with vocab.using(dense.vocabulary), part.activate(mesh, rules):
    for task in task_list:
      out[task] = primary_metric(evaluate_task(model, dense.params, task, split, batch_size, lengths, "rank", True,
                                               max_examples)["metrics"])
  return out


def write_table(run_dir: str, results: Mapping[str, Mapping[str, float]], task_list: Sequence[str],
                seconds: float) -> str:
  """`results.md` (rows: models, columns: tasks and their mean accuracy) and `results.json`; returns the .md."""
  means = {name: sum(r[t] for t in task_list) / len(task_list) for name, r in results.items()}
  rows = ["| model | " + " | ".join(task_label(t) for t in task_list) + " | **mean** |",
          "|---" * (len(task_list) + 2) + "|"]
  for name, r in results.items():
    rows.append(f"| {name} | " + " | ".join(f"{r[t]:.1f}" for t in task_list) + f" | **{means[name]:.1f}** |")
  text = ("Rank-classification accuracy (%) on the demo's held-in tasks (validation split); routing analysis per "
          f"TaskMoE in eval/<model>/. Wall time of the whole job: {seconds / 60:.1f} min.\n\n" + "\n".join(rows)
          + "\n")
  path = fs.join(run_dir, "results.md")
  fs.write_text(path, text)
  fs.write_text(fs.join(run_dir, "results.json"), json.dumps(
      {"tasks": {n: dict(r) for n, r in results.items()}, "mean": means, "seconds": seconds}, indent=1) + "\n")
  print(text)
  return path
