"""The whole PHATGOOSE pipeline as one gin job: generic backbone -> one expert per task -> its gate ->
concatenation -> every routing/merging method evaluated on the same experts -> `results.md` and `routing.png`.

The backbone is pretrained here on a generic objective (the demo: a tiny T5 from scratch, `pretrain_steps > 0`) or
taken as it is from `init_from` (a pretrained T5 such as t5-xl-lm-adapt, the real-scale configs). The "multitask"
method is a separate model trained from that backbone on the expert tasks together (the demo), or
`multitask_from` (e.g. T0-3B, FLAN-T5-XL).

`python -m moe_jax.train --gin_file=gin/phatgoose.gin` runs it; each stage is skipped when its product exists, so
an interrupted pipeline picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.checkpoints import identity
from moe_jax.errors import ConfigError, MismatchError
from moe_jax.data import vocab
from moe_jax.methods import registry
from moe_jax.library import Expert, ExpertInfo, ExpertLibrary, make_expert
from moe_jax.methods.routing import routing_report, write_routing_files
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.routers import Uniform
from moe_jax.models.interface import build_model
from moe_jax.plots import task_label
from moe_jax.progress import JobProgress
from moe_jax.evaluation.evaluate import primary_metric
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import loop
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import check_same

METHODS = registry.available()
MBC_METHODS = ("merged", "ties", "phatgoose", "arrow", "oracle")
GATED_METHODS = ("phatgoose", "phatgoose_merged")  # the methods that read the trained gates


@gin.configurable(denylist=["gin_config_str"])
def phatgoose_pipeline(run_dir: str = gin.REQUIRED, init_from: str | None = None, pretrain_mixture: str | None = None,
                       pretrain_steps: int = 0, base_mixture: str | None = None, multitask_steps: int | None = None,
                       multitask_from: str | None = None, expert_tasks: Sequence[str] | None = None,
                       eval_tasks: Sequence[str] | None = None, methods: Sequence[str] = METHODS, top_k: int = 2,
                       expert_steps: int = 1000, gate_steps: int = 100, eval_split: str = "validation",
                       max_eval_examples: int | None = 200, activation_examples: int = 1000,
                       retrieval_examples: int = 1000, eval_batch_size: int = 32,
                       feature_lengths: Mapping[str, int] | None = None, model_config: T5Config | None = None,
                       experts: ExpertConfig | None = None, seeds: Sequence[int] | None = None,
                       seed: int | None = None, library: str | None = None, mbc_clusters: int = 0,
                       mbc_methods: Sequence[str] = MBC_METHODS, prompt_experts: bool = False,
                       gin_config_str: str = "") -> str:
  """Run every stage under `run_dir` and return the path of `results.md`.

  Every gated expert goes into the expert library at `library` (a URI, `moe_jax.library`; default:
  `run_dir/library`) under its task's name, and the methods are evaluated on the experts read back from there.
  An expert the library already holds with the same identity (backbone, vocabulary, layout and both stages'
  settings) is not trained again: point several runs at one library to share their experts.

  `prompt_experts` (ELM's prompt experts): one expert per task of each of `expert_tasks` that is a mixture (a P3
  dataset's templates; default: the demo's held-in (skill, template) tasks, evaluated on every held-out (skill,
  template)). `gate_steps = 0` trains no gates (ELM's experts have none), for methods that do not read them.

  `mbc_clusters` > 0 adds Model-Based Clustering (`moe_jax.methods.mbc_job`): the library's experts clustered into
  that many clusters, one expert and gate trained per cluster on the union of its tasks (as each task expert is
  trained) into `run_dir/mbc_library`, and `mbc_methods` evaluated on those experts (their own results and routing
  files under `run_dir/mbc`) as the rows `mbc/<method>` of the same table. It costs `mbc_clusters` more experts and
  gates, and the evaluation of `mbc_methods`.

  `seed` seeds every stage (initialisation and data order; default: `train.seed`). `seeds` runs the whole pipeline
  once per seed, under `run_dir/seed_<s>`, and writes `run_dir/results.md` with each score's mean over the seeds
  and its spread (sample standard deviation), for numbers that vary across machines.

  The stages mirror PHATGOOSE's setting. The backbone is generic: pretrained here on `pretrain_mixture` for
  `pretrain_steps` (the demo: a tiny T5 from scratch, prefix LM on generic text), or taken as it is from `init_from`
  (`pretrain_steps = 0`: e.g. t5-xl-lm-adapt). Experts and gates are trained from that frozen backbone. The
  "multitask" method is a separate model, as T0 is: `multitask_from`, or trained here from the backbone on
  `base_mixture` (default: the expert tasks together) for `multitask_steps` (default: the experts' total budget,
  len(expert_tasks) * expert_steps, at the same batch size); with neither, it is the backbone itself.

  Defaults are the built-in demo's (`tasks.demo`): one expert per held-in task, evaluated on those tasks, their
  held-out templates and the held-out tasks. `eval_tasks` may name mixtures (they expand to their tasks, and the
  table reports their mean: a T0 dataset over its templates); 'oracle' needs every evaluation task to be, or end in
  `_heldout` after, an expert task.
  """
  from tasks import common as task_common, demo, synthetic  # pylint: disable=g-import-not-at-top

  if prompt_experts:  # ELM's prompt experts: one per task of each named mixture (a dataset's templates)
    from moe_jax.data.pipeline import expand_tasks  # pylint: disable=g-import-not-at-top  (seqio)

    expert_tasks = expand_tasks(expert_tasks or demo.PROMPT_EXPERT_TASKS)
    eval_tasks = eval_tasks or demo.PROMPT_TARGET_TASKS
  expert_tasks = list(expert_tasks or demo.EXPERT_TASKS)
  if seeds:
    arguments = {k: v for k, v in locals().items() if k in _PIPELINE_ARGUMENTS}
    for s in seeds:
      seed_dir = fs.join(run_dir, f"seed_{s}")
      phatgoose_pipeline(**{**arguments, "run_dir": seed_dir, "seeds": None, "seed": s,
                            "library": None if library is None else _seed_library(library, s)})
    return write_seed_tables(run_dir, [fs.join(run_dir, f"seed_{s}") for s in seeds], expert_tasks)
  registry.check(methods, "phatgoose_pipeline.methods")
  gated = sorted(set(methods) & set(GATED_METHODS))
  if gate_steps == 0 and gated:
    raise ConfigError(f"phatgoose_pipeline: gate_steps=0 trains no gates, but the methods {gated} route by them; "
                      "give gate_steps > 0 or leave them out")
  if mbc_clusters:
    registry.check(mbc_methods, "phatgoose_pipeline.mbc_methods")
  config = model_config or T5Config()
  eval_tasks = list(eval_tasks or (demo.EVAL_TASKS if expert_tasks == list(demo.EXPERT_TASKS) else expert_tasks))
  lengths = dict(feature_lengths or synthetic.FEATURE_LENGTHS)
  common = dict(model_config=config, feature_lengths=lengths)
  fs.makedirs(run_dir)
  if gin_config_str and jax.process_index() == 0:
    fs.write_text(fs.join(run_dir, "config.gin"), gin_config_str)

  common["gin_config_str"] = gin_config_str  # every stage writes its config.gin too
  if pretrain_steps > 0 and pretrain_mixture is None:
    raise ConfigError("phatgoose_pipeline: pretrain_steps > 0 needs pretrain_mixture (a generic objective)")
  if pretrain_steps == 0 and init_from is None:
    raise ConfigError("phatgoose_pipeline: pretrain_steps=0 needs init_from (a pretrained backbone)")
  if multitask_steps is None:
    multitask_steps = 0 if multitask_from else len(expert_tasks) * expert_steps
  multitask_steps = multitask_steps if "multitask" in methods else 0
  # Work in training steps; scoring one batch of one task (its choices) is counted as about two steps.
  eval_units = 2 * (len(methods) + (len(mbc_methods) if mbc_clusters else 0)) * len(eval_tasks) * -(
      -(max_eval_examples or 1000) // eval_batch_size)
  progress = JobProgress("phatgoose_pipeline", pretrain_steps + multitask_steps
                         + (len(expert_tasks) + mbc_clusters) * (expert_steps + gate_steps) + eval_units)

  def stage(name: str, model_dir: str, kind: str, steps: int, **kwargs: Any) -> str:
    worked = not fs.exists(loop.stage_product(model_dir, kind))
    product = loop.train(model_dir=model_dir, stage=kind, total_steps=steps, **kwargs,
                         **({} if seed is None else {"seed": seed}))
    progress.done(name, steps, worked)
    return product

  if pretrain_steps > 0:
    backbone_dir = fs.join(run_dir, "backbone")
    stage("pretraining", backbone_dir, "multitask", pretrain_steps, mixture_or_task_name=pretrain_mixture,
          init_from=init_from, validate_every=0, **common)
  else:
    backbone_dir = init_from
  if multitask_steps > 0:
    if multitask_from is not None:
      raise ConfigError("phatgoose_pipeline: give multitask_from (a multitask model) or multitask_steps, not both")
    if base_mixture is None:
      base_mixture = "phatgoose_pipeline_expert_tasks"
      task_common.add_mixture(base_mixture, expert_tasks)
    multitask_from = fs.join(run_dir, "multitask")
    stage("multitask baseline", multitask_from, "multitask", multitask_steps, mixture_or_task_name=base_mixture,
          init_from=backbone_dir, validate_every=0, **common)
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(backbone_dir, config, part.logical_shardings(
      part.abstract_params(build_model(config)), mesh, rules), seed=0)  # once, for every stage below
  expert_library = ExpertLibrary(library or fs.join(run_dir, "library"))
  for task in expert_tasks:
    identity_hash = expert_identity(backbone, task, config, experts, expert_steps, gate_steps, lengths, seed)
    if _in_library(expert_library, task, identity_hash):
      progress.done(f"expert and gate {task} (in {expert_library.uri})", expert_steps + gate_steps, worked=False)
      continue
    expert_dir = fs.join(run_dir, "experts", task)
    stage(f"expert {task}", expert_dir, "expert", expert_steps, mixture_or_task_name=task, init_from=backbone_dir,
          experts=experts, backbone=backbone, **common)
    gate_file = None  # gate_steps=0 (ELM's experts): no gate, zero router vectors
    if gate_steps > 0:
      gate_file = stage(f"gate {task}", fs.join(run_dir, "gates", task), "gate", gate_steps,
                        mixture_or_task_name=task, init_from=backbone_dir, expert_from=expert_dir, experts=experts,
                        backbone=backbone, **common)
    if jax.process_index() == 0:
      expert_library.add(library_expert(task, expert_dir, gate_file, identity_hash, gin_config_str))
  _sync(f"library {expert_library.uri}")

  moe_file = fs.join(run_dir, "moe.safetensors")  # the evaluated experts as one file, for moe_jax.evaluate
  moe_tree, moe_metadata = expert_library.stack(expert_tasks)
  if jax.process_index() == 0:
    ckpt.save_experts(moe_file, moe_tree, moe_metadata)
  evaluation = dict(eval_tasks=eval_tasks, top_k=top_k, experts=experts, split=eval_split,
                    max_examples=max_eval_examples, activation_examples=activation_examples,
                    retrieval_examples=retrieval_examples, batch_size=eval_batch_size, lengths=lengths)
  mbc_rows = {}
  if mbc_clusters:
    mbc_library = _train_mbc_experts(run_dir, expert_library, mbc_clusters, config, experts, expert_steps,
                                     gate_steps, lengths, seed, gin_config_str)
    progress.done(f"Model-Based Clustering ({mbc_clusters} experts)", mbc_clusters * (expert_steps + gate_steps))
    mbc_rows = _evaluate_library(fs.join(run_dir, "mbc"), config, backbone, mbc_library, mbc_methods, "mbc/",
                                 evaluation)
  with vocab.using(backbone.vocabulary):
    results = evaluate_methods(run_dir, config, backbone, (moe_tree, moe_metadata), expert_tasks,
                               methods=methods, multitask_from=multitask_from, expert_library=expert_library,
                               more_rows=mbc_rows, **evaluation)
  progress.done("evaluation", eval_units)
  return results


def _train_mbc_experts(run_dir: str, expert_library: ExpertLibrary, k: int, config: Any,
                       experts: ExpertConfig | None, expert_steps: int, gate_steps: int, lengths: Mapping[str, int],
                       seed: int | None, gin_config_str: str) -> ExpertLibrary:
  """The Model-Based Clustering experts of `expert_library` (`mbc_job.mbc_experts`) in `run_dir/mbc_library`."""
  from moe_jax.methods import mbc_job  # pylint: disable=g-import-not-at-top  (it builds on this module)

  uri = mbc_job.mbc_experts(library=expert_library.uri, output_library=fs.join(run_dir, "mbc_library"),
                            run_dir=fs.join(run_dir, "mbc", "experts"), k=k, expert_steps=expert_steps,
                            gate_steps=gate_steps, model_config=config, experts=experts, feature_lengths=lengths,
                            train_seed=seed, gin_config_str=gin_config_str)
  _sync(f"library {uri}")
  return ExpertLibrary(uri, read_only=True)


def _evaluate_library(output_dir: str, config: Any, backbone: Any, library: ExpertLibrary, methods: Sequence[str],
                      prefix: str, evaluation: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """`methods` on every expert of `library`, their results and routing files under `output_dir`; returns the
  table's rows (`prefix + method`)."""
  names = library.names()
  expert_tasks, skills = expert_data(library, names)
  with vocab.using(backbone.vocabulary):
    evaluate_methods(output_dir, config, backbone, library.stack(names), expert_tasks, methods=methods,
                     expert_library=library, expert_skills=skills, row_prefix=prefix, **evaluation)
  return json.loads(fs.read_text(fs.join(output_dir, "results.json")))["tasks"]


def expert_data(library: ExpertLibrary, names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
  """(the data each expert was trained on: its task, or a seqio mixture of its tasks registered here as
  `library_expert_<name>`; each expert's tasks, from its library entry, else its name) for `names` of `library`:
  what Average Activation and retrieval read, and what makes a task held-in and gives it its oracle expert."""
  from tasks import common as task_common  # pylint: disable=g-import-not-at-top  (seqio)

  skills = [list(library.info(n).tasks) or [n] for n in names]
  expert_tasks = []
  for name, tasks_of in zip(names, skills):
    mixture = "library_expert_" + re.sub(r"[^\w.:]", "_", name)  # seqio names: word characters, '.' and ':'
    if len(tasks_of) > 1:
      task_common.add_mixture(mixture, tasks_of)
    expert_tasks.append(tasks_of[0] if len(tasks_of) == 1 else mixture)
  return expert_tasks, skills


_PIPELINE_ARGUMENTS = tuple(inspect.signature(phatgoose_pipeline).parameters)


def _seed_library(library: str, seed: int) -> str:
  """Each seed's own library beside `library`: a sub-folder, or on the Hub a sibling repository."""
  library = library.rstrip("/")
  return f"{library}-seed_{seed}" if library.startswith("hf://") else f"{library}/seed_{seed}"


def _sync(name: str) -> None:
  if jax.process_count() > 1:  # process 0 wrote; the others read next
    multihost_utils.sync_global_devices(name)


def expert_identity(backbone: Any, task: str, config: T5Config, experts: ExpertConfig | None, expert_steps: int,
                    gate_steps: int, lengths: Mapping[str, int], seed: int | None) -> str:
  """A hash of what decides a task's gated expert: the backbone's weights and vocabulary and the expert and gate
  stages' records (`loop.planned_record`), known before either stage runs."""
  plan = lambda stage, steps: loop.planned_record(stage, task, config, experts, steps, lengths, seed)
  return identity.config_hash({"backbone": backbone.weights, "vocabulary": backbone.vocabulary.record(),
                               "expert": plan("expert", expert_steps), "gate": plan("gate", gate_steps)})


def _in_library(expert_library: ExpertLibrary, task: str, identity_hash: str) -> bool:
  """Whether the library holds this task's expert as this run would make it; MismatchError if it holds another."""
  if task not in expert_library:
    return False
  found = expert_library.info(task).identity
  if found != identity_hash:
    raise MismatchError(f"library {expert_library.uri} already holds an expert {task!r} made another way (identity "
                        f"{found}, this run's {identity_hash}: other backbone or settings); remove it "
                        f"(python -m moe_jax.library remove {expert_library.uri} {task}) or give another LIBRARY")
  return True


def library_expert(task: str, expert_dir: str, gate_file: str | None, identity_hash: str,
                   gin_config_str: str) -> Expert:
  """A gate stage's product (LoRA and trained gate vector), or without `gate_file` the expert stage's own (zero
  router vectors), as a library expert named after its task, with the stages' records as its config."""
  expert_file = ckpt.expert_file(expert_dir)
  weights, metadata = ckpt.load_experts(gate_file or expert_file)
  expert_stage = ckpt.read_expert_metadata(expert_file)
  info = ExpertInfo(name=task, tasks=[task], backbone=metadata.get("backbone"),
                    config={"expert": expert_stage.get("config"), "gate": gate_file and metadata.get("config")},
                    gin_config=gin_config_str or None, identity=identity_hash,
                    source=fs.absolute(gate_file or expert_file),
                    tags=["phatgoose", "gated"] if gate_file else ["expert"])
  return make_expert(info, weights)


def write_seed_tables(run_dir: str, seed_dirs: Sequence[str], expert_tasks: Sequence[str]) -> str:
  """results.md/json under `run_dir` from the runs in `seed_dirs`: each score's mean over them, then a table of
  its spread (sample standard deviation over the seeds, in points); returns the results.md path."""
  runs = [json.loads(fs.read_text(fs.join(d, "results.json"))) for d in seed_dirs]
  tables = [run["tasks"] for run in runs]
  tasks = list(tables[0][next(iter(tables[0]))])
  columns = [*tasks, *runs[0]["summary"][next(iter(tables[0]))]]
  stack = {m: {c: np.array([{**run["tasks"][m], **run["summary"][m]}[c] for run in runs], np.float64)
               for c in columns} for m in tables[0]}
  mean = {m: {t: float(np.mean(stack[m][t])) for t in tasks} for m in stack}
  spread = {m: {c: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for c, v in row.items()} for m, row in stack.items()}
  appendix = (f"## Spread over {len(seed_dirs)} seeds\n\nThe table above holds each score's mean over the runs "
              f"{', '.join(fs.basename(d) for d in seed_dirs)}; this one its sample standard deviation (points; the "
              "mean columns: of the runs' means).\n\n" + _markdown_table(spread, columns, columns[len(tasks):]))
  return write_table(mean, tasks, run_dir, expert_tasks, appendix)


def build_methods(names: Sequence[str], config: Any, backbone: Any, moe_tree: Any, expert_tasks: Sequence[str],
                  top_k: int, experts: ExpertConfig | None, activation_examples: int, retrieval_examples: int,
                  lengths: Mapping[str, int], mesh: Mesh, rules: part.Rules, multitask: Any = None,
                  expert_library: ExpertLibrary | None = None, expert_names: Sequence[str] = (),
                  expert_skills: Sequence[Sequence[str]] = (), eval_split: str = "validation",
                  max_eval_examples: int | None = None, eval_batch_size: int = 32) -> dict[str, registry.Method]:
  """The model/params/routing of each named method (`moe_jax.methods.registry`) on the same backbone and experts
  (`multitask`: the multitask method's parameters, if not the backbone's), run inside
  `partitioning.activate(mesh, rules)`. With `expert_library` (holding expert i under the name `expert_names[i]`,
  default `expert_tasks[i]`),
  the methods' auxiliary data is read from it when it has them for these settings, computed and stored otherwise.

  The backbone and the experts are placed once, as the rules shard the model (`partitioning.place`): the MoE tree
  (host NumPy) goes onto the mesh before anything is built from it, so merges, Average Activation and retrieval
  compute on the devices, and scoring never uploads a tree per batch. Methods on the same expert tree share its
  arrays.
  """
  registry.check(names, "phatgoose_pipeline.methods")
  modules, num, rank = ex.layout(moe_tree)  # the layout comes from the experts, not from gin
  base = experts or ExpertConfig()
  everything = ex.layout_config(modules, num, rank, dataclasses.replace(base, router=Uniform()))
  with_experts = part.place(build_model(config, everything), ex.merge(backbone, moe_tree), mesh, rules)
  backbone, moe_tree = ex.split(with_experts)  # both on the mesh now
  shared = registry.Experts(config, backbone, moe_tree, with_experts, tuple(expert_tasks), top_k, base, lengths,
                            mesh, rules, multitask, expert_library, activation_examples, retrieval_examples,
                            tuple(expert_names), tuple(tuple(s) for s in expert_skills), eval_split,
                            max_eval_examples, eval_batch_size)
  return registry.build(names, shared)


def evaluate_methods(run_dir: str, config: T5Config, loaded: Any, moe: tuple[Any, dict[str, Any]],
                     expert_tasks: Sequence[str], eval_tasks: Sequence[str], methods: Sequence[str], top_k: int,
                     experts: ExpertConfig | None, split: str, max_examples: int | None, activation_examples: int,
                     retrieval_examples: int, batch_size: int, lengths: Mapping[str, int],
                     multitask_from: str | None = None, expert_library: ExpertLibrary | None = None,
                     expert_skills: Sequence[Sequence[str]] | None = None, row_prefix: str = "",
                     more_rows: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """Evaluate every method on every task; write results.json, results.md and the routing files under `run_dir`.

  `moe`: (host tree, metadata) of the experts, one per expert task in order (`ExpertLibrary.stack`); methods'
  auxiliary data (average activations, retrieval embeddings) is read from and stored in `expert_library`.
  `expert_skills[i]`: the tasks expert i was trained on (default: `expert_tasks[i]`; `expert_tasks[i]` may be a
  mixture of them), which decide the held-in tasks and each task's own expert. The table's rows are
  `row_prefix + method`, then `more_rows` (rows already scored, e.g. methods on other experts)."""
  from moe_jax.data.pipeline import expand_tasks  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation.evaluate import evaluate_task  # pylint: disable=g-import-not-at-top

  mesh, rules = part.make_mesh(), part.axis_rules()
  shardings = part.logical_shardings(part.abstract_params(build_model(config)), mesh, rules)
  moe_tree, metadata = moe  # host NumPy: build_methods puts it on the mesh once
  where = "the experts" if expert_library is None else f"the experts of {expert_library.uri}"
  check_same(metadata.get("backbone"), loaded, where)
  skills = [tuple(s) for s in expert_skills] if expert_skills else [(t,) for t in expert_tasks]
  order = [e["task"] for e in metadata.get("experts", [])] or [s[0] for s in skills]
  if order != [s[0] for s in skills]:
    raise MismatchError(f"{where} are {order}, but the pipeline expects {[s[0] for s in skills]}")
  own = lambda task: registry.own_expert(task, skills)
  multitask = None
  if multitask_from is not None:
    baseline = loop.load_backbone(multitask_from, config, shardings, seed=0)
    if baseline.vocabulary.record() != loaded.vocabulary.record():
      raise MismatchError(f"multitask_from={multitask_from!r} reads {baseline.vocabulary.describe()}, but the "
                          f"backbone reads {loaded.vocabulary.describe()}: the methods must score the same tokens")
    multitask = baseline.params
  table: dict[str, dict[str, float]] = {}
  with part.activate(mesh, rules):
    names = [e.get("name") or e["task"] for e in metadata.get("experts", [])]
    built = build_methods(methods, config, loaded.params, moe_tree, expert_tasks, top_k, experts,
                          activation_examples, retrieval_examples, lengths, mesh, rules, multitask, expert_library,
                          names, skills, split, max_examples, batch_size)
    bar = tqdm(total=len(built) * len(eval_tasks), desc="evaluate methods", unit="task",
               disable=jax.process_index() != 0)
    metrics: dict[str, dict[str, dict[str, float]]] = {}  # every metric of every task a group expands to
    for name, method in built.items():
      table[name], metrics[row_prefix + name] = {}, {}
      for group in eval_tasks:
        bar.update(1)
        if name == "oracle" and own(group) is None:
          table[name][group] = float("nan")  # a held-out task has no expert of its own
          continue
        for task in expand_tasks([group]):
          metrics[row_prefix + name][task] = evaluate_task(
              method.model, method.params_for(task), task, split, batch_size, lengths, "auto",
              max_examples=max_examples, routing_ids_fn=method.routing_ids_fn)["metrics"]
        table[name][group] = float(np.mean([primary_metric(metrics[row_prefix + name][task])
                                            for task in expand_tasks([group])]))
      bar.write(f"{row_prefix}{name}: mean score {np.nanmean(list(table[name].values())):.2f}")
    bar.close()
    heldin = [t for t in eval_tasks if t in {task for s in skills for task in s}]
    report = routing_report(built, table, eval_tasks, heldin, len(expert_tasks), top_k, own, split, lengths,
                            max_examples)
  rows = {**{row_prefix + name: scores for name, scores in table.items()}, **(more_rows or {})}
  selected = {row_prefix + name: m.selected for name, m in built.items() if m.selected}
  path = write_table(rows, eval_tasks, run_dir, [task for s in skills for task in s],
                     report.markdown + _selected_markdown(selected, eval_tasks), metrics)
  if selected and jax.process_index() == 0:
    fs.write_text(fs.join(run_dir, "selected_experts.json"), json.dumps(selected, indent=1) + "\n")
  write_routing_files(report, run_dir, eval_tasks, [task_label(n) for n in names or expert_tasks])
  return path


def _selected_markdown(selected: Mapping[str, Mapping[str, Sequence[str]]], tasks: Sequence[str]) -> str:
  """A results.md section: the experts each per-task method (retrieval of experts, best expert) chose per task."""
  if not selected:
    return ""
  rows = ["| task | " + " | ".join(selected) + " |", "|" + "---|" * (len(selected) + 1)]
  for task in tasks:
    cells = [", ".join(chosen.get(task, [])) or "n/a" for chosen in selected.values()]
    rows.append(f"| {task_label(task)} | " + " | ".join(cells) + " |")
  return "\n## Experts selected per task\n\n" + "\n".join(rows) + "\n"


def _groups(tasks: Sequence[str], expert_tasks: Sequence[str]) -> list[tuple[str, list[str]]]:
  """(label, tasks) of the mean columns: held-in tasks, held-out templates of them, held-out tasks, all. Without
  `expert_tasks`, every `*_heldout` task counts as held out."""
  heldin = [t for t in tasks if t in expert_tasks or (not expert_tasks and not t.endswith("_heldout"))]
  templates = [t for t in tasks if t not in heldin and registry.skill_of(t) in expert_tasks]
  heldout = [t for t in tasks if t not in heldin and t not in templates]
  groups = [("mean held-in", heldin), ("mean held-out templates", templates), ("mean held-out", heldout),
            ("mean", list(tasks))]
  return [(label, ts) for label, ts in groups if ts]


def _summary(table: Mapping[str, Mapping[str, float]], groups: Sequence[tuple[str, Sequence[str]]]
             ) -> dict[str, dict[str, float]]:
  """{method: {group label: mean score}}; NaN (a score that does not exist) makes its means NaN."""
  return {m: {label: float(np.mean([scores[t] for t in ts])) for label, ts in groups} for m, scores in table.items()}


def _markdown_table(table: Mapping[str, Mapping[str, float]], columns: Sequence[str], bold: Sequence[str]) -> str:
  cell = lambda v, column: "n/a" if np.isnan(v) else (f"**{v:.1f}**" if column in bold else f"{v:.1f}")
  rows = ["| " + " | ".join(["method", *map(task_label, columns)]) + " |", "|" + "---|" * (len(columns) + 1)]
  rows += ["| " + " | ".join([m, *(cell(scores[c], c) for c in columns)]) + " |" for m, scores in table.items()]
  return "\n".join(rows) + "\n"


def write_table(table: Mapping[str, Mapping[str, float]], tasks: Sequence[str], run_dir: str,
                expert_tasks: Sequence[str] = (), appendix: str = "",
                metrics: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None) -> str:
  """results.md (method x task score, with the `_groups` means) then `appendix`, and results.json, written by
  process 0 only; returns the results.md path on every process. A score that does not exist (oracle routing of a
  task with no expert) is NaN, shown as n/a, and so is any mean over it. results.json also keeps `metrics`
  ({row: {task: every metric}}), per task a group expands to: each prompt of a dataset, BLEU beside ROUGE."""
  groups = _groups(tasks, expert_tasks)
  summary = _summary(table, groups)
  labels = [label for label, _ in groups]
  text = ("Score per method and task: rank-classification accuracy (%), else exact match (%) or ROUGE-Lsum of "
          "greedy generation.\n\n" + _markdown_table({m: {**table[m], **summary[m]} for m in table},
                                                     [*tasks, *labels], labels)
          + (f"\n{appendix}" if appendix else ""))
  path = fs.join(run_dir, "results.md")
  if jax.process_index() == 0:
    fs.write_text(path, text)
    fs.write_text(fs.join(run_dir, "results.json"), json.dumps(
        {"tasks": table, "summary": summary, **({"metrics": metrics} if metrics else {})}, indent=2) + "\n")
  return path
