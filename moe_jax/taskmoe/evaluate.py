"""Evaluate a trained task-level MoE on seqio tasks and analyse its routes:

  python -m moe_jax.train --gin_file=gin/taskmoe_evaluate.gin --gin.taskmoe_evaluate.model_from=DIR ...

Every example is scored (rank classification when the task has answer choices, else greedy generation) with its
task's id as the routing id (`moe_jax.taskmoe.tasks.task_id`: a `with_task_ids` registration, a CrossFit run, or
the gin mapping `task_id_map.ids`); routings that sample at evaluation draw each example's route from a key of
its own tokens (`interface.example_keys`), so scores do not depend on batching. Writes `results.json`,
`results.md`, `predictions/<task>.jsonl` and the routing analysis (`moe_jax.taskmoe.analysis`) to `output_dir`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.data import vocab
from moe_jax.models import interface
from moe_jax.models.interface import build_model
from moe_jax.models.taskmoe import TaskMoEConfig
from moe_jax.taskmoe import analysis
from moe_jax.taskmoe import checkpoint as tckpt
from moe_jax.taskmoe import tasks as task_ids
from moe_jax.training import partitioning as part


@dataclasses.dataclass
class LoadedTaskMoE:
  """A TaskMoE checkpoint ready to score: the module, its parameters placed on the mesh, its vocabulary."""

  model: Any
  params: Any
  vocabulary: vocab.VocabSpec
  metadata: dict[str, Any]


def load(model_from: str, routing: TaskMoEConfig | None = None, mesh: Any = None, rules: Any = None
         ) -> LoadedTaskMoE:
  """The TaskMoE of a checkpoint (a stage's model_dir or a `taskmoe/` directory), with the vocabulary of the
  backbone it was made on. `routing`: evaluate with this TaskMoEConfig instead of the saved one (e.g. the seed's
  `gumbel_at_eval=True`); its parameters must have the same shapes."""
  params, metadata = tckpt.load_taskmoe(model_from)
  task_ids.remember(metadata.get("task_ids") or {})  # the ids it was trained with, for `with_task_ids` tasks
  config, moe = tckpt.configs(metadata)
  model = build_model(config, routing or moe)
  if routing is not None:
    from moe_jax.taskmoe.stages import check_fits  # pylint: disable=g-import-not-at-top
    check_fits(params, model, f"TaskMoE checkpoint {model_from}")
  if mesh is not None:
    params = part.place(model, params, mesh, rules)
  spec = vocab.for_backbone(metadata.get("vocabulary"), model_from, config.vocab_size, config.name,
                            metadata.get("vocabulary_path"))
  return LoadedTaskMoE(model, params, spec, metadata)


def score_tasks(loaded: LoadedTaskMoE, names: Sequence[str], split: str, batch_size: int,
                feature_lengths: Mapping[str, int] | None, mode: str = "auto", length_normalize: bool = True,
                max_examples: int | None = None, desc: str = "evaluate") -> tuple[dict, dict]:
  """({task: metrics}, {task: prediction records}) with every example routed by its task's id; call under the
  loaded vocabulary (`vocab.using`) and mesh (`part.activate`)."""
  from moe_jax.evaluation.evaluate import evaluate_task  # pylint: disable=g-import-not-at-top  (seqio)

  metrics, predictions = {}, {}
  for name in tqdm(names, desc=desc, unit="task", disable=jax.process_index() != 0):
    result = evaluate_task(loaded.model, loaded.params, name, split, batch_size, feature_lengths, mode,
                           length_normalize, max_examples, routing_ids_fn=task_ids.routing_ids_fn)
    metrics[name], predictions[name] = result["metrics"], result["predictions"]
  return metrics, predictions


def routes_of_tasks(loaded: LoadedTaskMoE, names: Sequence[str], split: str,
                    feature_lengths: Mapping[str, int] | None, examples: int = 64) -> dict[str, dict[str, np.ndarray]]:
  """`analysis.task_routes` of each task (a sampling routing averages the routes of its first `examples`)."""
  from moe_jax.evaluation.scoring import pad_tokens  # pylint: disable=g-import-not-at-top

  from moe_jax.data.pipeline import eval_examples  # pylint: disable=g-import-not-at-top  (seqio)

  out = {}
  reads_task = loaded.model.moe.routing not in ("average", "random_instance")
  for name in names:
    inputs = None
    if interface.samples_routes_at_eval(loaded.model):
      rows = eval_examples(name, split, feature_lengths, examples)
      inputs = pad_tokens([e["inputs"] for e in rows], max(len(e["inputs"]) for e in rows))
    out[name] = analysis.task_routes(loaded.model, loaded.params, task_ids.task_id(name) if reads_task else None,
                                     inputs)
  return out


@gin.configurable(denylist=["gin_config_str"])
def taskmoe_evaluate(output_dir: str = gin.REQUIRED, model_from: str = gin.REQUIRED,
                     tasks: Sequence[str] = gin.REQUIRED, split: str = "validation",
                     routing: TaskMoEConfig | None = None, batch_size: int = 32,
                     feature_lengths: Mapping[str, int] | None = None, mode: str = "auto",
                     length_normalize: bool = True, max_examples: int | None = None,
                     analysis_tasks: Sequence[str] | None = None, gin_config_str: str = "") -> str:
  """Score `model_from` (a TaskMoE checkpoint) on every task of `tasks` (mixtures expand; CrossFit runs and
  `with_task_ids` copies carry their ids) and write the results and the routing analysis of `analysis_tasks`
  (default: the evaluated tasks) to `output_dir`; returns the path of results.md."""
  from moe_jax.data.pipeline import expand_tasks  # pylint: disable=g-import-not-at-top  (seqio)
  from moe_jax.evaluation.evaluate import write_results  # pylint: disable=g-import-not-at-top

  mesh, rules = part.make_mesh(), part.axis_rules()
  loaded = load(model_from, routing, mesh, rules)
  if jax.process_index() == 0 and gin_config_str:
    fs.write_text(fs.join(output_dir, "config.gin"), gin_config_str)
  with vocab.using(loaded.vocabulary), part.activate(mesh, rules):
    names = expand_tasks(tasks)
    metrics, predictions = score_tasks(loaded, names, split, batch_size, feature_lengths, mode, length_normalize,
                                       max_examples)
    routes = routes_of_tasks(loaded, list(analysis_tasks or names), split, feature_lengths)
  if jax.process_index() == 0:
    write_results(metrics, output_dir, predictions)
    analysis.write_routing_analysis(output_dir, routes, analysis.layer_names(loaded.model),
                                    f"{loaded.model.moe.routing} routing")
  return fs.join(output_dir, "results.md")
