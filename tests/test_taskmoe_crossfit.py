"""The task-level MoE end to end on CrossFit data in the release format (tasks/crossfit.py), through the commands a
user runs, in-process and shrunk to a tiny T5: stage 1 on `crossfit_train` from a random backbone
(`python -m moe_jax.train --gin_file=gin/taskmoe_stage1.gin`), the stage-2 checkpoint (`python -m
moe_jax.taskmoe.stage2`), stage 2 (gin/taskmoe_stage2.gin), the few-shot transfer job on the split's test tasks
(gin/taskmoe_few_shot.gin: score files per (task, seed) for both models, a resumed job trains nothing, transfer.md
and .json with per-task mean/std and ARG) and the evaluation job (gin/taskmoe_evaluate.gin: results, routing plots,
each run routed by its own task's id)."""

import json
import os

import gin
import jax
import numpy as np
import pytest

import data_fixtures
from test_crossfit import write_tsv

from moe_jax import gin_utils
from moe_jax.models.interface import build_model
from moe_jax.models.taskmoe import expand_pretrained
from moe_jax.taskmoe import analysis, stages
from moe_jax.taskmoe import checkpoint as tckpt
from moe_jax.training import loop
from moe_jax.training import partitioning as part

SEEDS = (13, 100)
# The split file (CrossFit's random.json layout): upstream tasks, one dev task, the few-shot test tasks. Every
# task is a classification task scored by accuracy with two short labels, so a model fine-tuned for a few steps
# outputs a label and scores > 0 (the few-shot report's relative gain divides by the base model's mean).
SPLIT = {"train": ["glue-sst2", "glue-qqp"], "dev": ["glue-mrpc"], "test": ["glue-rte", "superglue-cb"]}
IDS = {"glue-sst2": 0, "glue-qqp": 1, "glue-mrpc": 2, "glue-rte": 3, "superglue-cb": 4}  # train + dev + test order
LABELS = {"glue-sst2": ("good", "bad"), "glue-qqp": ("same", "diff"), "glue-mrpc": ("same", "diff"),
          "glue-rte": ("yes", "no"), "superglue-cb": ("yes", "no")}
K = 16  # CrossFit's k of a classification task (16 per class)
SIZES = {"train": 8, "dev": 4, "test": 8}
LENGTHS = "{'inputs': 48, 'targets': 8}"
TINY = {"T5Config.d_model": 32, "T5Config.num_heads": 2, "T5Config.d_kv": 16, "T5Config.d_ff": 64,
        "T5Config.num_encoder_layers": 1, "T5Config.num_decoder_layers": 1}
MOE = {"TaskMoEConfig.num_copies": 2, "TaskMoEConfig.num_tasks": len(IDS), "TaskMoEConfig.task_dim": 4,
       "TaskMoEConfig.router_hidden": 8}


def label(task, seed, split, i):
  """Labels alternate, except in the second seed's test split, 3/4 of whose rows have the first label: a model
  that always answers one label scores differently on the two seeds (a std above 0 in the report)."""
  first, second = LABELS[task]
  if split == "test" and seed == SEEDS[1]:
    return second if i % 4 == 3 else first
  return second if i % 2 else first


def write_crossfit(root):
  """`<root>/crossfit/random.json` and `<task>/<task>_16_<seed>_<split>.tsv` (`input<TAB>label` rows) for every
  task and seed, as CrossFit's `_build_gym.py --build` lays them out."""
  directory = os.path.join(root, "crossfit")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "random.json"), "w") as f:
    json.dump({"all": sorted(IDS), **SPLIT}, f)
  for task in LABELS:
    for seed in SEEDS:
      for split, n in SIZES.items():
        write_tsv(os.path.join(directory, task, f"{task}_{K}_{seed}_{split}.tsv"),
                  [f"{task.split('-')[1]} example {seed} {split} {i}\t{label(task, seed, split, i)}"
                   for i in range(n)])
  return directory


def run_name(task, seed):
  return f"crossfit_{task.replace('-', '.')}_{K}_{seed}"


def _run(argv, module="train"):
  """One command line, in this process (as `python -m moe_jax.<module> ...` runs it), gin cleared around it."""
  if module == "train":
    from moe_jax import train as entry  # pylint: disable=g-import-not-at-top
  else:
    from moe_jax.taskmoe import stage2 as entry  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.main_wrapper(entry.main, argv)
  finally:
    gin.clear_config()


