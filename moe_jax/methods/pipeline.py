"""The whole PHATGOOSE pipeline as one gin job: backbone -> one expert per task -> its gate -> concatenation ->
every routing/merging method evaluated on the same experts -> `results.md` and `routing.png`.

The backbone is multitask-trained here (the demo: a tiny T5 from scratch, `multitask_steps > 0`) or taken as it is
from `init_from` (`multitask_steps = 0`: a pretrained T5 such as t5-xl-lm-adapt, the real-scale configs). The
"multitask" method evaluates that backbone, or `multitask_from` (e.g. FLAN-T5-XL, a T0-style P3 model).

`python -m moe_jax.train --gin_file=gin/phatgoose.gin` runs it; each stage is skipped when its product exists, so
an interrupted pipeline picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from moe_jax import fs
from moe_jax.errors import ConfigError, MismatchError
from moe_jax.evaluation.scoring import batch_rows, pad_tokens
from moe_jax.methods import average_activation, merged, retrieval
from moe_jax.methods.concatenate import concatenate
from moe_jax.data import vocab
from moe_jax.methods.routing import routing_shares
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.routers import Fixed, Phatgoose, Uniform
from moe_jax.models.t5 import Transformer
from moe_jax.plots import plot_routing
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import loop
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import check_same

METHODS = ("multitask", "merged", "merged_factors", "uniform", "phatgoose", "average_activation", "retrieval",
           "oracle")
# The score reported per task: the first of these its metric functions give (rank classification gives accuracy).
PRIMARY_METRICS = ("accuracy", "exact_match", "rougeLsum")


@dataclasses.dataclass
class Method:
  """What one method evaluates: a model, its parameters and, for per-example routing, the routing ids."""

  model: Transformer
  params: Any
  routing_ids_fn: Callable[[str, Sequence[dict]], Sequence[int]] | None = None


def skill_of(task: str) -> str:
  return task.removesuffix("_heldout")


@gin.configurable(denylist=["gin_config_str"])
def phatgoose_pipeline(run_dir: str = gin.REQUIRED, base_mixture: str = "synthetic_heldin",
                       init_from: str | None = None, multitask_from: str | None = None,
                       expert_tasks: Sequence[str] | None = None, eval_tasks: Sequence[str] | None = None,
                       methods: Sequence[str] = METHODS, top_k: int = 2, multitask_steps: int = 1000,
                       expert_steps: int = 1000, gate_steps: int = 100, eval_split: str = "validation",
                       max_eval_examples: int | None = 200, activation_examples: int = 1000,
                       retrieval_examples: int = 1000, eval_batch_size: int = 32,
                       feature_lengths: Mapping[str, int] | None = None, model_config: T5Config | None = None,
                       experts: ExpertConfig | None = None, gin_config_str: str = "") -> str:
  """Run every stage under `run_dir` and return the path of `results.md`.

  Defaults for the built-in synthetic tasks: one expert per `tasks.synthetic.EXPERT_TASKS` (held-in templates),
  evaluated on those tasks and on their held-out templates. `eval_tasks` may name mixtures (they expand to their
  tasks, and the table reports their mean: a T0 dataset over its templates); 'oracle' needs every evaluation task
  to be, or end in `_heldout` after, an expert task.
  """
  from tasks import synthetic  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ConfigError(f"phatgoose_pipeline.methods: unknown {unknown}; expected some of {METHODS}")
  config = model_config or T5Config()
  expert_tasks = list(expert_tasks or synthetic.EXPERT_TASKS)
  eval_tasks = list(eval_tasks or [*expert_tasks, *synthetic.HELDOUT_TASKS])
  lengths = dict(feature_lengths or synthetic.FEATURE_LENGTHS)
  common = dict(model_config=config, feature_lengths=lengths)
  fs.makedirs(run_dir)
  if gin_config_str and jax.process_index() == 0:
    fs.write_text(fs.join(run_dir, "config.gin"), gin_config_str)

  common["gin_config_str"] = gin_config_str  # every stage writes its config.gin too
  if multitask_steps > 0:
    backbone_dir = fs.join(run_dir, "multitask")
    loop.train(model_dir=backbone_dir, mixture_or_task_name=base_mixture, stage="multitask",
               total_steps=multitask_steps, init_from=init_from, validate_every=0, **common)
  elif init_from is None:
    raise ConfigError("phatgoose_pipeline: multitask_steps=0 needs init_from (a pretrained backbone)")
  else:
    backbone_dir = init_from
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(backbone_dir, config, part.logical_shardings(
      part.abstract_params(Transformer(config)), mesh, rules), seed=0)  # once, for every stage below
  gate_files = []
  for task in expert_tasks:
    expert_dir = fs.join(run_dir, "experts", task)
    loop.train(model_dir=expert_dir, mixture_or_task_name=task, stage="expert", total_steps=expert_steps,
               init_from=backbone_dir, experts=experts, backbone=backbone, **common)
    gate_files.append(loop.train(model_dir=fs.join(run_dir, "gates", task), mixture_or_task_name=task,
                                 stage="gate", total_steps=gate_steps, init_from=backbone_dir,
                                 expert_from=expert_dir, experts=experts, backbone=backbone, **common))

  moe_file = fs.join(run_dir, "moe.safetensors")
  if not fs.exists(moe_file):
    concatenate(gate_files, moe_file)
  with vocab.using(backbone.vocabulary):
    return evaluate_methods(run_dir, config, backbone, moe_file, expert_tasks, eval_tasks, methods, top_k,
                            experts, eval_split, max_eval_examples, activation_examples, retrieval_examples,
                            eval_batch_size, lengths, multitask_from)


def build_methods(names: Sequence[str], config: T5Config, backbone: Any, moe_tree: Any, expert_tasks: Sequence[str],
                  top_k: int, experts: ExpertConfig | None, activation_examples: int, retrieval_examples: int,
                  lengths: Mapping[str, int], mesh: Mesh, rules: part.Rules, multitask: Any = None
                  ) -> dict[str, Method]:
  """The model/params/routing of each method on the same backbone and experts (`multitask`: the multitask
  method's parameters, if not the backbone's), run inside `partitioning.activate(mesh, rules)`.

  Every method's parameters are placed once, as the rules shard its model (`partitioning.place`): the MoE tree
  (host NumPy from the file) goes onto the mesh before anything is built from it, so merges, Average Activation
  and retrieval compute on the devices, and scoring never uploads a tree per batch. Methods on the same expert
  tree share its arrays.
  """
  from moe_jax.data.pipeline import mixture_examples, train_batches  # pylint: disable=g-import-not-at-top

  modules, num, rank = ex.layout(moe_tree)  # the layout comes from the MoE file, not from gin
  layout = lambda router: ex.layout_config(modules, num, rank, dataclasses.replace(experts or ExpertConfig(),
                                                                                   router=router))
  method = lambda model, params, routing_ids_fn=None: Method(model, part.place(model, params, mesh, rules),
                                                             routing_ids_fn)
  with_experts = part.place(Transformer(config, layout(Uniform())), ex.merge(backbone, moe_tree), mesh, rules)
  backbone, moe_tree = ex.split(with_experts)  # both on the mesh now
  built: dict[str, Method] = {}
  for name in names:
    if name == "multitask":
      built[name] = method(Transformer(config), backbone if multitask is None else multitask)
    elif name == "merged":  # the paper's Merged Experts: W + mean_i B_i A_i / r, kept apart from W under bf16
      merged_config, params = merged.merged_experts(config, backbone, moe_tree)
      built[name] = method(Transformer(merged_config), params)
    elif name == "merged_factors":  # the released code's average_lora_weights: mean A, mean B, one LoRA
      one = ex.layout_config(modules, 1, rank, dataclasses.replace(experts or ExpertConfig(), router=Uniform()))
      built[name] = method(Transformer(config, one), ex.merge(backbone, merged.average_factors(moe_tree)))
    elif name == "uniform":
      built[name] = method(Transformer(config, layout(Uniform())), with_experts)
    elif name == "phatgoose":
      built[name] = method(Transformer(config, layout(Phatgoose(k=top_k))), with_experts)
    elif name == "average_activation":  # unpacked examples: a packed row would mix tasks' positions in one mean
      batches = [train_batches(task, lengths, batch_rows(32), seed=0, pack=False) for task in expert_tasks]
      routers = average_activation.average_activation_routers(config, backbone, moe_tree, batches,
                                                              max_examples=activation_examples)
      built[name] = method(Transformer(config, layout(Phatgoose(k=top_k))), ex.merge(with_experts, routers))
    elif name == "retrieval":
      embed = _fixed_shape(retrieval.encoder_mean_embedder(config, backbone), lengths["inputs"], batch_rows(32))
      stored = [embed.tokens(mixture_examples(t, "train", lengths, retrieval_examples)) for t in expert_tasks]
      index = retrieval.RetrievalIndex.build(embed, stored, max_per_expert=retrieval_examples)
      route = lambda task, examples: index.route_tokens(embed.tokens(examples))
      built[name] = method(Transformer(config, layout(Fixed())), with_experts, route)
    elif name == "oracle":
      ids = lambda task, examples: [_oracle_expert(task, expert_tasks)] * len(examples)
      built[name] = method(Transformer(config, layout(Fixed())), with_experts, ids)
  return built


class _fixed_shape:  # pylint: disable=invalid-name
  """An embedding function called on fixed [batch, length] blocks (no recompiles for every query count)."""

  def __init__(self, embed: Callable[[np.ndarray], np.ndarray], length: int, batch: int):
    self.embed, self.length, self.batch = embed, length, batch

  def tokens(self, examples: Sequence[dict]) -> np.ndarray:
    return pad_tokens([e["inputs"] for e in examples], self.length)

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    n = len(tokens)
    padded = np.concatenate([tokens, np.repeat(tokens[:1], -n % self.batch, axis=0)])
    return np.concatenate([self.embed(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch)])[:n]


def _oracle_expert(task: str, expert_tasks: Sequence[str]) -> int:
  if skill_of(task) not in expert_tasks:
    raise ConfigError(f"oracle routing: evaluation task {task!r} has no expert of its own (experts: "
                      f"{list(expert_tasks)[:5]}...); leave 'oracle' out of phatgoose_pipeline.methods")
  return list(expert_tasks).index(skill_of(task))


def evaluate_methods(run_dir: str, config: T5Config, loaded: Any, moe_file: str, expert_tasks: Sequence[str],
                     eval_tasks: Sequence[str], methods: Sequence[str], top_k: int, experts: ExpertConfig | None,
                     split: str, max_examples: int | None, activation_examples: int, retrieval_examples: int,
                     batch_size: int, lengths: Mapping[str, int], multitask_from: str | None = None) -> str:
  """Evaluate every method on every task; write results.json, results.md and routing.png under `run_dir`."""
  from moe_jax.data.pipeline import expand_tasks  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation.evaluate import evaluate_task  # pylint: disable=g-import-not-at-top

  mesh, rules = part.make_mesh(), part.axis_rules()
  shardings = part.logical_shardings(part.abstract_params(Transformer(config)), mesh, rules)
  moe_tree, metadata = ckpt.load_experts(moe_file, config)  # host NumPy: build_methods puts it on the mesh once
  check_same(metadata.get("backbone"), loaded, f"MoE file {moe_file}")
  order = [e["task"] for e in metadata.get("experts", [])] or list(expert_tasks)
  if order != list(expert_tasks):
    raise MismatchError(f"{moe_file} holds experts {order}, but the pipeline expects {list(expert_tasks)}")
  multitask = None
  if multitask_from is not None:
    baseline = loop.load_backbone(multitask_from, config, shardings, seed=0)
    if baseline.vocabulary.record() != loaded.vocabulary.record():
      raise MismatchError(f"multitask_from={multitask_from!r} reads {baseline.vocabulary.describe()}, but the "
                          f"backbone reads {loaded.vocabulary.describe()}: the methods must score the same tokens")
    multitask = baseline.params
  table: dict[str, dict[str, float]] = {}
  with part.activate(mesh, rules):
    built = build_methods(methods, config, loaded.params, moe_tree, expert_tasks, top_k, experts,
                          activation_examples, retrieval_examples, lengths, mesh, rules, multitask)
    for name, method in built.items():
      table[name] = {}
      for group in eval_tasks:
        scores = [primary_metric(evaluate_task(method.model, method.params, task, split, batch_size, lengths,
                                               "auto", max_examples=max_examples,
                                               routing_ids_fn=method.routing_ids_fn)["metrics"])
                  for task in expand_tasks([group])]
        table[name][group] = float(np.mean(scores))
      print(f"{name}: mean score {np.mean(list(table[name].values())):.2f}")
    shares = None if "phatgoose" not in built else routing_shares(
        built["phatgoose"].model, built["phatgoose"].params, eval_tasks, split, lengths, max_examples)
  path = write_table(table, eval_tasks, run_dir)
  if shares is not None and jax.process_index() == 0:  # every process computes (the arrays span them all); one writes
    arrays = io.BytesIO()
    np.savez(arrays, tasks=np.array(eval_tasks), experts=np.array(expert_tasks),
             **{k.replace("/", "."): v for k, v in shares.items()})
    fs.write_bytes(fs.join(run_dir, "routing.npz"), arrays.getvalue())
    plot_routing(shares, list(eval_tasks), [t.removeprefix("synthetic_") for t in expert_tasks],
                 fs.join(run_dir, "routing.png"))
  return path


def primary_metric(metrics: Mapping[str, float]) -> float:
  for name in PRIMARY_METRICS:
    if name in metrics:
      return float(metrics[name])
  raise ConfigError(f"no primary metric ({PRIMARY_METRICS}) among {sorted(metrics)}")


def write_table(table: Mapping[str, Mapping[str, float]], tasks: Sequence[str], run_dir: str) -> str:
  """results.md (method x task accuracy, with held-in, held-out and overall means) and results.json, written by
  process 0 only; returns the results.md path on every process."""
  heldout = [t for t in tasks if t.endswith("_heldout")]
  heldin = [t for t in tasks if t not in heldout]
  groups = [("mean held-in", heldin), ("mean held-out", heldout), ("mean", list(tasks))]
  groups = [(label, ts) for label, ts in groups if ts]
  short = lambda t: t.removeprefix("synthetic_")
  header = ["method", *map(short, tasks), *(label for label, _ in groups)]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  summary = {}
  for method, scores in table.items():
    means = [float(np.mean([scores[t] for t in ts])) for _, ts in groups]
    summary[method] = dict(zip((label for label, _ in groups), means))
    cells = [method, *(f"{scores[t]:.1f}" for t in tasks), *(f"**{m:.1f}**" for m in means)]
    rows.append("| " + " | ".join(cells) + " |")
  text = ("Score per method and task: rank-classification accuracy (%), else exact match (%) or ROUGE-Lsum of "
          "greedy generation.\n\n" + "\n".join(rows) + "\n")
  path = fs.join(run_dir, "results.md")
  if jax.process_index() == 0:
    fs.write_text(path, text)
    fs.write_text(fs.join(run_dir, "results.json"), json.dumps({"tasks": table, "summary": summary}, indent=2) + "\n")
  return path
