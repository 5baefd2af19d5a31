"""Retrieval of Experts (ELM; Jang et al., 2023): pick the expert for an unseen task by the data it was trained on.

Each expert's library entry keeps an index of `instances` (ELM: 100) of its training instances, embedded as text
("Answer Choices: ..., Instance: ...") by all-MiniLM-L6-v2 (`moe_jax.methods.instances`); adding an expert embeds
only its own. For a target task, `queries` (ELM: 32) of its evaluation instances, unlabelled, each vote for the
expert of their nearest stored instance; the experts with the most votes are chosen (`InstanceIndex.vote`: ties go
to the higher summed similarity, then the lower expert index).

Methods (one model per evaluation task, `Method.task_params`; the experts chosen per task go into the results):
  roe          the top-voted expert alone (ELM's default, k = 1);
  roe_merged   the top `merge_k` experts merged by the uniform average of their parameters (A and B separately:
               ELM averages the chosen adapters' weights);
  best_expert  the expert that scores best on the task itself (ELM's oracle: an upper bound that reads the labels).
The experts are prompt experts (one per (dataset, template): `moe_jax.training.library_experts`, gin/roe_demo.gin)
or dataset experts (one per dataset, as PHATGOOSE's), any library's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import numpy as np

from moe_jax.errors import ConfigError
from moe_jax.methods.merging import uniform_parameters
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.methods.retrieval import stored_instances
from moe_jax.models import experts as ex
from moe_jax.models.interface import build_model
from moe_jax.models.sentence_embedder import MiniLMEmbedder  # noqa: F401  (the embedder's public home here)
from moe_jax.training import partitioning as part


@gin.configurable
def roe_settings(instances: int = 100, queries: int = 32, merge_k: int = 3) -> dict[str, int]:
  """ELM's numbers: stored instances per expert, unlabelled queries per target task, experts merged by roe_merged."""
  if min(instances, queries, merge_k) < 1:
    raise ConfigError(f"roe_settings: instances={instances}, queries={queries}, merge_k={merge_k}; each must be >= 1")
  return {"instances": instances, "queries": queries, "merge_k": merge_k}


def _selector(experts: Experts, k: int) -> Any:
  """task -> the indices of its top-`k` experts by the votes of its first `queries` evaluation instances."""
  from moe_jax.data.pipeline import mixture_examples  # pylint: disable=g-import-not-at-top  (TensorFlow)

  settings = roe_settings()
  index, embed = stored_instances(experts, "roe_index", settings["instances"])
  k = min(k, experts_count(experts))

  def select(task: str) -> np.ndarray:
    queries = mixture_examples(task, experts.eval_split, experts.lengths, settings["queries"])
    return index.vote(embed(queries), k)[0]

  return select


def experts_count(experts: Experts) -> int:
  return ex.layout(experts.moe_tree)[1]


def _merged_model(experts: Experts, chosen: np.ndarray) -> Any:
  """Backbone + the uniform parameter average of the experts `chosen`, one LoRA (placed on the mesh)."""
  subset = jax.tree.map(lambda x: x[np.asarray(chosen)], experts.moe_tree)
  return ex.merge(experts.backbone, uniform_parameters(subset))


def _per_task(experts: Experts, choose: Any) -> Method:
  """A method whose model for a task is the average of the experts `choose(task)` gives, recording them."""
  model = build_model(experts.config, experts.single())
  names = experts.expert_names()
  method = experts.method(model, _merged_model(experts, np.arange(experts_count(experts))))

  def task_params(task: str) -> Any:
    chosen = choose(task)
    method.selected[task] = [names[i] for i in chosen]
    return part.place(model, _merged_model(experts, chosen), experts.mesh, experts.rules)

  return dataclasses.replace(method, task_params=task_params, selected=method.selected)


@register("roe", auxiliary=("roe_index",))
def build_roe(experts: Experts) -> Method:
  return _per_task(experts, _selector(experts, 1))


@register("roe_merged", auxiliary=("roe_index",))
def build_roe_merged(experts: Experts) -> Method:
  return _per_task(experts, _selector(experts, roe_settings()["merge_k"]))


@register("best_expert")
def build_best_expert(experts: Experts) -> Method:
  """ELM's oracle selection: per task, each expert alone is scored on the task's evaluation examples (E
  evaluations per task) and the best one is used."""
  from moe_jax.evaluation.evaluate import evaluate_task, primary_metric  # pylint: disable=g-import-not-at-top

  model = build_model(experts.config, experts.single())
  singles: dict[int, Any] = {}  # expert i alone, placed once and scored on every task

  def alone(i: int) -> Any:
    if i not in singles:
      singles[i] = part.place(model, _merged_model(experts, np.array([i])), experts.mesh, experts.rules)
    return singles[i]

  def best(task: str) -> np.ndarray:
    scores = [primary_metric(evaluate_task(
        model, alone(i), task, experts.eval_split, experts.eval_batch_size, experts.lengths, "auto",
        max_examples=experts.max_eval_examples)["metrics"]) for i in range(experts_count(experts))]
    return np.array([int(np.argmax(scores))])  # ties: the lower expert index

  return _per_task(experts, best)