def _flags(bindings):
  return [f"--gin.{k}={v}" for k, v in bindings.items()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  write_crossfit(path)
  with data_fixtures.data_root(path):
    yield path


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
  """Stage 1 (Gumbel, 3 steps) on crossfit_train from a random backbone (train.seed 42), the stage-2 checkpoint,
  stage 2 (softmax, 3 steps, routers frozen). Returns (stage-1 dir, stage-2 checkpoint, stage-2 dir)."""
  runs = tmp_path_factory.mktemp("runs")
  common = ["--gin_file=gin/models/tiny.gin", *_flags(TINY), *_flags(MOE)]
  shrink = {"train.total_steps": 3, "train.batch_size": 4, "train.feature_lengths": LENGTHS,
            "train.log_every": 1, "make_optimizer.learning_rate": 1e-2, "make_optimizer.warmup_fraction": 0.0}
  stage1 = str(runs / "stage1")
  _run([*common, "--gin_file=gin/taskmoe_stage1.gin", f"--gin.train.model_dir='{stage1}'", *_flags(shrink)])
  init = str(runs / "stage2_init")
  _run([f"--stage1={stage1}", f"--output={init}", "--seed=42", "--gin_file=gin/models/tiny.gin"], "stage2")
  model_dir = str(runs / "stage2")
  _run([*common, "--gin_file=gin/taskmoe_stage2.gin", f"--gin.train.model_dir='{model_dir}'",
        f"--gin.train.expert_from='{init}'", *_flags(shrink)])
  return stage1, init, model_dir


def test_stages_train_on_crossfit_train(trained):
  stage1, init, model_dir = trained
  one, meta1 = tckpt.load_taskmoe(stage1)
  assert meta1["stage"] == "taskmoe_stage1" and meta1["task"] == "crossfit_train"
  assert meta1["taskmoe"]["routing"] == "gumbel" and meta1["taskmoe"]["num_tasks"] == len(IDS)
  steps = [json.loads(line)["step"] for line in open(os.path.join(stage1, "metrics.jsonl"))]
  assert steps[-1] == 3
  # The CrossFit examples' task ids reached the model: only the task embeddings of crossfit_train's tasks (rows 0
  # and 1) had gradients; the dev and test tasks' rows moved by AdamW's weight decay alone, i.e. all of them were
  # scaled by one factor.
  config, moe = tckpt.configs(meta1)
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(None, config, part.logical_shardings(part.abstract_params(build_model(config)),
                                                                      mesh, rules), 42)  # stage 1's, train.seed
  start1 = expand_pretrained(jax.device_get(backbone.params), moe, stages.expansion_key(42))
  before, after = np.asarray(start1["router"]["task_embedding"]), np.asarray(one["router"]["task_embedding"])
  decay = after[IDS["glue-mrpc"], 0] / before[IDS["glue-mrpc"], 0]
  assert 0.99 < decay < 1
  off = np.abs(after - decay * before).max(axis=1)  # what is not the weight decay, per task
  trained_rows = [IDS[t] for t in SPLIT["train"]]
  assert off[trained_rows].min() > 1e-5 and np.delete(off, trained_rows).max() < 1e-6, off
  start, meta_init = tckpt.load_taskmoe(init)
  assert meta_init["taskmoe"]["routing"] == "softmax" and meta_init["parent"]["path"] == stage1
  two, meta2 = tckpt.load_taskmoe(model_dir)
  assert meta2["stage"] == "taskmoe_stage2"
  jax.tree.map(np.testing.assert_array_equal, two["router"], one["router"])  # kept from stage 1, frozen
  assert not np.array_equal(two["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                            start["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])


def test_few_shot_transfer_job_scores_resumes_and_reports(trained, tmp_path, monkeypatch):
  _, _, model_dir = trained
  run_dir = tmp_path / "few_shot"
  calls = []
  train = loop.train

  def counted(**kwargs):
    calls.append((kwargs["stage"], kwargs["mixture_or_task_name"]))
    return train(**kwargs)

  monkeypatch.setattr(loop, "train", counted)
  argv = ["--gin_file=gin/models/tiny.gin", "--gin_file=gin/taskmoe_few_shot.gin",
          *_flags({"taskmoe_few_shot.run_dir": f"'{run_dir}'", "taskmoe_few_shot.model_from": f"'{model_dir}'",
                   "taskmoe_few_shot.seeds": list(SEEDS), "taskmoe_few_shot.learning_rates": [1e-2],
                   "taskmoe_few_shot.steps": 10, "taskmoe_few_shot.batch_size": 4,
                   "taskmoe_few_shot.eval_batch_size": 8, "taskmoe_few_shot.feature_lengths": LENGTHS,
                   "make_optimizer.warmup_fraction": 0.0})]
  _run(argv)
  grid = [(task, seed) for task in SPLIT["test"] for seed in SEEDS]
  assert sorted(calls) == sorted((stage, run_name(t, s)) for stage in ("multitask", "taskmoe_stage2")
                                 for t, s in grid)
  scores = {}
  for kind in ("base", "taskmoe"):
    path = run_dir / f"scores_{kind}.json"
    scores[kind] = {(t, int(s)): v for t, by_seed in json.loads(path.read_text()).items()
                    for s, v in by_seed.items()}
    assert sorted(scores[kind]) == sorted(grid)
    # Each fine-tuned model answers with labels, so every run scores above 0 (ARG divides by the base's means).
    assert all(0 < v <= 100 for v in scores[kind].values()), scores
  assert not (run_dir / "base").exists() or not os.listdir(run_dir / "base")  # fine-tuned models deleted
  stamps = {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in map(str, run_dir.glob("scores_*.json"))}
  report = json.loads((run_dir / "transfer.json").read_text())
  # Resumed: every (task, seed) is in the score files, so nothing trains and the files stay as they were.
  calls.clear()
  _run(argv)
  assert calls == []
  assert {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in stamps} == stamps
  assert json.loads((run_dir / "transfer.json").read_text()) == report
  assert report["num_tasks"] == len(SPLIT["test"])
  for task in SPLIT["test"]:
    base = np.array([scores["base"][(task, s)] for s in SEEDS])
    new = np.array([scores["taskmoe"][(task, s)] for s in SEEDS])
    row = report["tasks"][task]
    assert row["seeds"] == sorted(SEEDS)
    assert row["base_mean"] == pytest.approx(base.mean()) and row["base_std"] == pytest.approx(base.std())
    assert row["new_mean"] == pytest.approx(new.mean()) and row["new_std"] == pytest.approx(new.std())
    assert row["relative_gain"] == pytest.approx((new.mean() - base.mean()) / base.mean())
  assert report["arg"] == pytest.approx(np.mean([r["relative_gain"] for r in report["tasks"].values()]))
  table = (run_dir / "transfer.md").read_text()
  assert f"| **ARG** ({len(SPLIT['test'])} tasks) |" in table and all(f"| {t} | 2 |" in table for t in SPLIT["test"])


def test_evaluate_job_routes_each_run_by_its_task(trained, tmp_path):
  from moe_jax.taskmoe.evaluate import load

  _, _, model_dir = trained
  out = tmp_path / "eval"
  _run(["--gin_file=gin/models/tiny.gin", "--gin_file=gin/taskmoe_evaluate.gin",
        *_flags({"taskmoe_evaluate.model_from": f"'{model_dir}'", "taskmoe_evaluate.output_dir": f"'{out}'",
                 "taskmoe_evaluate.tasks": "['crossfit_test']", "taskmoe_evaluate.batch_size": 8,
                 "taskmoe_evaluate.feature_lengths": LENGTHS})])
  runs = sorted(run_name(t, s) for t in SPLIT["test"] for s in SEEDS)
  results = json.loads((out / "results.json").read_text())
  assert sorted(results["tasks"]) == runs and all("ACC" in m for m in results["tasks"].values())
  assert (out / "results.md").exists()
  for run in runs:
    assert len((out / "predictions" / f"{run}.jsonl").read_text().splitlines()) == SIZES["test"]
  for plot in ("routing_heatmaps.png", "routing_clusters.png"):
    assert os.path.getsize(out / plot) > 10_000
  record = json.loads((out / "routes.json").read_text())
  assert sorted(record["tasks"]) == runs and record["layers"] == ["enc0", "dec0"]
  # Each run's routes are its task's: those the model gives the task's id (the same for both seeds of a task),
  # and the two test tasks' task embeddings route them differently.
  loaded = load(model_dir)
  for task in SPLIT["test"]:
    expected = analysis.task_routes(loaded.model, loaded.params, IDS[task])
    for seed in SEEDS:
      got = record["tasks"][run_name(task, seed)]
      assert sorted(got) == ["probabilities", "routes"]
      for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)
  a, b = (np.array(record["tasks"][run_name(t, SEEDS[0])]["probabilities"]) for t in SPLIT["test"])
  assert a.shape == (2, MOE["TaskMoEConfig.num_copies"]) and not np.allclose(a, b, rtol=0, atol=1e-6)
