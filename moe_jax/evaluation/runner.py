"""The evaluation run behind `python -m moe_jax.evaluate`: a backbone, optionally with experts, on seqio tasks.

Writes `results.json`, `results.md` and `predictions/<task>.jsonl` to `output_dir` (process 0), plus `config.gin`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.data import vocab
from moe_jax.errors import ConfigError
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.interface import build_model
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import Backbone, check_same, load_backbone


def load_expert_stack(paths: Sequence[str], config: T5Config,
                      backbone: Backbone | None = None) -> tuple[Any, list[dict[str, Any]]]:
  """Expert or MoE files (or run dirs holding `expert.safetensors`) stacked in order on the expert axis, with
  each file's metadata; with `backbone`, every file must have been trained on its weights."""
  trees, metadata = [], []
  for path in paths:
    tree, meta = ckpt.load_experts(ckpt.expert_file(path), config)
    if backbone is not None:
      check_same(meta.get("backbone"), backbone, f"expert file {path}")
    trees.append(tree)
    metadata.append(meta)
  return ex.stack(trees, [m.get("task") or p for m, p in zip(metadata, paths)]), metadata


@gin.configurable(denylist=["gin_config_str"])
def evaluate(output_dir: str = gin.REQUIRED, tasks: Sequence[str] = gin.REQUIRED, split: str = "validation",
             model_config: T5Config | None = None, experts: ExpertConfig | None = None, init_from: str | None = None,
             expert_from: Sequence[str] = (), library: str | None = None,
             library_experts: Sequence[str] | None = None, library_tags: Sequence[str] | None = None,
             methods: Sequence[str] | None = None, top_k: int = 2, batch_size: int = 32, feature_lengths: Mapping[str, int] | None = None, mode: str = "auto",
             length_normalize: bool = True, max_examples: int | None = None,
             gin_config_str: str = "") -> dict[str, dict[str, float]]:
  """Evaluate the backbone from `init_from`, with experts routed by `experts.router`, on every task of `tasks`
  (mixtures expand to their tasks). The experts: those of `expert_from` (expert or concatenated MoE files) stacked
  in order, or those of the expert library at `library` (a URI): `library_experts` in that order, else all of
  them, keeping those tagged with every one of `library_tags`.

  `methods` (names from `moe_jax.methods.registry`, with `library`): every method on those experts instead, in one
  table (`output_dir/results.md`, as the PHATGOOSE pipeline writes it). An expert's tasks (its library entry's,
  else its name) make the held-in columns and its oracle tasks; the methods that read an expert's data (Average
  Activation, retrieval) read them all (a Model-Based Clustering expert's cluster). Returns
  {method: {task: score}}."""
  config = model_config or T5Config()
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone_shardings = part.logical_shardings(part.abstract_params(build_model(config)), mesh, rules)
  backbone = load_backbone(init_from, config, backbone_shardings, seed=0)
  params = backbone.params
  layout = None
  if expert_from and library:
    raise ConfigError("evaluate: give expert_from (expert files) or library (an expert library), not both")
  if methods:
    if not library:
      raise ConfigError("evaluate.methods needs evaluate.library: the methods route or merge a library's experts")
    return _evaluate_methods(output_dir, tasks, split, config, experts, backbone, library, library_experts,
                             library_tags, methods, top_k, batch_size, feature_lengths, max_examples, gin_config_str)
  if library:
    from moe_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
    chosen = ExpertLibrary(library, read_only=True)
    stacked, metadata = chosen.stack(chosen.select(library_experts, library_tags))
    check_same(metadata.get("backbone"), backbone, f"the experts of {library}")
  elif expert_from:
    stacked, _ = load_expert_stack(expert_from, config, backbone)
  if expert_from or library:  # the layout (modules, rank, count) comes from the experts, not from gin
    modules, num_experts, rank = ex.layout(stacked)
    layout = ex.layout_config(modules, num_experts, rank, experts)
    params = ex.merge(params, stacked)
  model = build_model(config, layout)
  params = part.place(model, params, mesh, rules)  # the experts (host NumPy) onto the mesh once, split per the rules
  with vocab.using(backbone.vocabulary):
    return _evaluate(model, params, tasks, output_dir, split, batch_size, feature_lengths, mode, length_normalize,
                     max_examples, gin_config_str, config, backbone.vocabulary, mesh, rules)


def _evaluate_methods(output_dir: str, tasks: Sequence[str], split: str, config: Any, experts: ExpertConfig | None,
                      backbone: Backbone, library: str, names: Sequence[str] | None, tags: Sequence[str] | None,
                      methods: Sequence[str], top_k: int, batch_size: int, feature_lengths: Mapping[str, int] | None,
                      max_examples: int | None, gin_config_str: str) -> dict[str, dict[str, float]]:
  """`evaluate` with `methods`: the PHATGOOSE pipeline's evaluation of the chosen library experts."""
  import json  # pylint: disable=g-import-not-at-top

  from moe_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  from moe_jax.methods import pipeline  # pylint: disable=g-import-not-at-top

  chosen = ExpertLibrary(library, read_only=True)  # auxiliary data is read, computed when absent, never written
  selected = chosen.select(names, tags)
  moe = chosen.stack(selected)
  expert_tasks, skills = pipeline.expert_data(chosen, selected)
  if jax.process_index() == 0 and gin_config_str:
    fs.write_text(fs.join(output_dir, "config.gin"), gin_config_str)
  lengths = dict(feature_lengths or {"inputs": 512, "targets": 128})
  with vocab.using(backbone.vocabulary):
    pipeline.evaluate_methods(output_dir, config, backbone, moe, expert_tasks, list(tasks), list(methods), top_k,
                              experts, split, max_examples, 1000, 1000, batch_size, lengths, None, chosen, skills)
  if jax.process_index() != 0:  # process 0 wrote the table
    return {}
  return json.loads(fs.read_text(fs.join(output_dir, "results.json")))["tasks"]


def _evaluate(model: nn.Module, params: Any, tasks: Sequence[str], output_dir: str, split: str, batch_size: int,
              feature_lengths: Mapping[str, int] | None, mode: str, length_normalize: bool, max_examples: int | None,
              gin_config_str: str, config: T5Config, spec: vocab.VocabSpec, mesh: Any,
              rules: Any) -> dict[str, dict[str, float]]:
  """`evaluate` with the backbone's vocabulary active."""
  from moe_jax.data.pipeline import expand_tasks  # seqio only when evaluating

  names = expand_tasks(tasks)
  vocab.check_tasks(names, spec, config.vocab_size, config.name)
  if jax.process_index() == 0 and gin_config_str:
    fs.write_text(fs.join(output_dir, "config.gin"), gin_config_str)

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
