"""The PHATGOOSE pipeline end to end on the tiny model: every stage, every method, results.md and routing.png."""

import json
import os

import gin

from moe_jax.methods import pipeline
from moe_jax.models.config import ExpertConfig, T5Config

TINY = T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_pipeline")


def test_every_method_runs_end_to_end(tmp_path):
  gin.clear_config()
  gin.bind_parameter("train.batch_size", 8)
  try:
    results = pipeline.phatgoose_pipeline(
        run_dir=str(tmp_path), expert_tasks=["synthetic_reverse", "synthetic_sort"],
        eval_tasks=["synthetic_sort", "synthetic_reverse_heldout"], multitask_steps=3, expert_steps=3, gate_steps=2,
        max_eval_examples=8, activation_examples=8, retrieval_examples=8, eval_batch_size=8, model_config=TINY,
        experts=ExpertConfig(rank=4), top_k=1)
  finally:
    gin.clear_config()
  assert results == os.path.join(tmp_path, "results.md")
  table = json.load(open(tmp_path / "results.json"))["tasks"]
  assert sorted(table) == sorted(pipeline.METHODS)
  for scores in table.values():
    assert sorted(scores) == ["synthetic_reverse_heldout", "synthetic_sort"]
    assert all(0.0 <= v <= 100.0 for v in scores.values())
  text = open(tmp_path / "results.md").read()
  assert "| phatgoose |" in text and "mean held-out" in text
  assert os.path.getsize(tmp_path / "routing.png") > 10_000


def test_demo_gin_runs_through_the_cli(tmp_path):
  """`python -m moe_jax.train --gin_file=gin/phatgoose.gin`, shrunk: the command as users run it, where gin is
  locked before the job starts (a configurable imported late would fail here, not in the in-process test)."""
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bindings = [f"phatgoose_pipeline.run_dir='{tmp_path}'", "phatgoose_pipeline.multitask_steps=2",
              "phatgoose_pipeline.expert_steps=2", "phatgoose_pipeline.gate_steps=1",
              "phatgoose_pipeline.expert_tasks=['synthetic_reverse', 'synthetic_sort']",
              "phatgoose_pipeline.eval_tasks=['synthetic_sort', 'synthetic_reverse_heldout']",
              "phatgoose_pipeline.max_eval_examples=8", "phatgoose_pipeline.activation_examples=8",
              "phatgoose_pipeline.retrieval_examples=8", "train.batch_size=8", "ExpertConfig.rank=2",
              "T5Config.num_encoder_layers=1", "T5Config.num_decoder_layers=1"]
  done = subprocess.run([sys.executable, "-m", "moe_jax.train", "--gin_file=gin/phatgoose.gin",
                         *(f"--gin_bindings={b}" for b in bindings)], cwd=tmp_path, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "PYTHONPATH": repo})
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"done: {tmp_path / 'results.md'}" in done.stdout
  table = json.load(open(tmp_path / "results.json"))["tasks"]
  assert sorted(table) == sorted(pipeline.METHODS)
