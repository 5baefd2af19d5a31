"""The evaluation run behind `python -m moe_jax.evaluate`: a backbone, optionally with experts, on seqio tasks.

Writes `results.json`, `results.md` and `predictions/<task>.jsonl` to `output_dir` (process 0), plus `config.gin`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
from tqdm.auto import tqdm

from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.t5 import Transformer
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import partitioning as part
from moe_jax.training.loop import load_backbone


def load_expert_stack(paths: Sequence[str], config: T5Config) -> tuple[Any, list[dict[str, Any]]]:
  """Expert or MoE files (or run dirs holding `expert.safetensors`) stacked in order on the expert axis, with
  each file's metadata."""
  trees, metadata = [], []
  for path in paths:
    tree, meta = ckpt.load_experts(ckpt.expert_file(path), config)
    trees.append(tree)
    metadata.append(meta)
  return ex.stack(trees, [m.get("task") or p for m, p in zip(metadata, paths)]), metadata


@gin.configurable(denylist=["gin_config_str"])
def evaluate(output_dir: str = gin.REQUIRED, tasks: Sequence[str] = gin.REQUIRED, split: str = "validation",
             model_config: T5Config | None = None, experts: ExpertConfig | None = None, init_from: str | None = None,
             expert_from: Sequence[str] = (), batch_size: int = 32, feature_lengths: Mapping[str, int] | None = None,
             mode: str = "auto", length_normalize: bool = True, max_examples: int | None = None,
             gin_config_str: str = "") -> dict[str, dict[str, float]]:
  """Evaluate the backbone from `init_from`, with the experts of `expert_from` (expert or concatenated MoE files)
  stacked in order and routed by `experts.router` when given, on every task of `tasks` (mixtures expand to their tasks)."""
  config = model_config or T5Config()
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone_shardings = part.logical_shardings(part.abstract_params(Transformer(config)), mesh, rules)
  params = load_backbone(init_from, config, backbone_shardings, seed=0)
  layout = None
  if expert_from:
    stacked, metadata = load_expert_stack(expert_from, config)
    layout = dataclasses.replace(experts or ExpertConfig(), num_experts=sum(m["num_experts"] for m in metadata))
    params = ex.merge(params, stacked)
  model = Transformer(config, layout)
  if expert_from:  # the experts onto the mesh as the rules shard them, not a replica on every device
    params = jax.device_put(params, part.logical_shardings(part.abstract_params(model), mesh, rules))
  from moe_jax.data.pipeline import expand_tasks  # seqio only when evaluating

  names = expand_tasks(tasks)
  if jax.process_index() == 0 and gin_config_str:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(gin_config_str)

  from moe_jax.evaluation.evaluate import evaluate_task, write_results  # pylint: disable=g-import-not-at-top

  metrics, predictions = {}, {}
  with part.activate(mesh, rules):
    for name in tqdm(names, desc="evaluate", unit="task", disable=jax.process_index() != 0):
      result = evaluate_task(model, params, name, split, batch_size, feature_lengths, mode, length_normalize,
                             max_examples)
      metrics[name], predictions[name] = result["metrics"], result["predictions"]
  if jax.process_index() == 0:
    write_results(metrics, output_dir, predictions)
  return metrics
