"""Few-shot transfer of a trained task-level MoE against a base model, as CrossFit and Task-level MoE report it:

  python -m moe_jax.train --gin_file=gin/models/t5_1_1_base.gin --gin_file=gin/taskmoe_few_shot.gin ...

For every test task of the CrossFit split and every seed, each model is fine-tuned on the run's k-shot train
split (`crossfit_<task>_<k>_<seed>`) once per learning rate of the grid, the fine-tuned model with the best score
on the run's dev split is kept, and its test score is the run's score (`moe_jax.evaluation.few_shot`: resumable
grids, written as they go to `run_dir/scores_<model>.json`). The TaskMoE fine-tunes as stage 2 does (routers and
task embeddings frozen, the test task routed by its own task embedding, i.e. its row of the task_vecs the model
was trained with); the base model (default: the pretrained backbone) fine-tunes entirely. The report,
`run_dir/transfer.md` and `.json`, gives each task's mean and std over seeds for both and ARG, the average relative
gain of the TaskMoE over the base. Seed grid (example_scripts/finetune_a_list_of_tasks_moe.sh): learning rates
1e-5, 2e-5, 5e-5, batch sizes 2, 4, 8, 1000 steps, best of every 100 steps on dev; here the learning rates, one
batch size and the last step, each fine-tuned model deleted once scored (`keep_models=False`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax

from moe_jax import fs
from moe_jax.data import vocab
from moe_jax.errors import ConfigError
from moe_jax.evaluation import few_shot
from moe_jax.models.interface import build_model
from moe_jax.models.taskmoe import TaskMoEConfig
from moe_jax.taskmoe import checkpoint as tckpt
from moe_jax.taskmoe.evaluate import load
from moe_jax.taskmoe.tasks import routing_ids_fn
from moe_jax.taskmoe.stages import gin_bound
from moe_jax.training import partitioning as part

SPLITS = ("train", "dev", "test")


def run_name(task: str, seed: int) -> str:
  """The registered CrossFit run of `task` with `seed` (its k found among the registered names)."""
  from moe_jax.data.pipeline import get_provider  # pylint: disable=g-import-not-at-top  (seqio)
  from tasks import crossfit  # pylint: disable=g-import-not-at-top

  get_provider(f"{crossfit.PREFIX}test")  # registers the split's runs (a lazy registrar)
  prefix = f"{crossfit.PREFIX}{task.replace('-', '.')}_"
  import seqio  # pylint: disable=g-import-not-at-top

  found = [n for n in seqio.TaskRegistry.names() if n.startswith(prefix) and n.endswith(f"_{seed}")
           and n[len(prefix):-len(f"_{seed}")].isdigit()]
  if len(found) != 1:
    raise ConfigError(f"CrossFit task {task!r} seed {seed}: expected one registered run, found {found}")
  return found[0]


def test_tasks() -> list[str]:
  """The split file's test tasks (`tasks.crossfit.crossfit_split`)."""
  from tasks import crossfit  # pylint: disable=g-import-not-at-top

  return list(crossfit.load_task_split(crossfit.crossfit_split()).test)


def _score(model: Any, params: Any, run: str, split: str, batch_size: int, lengths: Mapping[str, int],
           max_examples: int | None, routing_ids_fn: Any) -> float:
  from moe_jax.evaluation.evaluate import evaluate_task  # pylint: disable=g-import-not-at-top

  result = evaluate_task(model, params, run, split, batch_size, lengths, "auto", True, max_examples,
                         routing_ids_fn=routing_ids_fn)
  return _crossfit_score(result["metrics"])


def _crossfit_score(metrics: Mapping[str, float]) -> float:
  """A CrossFit task's one metric (the tasks register exactly one), else the primary metric."""
  from moe_jax.evaluation.evaluate import primary_metric  # pylint: disable=g-import-not-at-top

  if len(metrics) == 1:
    return float(next(iter(metrics.values())))
  return primary_metric(metrics)


