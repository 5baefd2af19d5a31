"""Rehearsal of the real-scale runs: `python -m moe_jax.train` on gin/phatgoose_p3_t5xl.gin and
gin/phatgoose_flan_t5xl.gin, with the session's Hugging Face T5 directory as the backbone and the release-format
fixtures of every dataset they name as the data root, overriding only sizes. Every stage's product records the
fixture's weights checksum and SentencePiece vocabulary, its task and settings; results.json has every method."""

import json
import os
import subprocess
import sys

import pytest

from moe_jax.checkpoints import identity
from moe_jax.checkpoints.hf import load_hf_t5
from moe_jax.models import T5Config
from moe_jax.training import checkpointing as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["multitask", "merged", "phatgoose", "average_activation", "retrieval"]  # what both configs list
# Sizes only. The expert and evaluation lists are narrowed to keep CPU time low (two experts; the evaluation tasks
# cover each way a task is read and scored: P3 score-eval rank classification, BIG-bench rows ranked or generated,
# a lukaemon/BBH file); every task of both pools is read and tokenised in test_vocab_real.py.
RUNS = {
    "phatgoose_p3_t5xl.gin": (["p3_ag_news", "p3_duorc"], ["t0_rte", "t0_anli_r1"]),
    "phatgoose_flan_t5xl.gin": (["flan_bool_q", "niv2_question_generation"],
                                ["bbh_causal_judgment", "bbh_web_of_lies", "bbh_word_sorting"]),
}
SIZES = ["phatgoose_pipeline.expert_steps = 2", "phatgoose_pipeline.gate_steps = 2",
         "phatgoose_pipeline.max_eval_examples = 4", "phatgoose_pipeline.activation_examples = 4",
         "phatgoose_pipeline.retrieval_examples = 4", "phatgoose_pipeline.eval_batch_size = 4",
         "FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "train.batch_size = 4", "train.num_microbatches = 1",
         "train.validation_batches = 1"]


def _command(config_file, bindings):
  return [sys.executable, "-m", "moe_jax.train", f"--gin_file=gin/{config_file}",
          *(f"--gin_bindings={b}" for b in bindings)]


@pytest.fixture(scope="module")
def runs(pool_data, hf_t5, tmp_path_factory):
  """Both real-scale runs and a vocabulary mismatch, as concurrent subprocesses: config file (or "mismatch") ->
  (completed process, run_dir). The P3 run scores its multitask method on MULTITASK (the same directory, loaded
  again); the FLAN run leaves MULTITASK unset, so the backbone is scored."""
  out = tmp_path_factory.mktemp("rehearsal")
  base = [f"DATA_DIR = '{pool_data.root}'", f"BACKBONE = '{hf_t5.path}'", *hf_t5.gin_bindings(), *SIZES]
  commands = {}
  for config_file, (experts, evals) in RUNS.items():
    commands[config_file] = (config_file, [*base, f"EXPERT_TASKS = {experts}", f"EVAL_TASKS = {evals}"] + (
        [f"MULTITASK = '{hf_t5.path}'"] if "p3" in config_file else []))
  commands["mismatch"] = ("phatgoose_p3_t5xl.gin", [*base, "get_vocabulary.kind = 'byte'"])
  started = {}
  for name, (config_file, bindings) in commands.items():
    run_dir = out / name.removesuffix(".gin")
    started[name] = (subprocess.Popen(_command(config_file, [*bindings, f"phatgoose_pipeline.run_dir = '{run_dir}'"]),
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir)
  done = {}
  for name, (process, run_dir) in started.items():
    stdout, stderr = process.communicate(timeout=900)
    done[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), run_dir)
  return done


def _checksum(hf_t5):
  return identity.weights_checksum(load_hf_t5(hf_t5.path, T5Config(**hf_t5.shapes)))


def _check_product(path, stage, task, backbone):
  """An expert/gate product's record; returns it."""
  meta = ckpt.read_expert_metadata(path)
  assert meta["stage"] == stage and meta["task"] == task, meta
  assert meta["backbone"]["weights"] == backbone["weights"] and meta["backbone"]["vocabulary"] == backbone["vocabulary"]
  assert meta["config"]["stage"] == stage and meta["config"]["task"] == task
  assert meta["config_hash"] == identity.config_hash(meta["config"])
  assert meta["config"]["data"] == {"pack": True}  # the real-scale configs pack expert and gate batches
  model_dir = os.path.dirname(path)
  with open(os.path.join(model_dir, "config.gin")) as f:
    assert f"config_hash {meta['config_hash']}" in f.read()
  checkpoints = ckpt.Checkpointer(os.path.join(model_dir, "checkpoints"), {})
  try:
    stored = checkpoints.read_metadata(checkpoints.latest_step())
  finally:
    checkpoints.close()
  assert (stored["stage"], stored["task"]) == (stage, task)
  assert stored["backbone_weights"] == backbone["weights"] and stored["vocabulary"] == backbone["vocabulary"]
  assert stored["config"] == meta["config"]
  return meta


@pytest.mark.parametrize("config_file", sorted(RUNS))
def test_real_scale_config_rehearsal(runs, config_file, hf_t5):
  done, run_dir = runs[config_file]
  assert done.returncode == 0, done.stderr[-4000:]
  experts, evals = RUNS[config_file]
  backbone = {"weights": _checksum(hf_t5),
              "vocabulary": {"kind": "sentencepiece", "extra_ids": 100, "sha256": hf_t5.spiece_sha}}
  assert os.path.isfile(run_dir / "config.gin")
  for task in experts:
    expert = _check_product(str(run_dir / "experts" / task / "expert.safetensors"), "expert", task, backbone)
    gate = _check_product(str(run_dir / "gates" / task / "expert.safetensors"), "gate", task, backbone)
    assert gate["config"]["expert"]["config_hash"] == expert["config_hash"]  # the gate of this expert
  moe = ckpt.read_expert_metadata(str(run_dir / "moe.safetensors"))
  assert moe["backbone"]["weights"] == backbone["weights"] and moe["backbone"]["vocabulary"] == backbone["vocabulary"]
  assert [e["task"] for e in moe["experts"]] == experts
  with open(run_dir / "results.json") as f:
    table = json.load(f)["tasks"]
  assert sorted(table) == sorted(METHODS)
  assert all(sorted(scores) == sorted(evals) for scores in table.values()), table
  assert os.path.isfile(run_dir / "routing.png")


def test_a_byte_binding_on_a_sentencepiece_checkpoint_stops_in_one_line(runs, hf_t5):
  done, run_dir = runs["mismatch"]
  assert done.returncode == 1, done.stderr[-4000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "byte" in last and hf_t5.spiece in last, done.stderr[-4000:]
  assert not os.path.exists(run_dir / "experts")  # before any stage