@gin.configurable(denylist=["gin_config_str"])
def taskmoe_few_shot(run_dir: str = gin.REQUIRED, model_from: str = gin.REQUIRED, init_from: str | None = None,
                     base_from: str | None = None, tasks: Sequence[str] | None = None,
                     seeds: Sequence[int] = (100, 13, 21, 42, 87), learning_rates: Sequence[float] = (1e-5,),
                     steps: int = 1000, batch_size: int = 8, eval_batch_size: int = 32,
                     max_eval_examples: int | None = 10000, feature_lengths: Mapping[str, int] | None = None,
                     taskmoe: TaskMoEConfig | None = None, keep_models: bool = False, backbone_seed: int = 42,
                     gin_config_str: str = "") -> str:
  """Fine-tune and score the TaskMoE of `model_from` and the base (`base_from`: a plain T5, a HF directory or a
  multitask run; default `init_from`, the backbone the TaskMoE was made on) on every (task, seed) of `tasks`
  (default: the split file's test tasks) and write the transfer report; returns the path of transfer.md.
  `taskmoe`: the TaskMoEConfig to fine-tune with (default: the checkpoint's, e.g. stage 2's softmax).
  `backbone_seed` seeds a random backbone (`init_from=None`, tests), as `train.seed` did for the TaskMoE."""
  from moe_jax.training import loop  # pylint: disable=g-import-not-at-top

  metadata = tckpt.read_metadata(model_from)
  config, saved_moe = tckpt.configs(metadata)
  moe = taskmoe or saved_moe
  lengths = dict(feature_lengths or {"inputs": 512, "targets": 64})
  base_from = base_from or init_from
  mesh, rules = part.make_mesh(), part.axis_rules()
  plain = build_model(config)
  backbone = loop.load_backbone(init_from, config, part.logical_shardings(part.abstract_params(plain), mesh, rules),
                                backbone_seed)
  base = {"backbone": backbone} if base_from == init_from else {"init_from": base_from}
  task_list = list(tasks or test_tasks())
  if gin_config_str and jax.process_index() == 0:
    fs.write_text(fs.join(run_dir, "config.gin"), gin_config_str)
  common = dict(model_config=config, feature_lengths=lengths, batch_size=batch_size, total_steps=steps,
                validate_every=0, gin_config_str=gin_config_str)

  def fine_tune_and_score(kind: str, task: str, seed: int) -> float:
    run = run_name(task, seed)
    best = None  # (dev score, test score)
    for lr in learning_rates:
      model_dir = fs.join(run_dir, kind, run, f"lr_{lr:g}")
      with gin_bound({"make_optimizer.learning_rate": lr}):
        if kind == "taskmoe":
          product = loop.train(model_dir=model_dir, mixture_or_task_name=run, stage="taskmoe_stage2",
                               init_from=init_from, backbone=backbone, expert_from=model_from, taskmoe=moe,
                               seed=seed, **common)
        else:
          product = loop.train(model_dir=model_dir, mixture_or_task_name=run, stage="multitask", seed=seed,
                               **base, **common)
      if kind == "taskmoe":
        loaded = load(product, moe, mesh, rules)
        model, params, ids_fn = loaded.model, loaded.params, routing_ids_fn
      else:
        tuned = loop.load_backbone(model_dir, config, part.logical_shardings(part.abstract_params(plain), mesh,
                                                                             rules))
        model, params, ids_fn = plain, tuned.params, None
      with vocab.using(backbone.vocabulary), part.activate(mesh, rules):
        dev = _score(model, params, run, "dev", eval_batch_size, lengths, max_eval_examples, ids_fn)
        test = _score(model, params, run, "test", eval_batch_size, lengths, max_eval_examples, ids_fn)
      if best is None or dev > best[0]:
        best = (dev, test)
      if not keep_models and jax.process_index() == 0:
        fs.remove(model_dir)
    if not keep_models and jax.process_index() == 0:
      fs.remove(fs.join(run_dir, kind, run))
    return best[1]

  scores = {}
  for kind in ("base", "taskmoe"):
    scores[kind] = few_shot.few_shot_transfer(lambda task, seed, kind=kind: fine_tune_and_score(kind, task, seed),
                                              task_list, seeds, fs.join(run_dir, f"scores_{kind}.json"))
  report = few_shot.transfer_report(scores["base"], scores["taskmoe"])
  path = fs.join(run_dir, "transfer.md")
  if jax.process_index() == 0:
    fs.write_text(fs.join(run_dir, "transfer.json"), json.dumps(report, indent=1) + "\n")
    fs.write_text(path, "Few-shot transfer: base = " + str(base_from) + ", new = the task-level MoE of "
                  + str(model_from) + "\n\n" + few_shot.transfer_markdown(report))
  return path
