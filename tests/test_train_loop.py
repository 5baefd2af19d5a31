"""The training loop end to end on the tiny model and a synthetic task: stages, products, exact resume, errors."""

import os
import subprocess
import sys

import flax
import gin
import numpy as np
import pytest

pytest.importorskip("seqio")

import tasks  # noqa: E402,F401  (registers the synthetic tasks)
from moe_jax.data import pipeline  # noqa: E402
from moe_jax.models.config import T5Config  # noqa: E402
from moe_jax.training import checkpointing as ckpt  # noqa: E402
from moe_jax.training import loop  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_test")
LENGTHS = {"inputs": 80, "targets": 16}


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _train(model_dir, stage, steps, **kwargs):
  return loop.train(model_dir=str(model_dir), mixture_or_task_name="synthetic_reverse", stage=stage,
                    model_config=TINY, feature_lengths=LENGTHS, batch_size=8, total_steps=steps, save_every=2,
                    log_every=2, **kwargs)


def _flat(path):
  return flax.traverse_util.flatten_dict(ckpt.load_experts(path)[0])


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
  gin.clear_config()
  model_dir = tmp_path_factory.mktemp("multitask")
  _train(model_dir, "multitask", 3)
  return model_dir


def test_stages_chain_and_rerun_skips(backbone_dir, tmp_path):
  expert = _train(tmp_path / "expert", "expert", 3, init_from=str(backbone_dir))
  gate = _train(tmp_path / "gate", "gate", 2, init_from=str(backbone_dir), expert_from=str(tmp_path / "expert"))
  expert_params, gate_params = _flat(expert), _flat(gate)
  _, metadata = ckpt.load_experts(gate, TINY)
  assert metadata["stage"] == "gate" and metadata["task"] == "synthetic_reverse" and metadata["rank"] == 16
  assert len(metadata["modules"]) == 7 + 11
  for key in expert_params:
    if key[-1] == "router":  # the gate trained from zero; LoRA untouched
      assert not np.any(expert_params[key]) and np.any(gate_params[key])
    else:
      np.testing.assert_array_equal(expert_params[key], gate_params[key])
  assert any(np.any(v) for k, v in expert_params.items() if k[-1] == "lora_b")
  lines = open(tmp_path / "expert" / "metrics.jsonl").read().splitlines()
  assert len(lines) == 2 and '"loss"' in lines[0]
  mtime = os.path.getmtime(expert)
  assert _train(tmp_path / "expert", "expert", 3, init_from=str(backbone_dir)) == expert
  assert os.path.getmtime(expert) == mtime


def test_interrupted_run_resumes_to_identical_params(backbone_dir, tmp_path, monkeypatch):
  reference = _flat(_train(tmp_path / "straight", "expert", 5, init_from=str(backbone_dir)))
  original = pipeline.train_batches

  def crash_after_three(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 3:
        raise KeyboardInterrupt
      yield batch

  monkeypatch.setattr(pipeline, "train_batches", crash_after_three)
  with pytest.raises(KeyboardInterrupt):
    _train(tmp_path / "resumed", "expert", 5, init_from=str(backbone_dir))
  assert not os.path.exists(tmp_path / "resumed" / ckpt.EXPERT_FILE)
  monkeypatch.setattr(pipeline, "train_batches", original)
  resumed = _flat(_train(tmp_path / "resumed", "expert", 5, init_from=str(backbone_dir)))
  for key in reference:
    np.testing.assert_array_equal(reference[key], resumed[key])


def test_mismatched_inputs_fail_clearly(backbone_dir, tmp_path):
  other = T5Config(**{**TINY.__dict__, "d_ff": 48})
  with pytest.raises(ValueError, match="belongs to model 'tiny_test'"):
    loop.train(model_dir=str(tmp_path / "x"), mixture_or_task_name="synthetic_reverse", stage="expert",
               model_config=other, feature_lengths=LENGTHS, batch_size=8, total_steps=1,
               init_from=str(backbone_dir))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _train(tmp_path / "y", "expert", 1, init_from=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="run the expert stage first"):
    _train(tmp_path / "z", "gate", 1, init_from=str(backbone_dir), expert_from=str(tmp_path / "no_expert"))
  with pytest.raises(ValueError, match="needs train.expert_from"):
    _train(tmp_path / "w", "gate", 1, init_from=str(backbone_dir))


def test_cli_rejects_a_misspelt_binding_in_one_line():
  result = subprocess.run([sys.executable, "-m", "moe_jax.train", "--gin_file=gin/demo.gin", "--gin.train.stpes=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "stpes" in errors[0]


def test_evaluate_stacked_experts(backbone_dir, tmp_path):
  """Two expert files stacked in order: routing everything to the second equals evaluating that expert alone."""
  from moe_jax.evaluation import runner
  from moe_jax.models import ExpertConfig, Fixed

  first = _train(tmp_path / "e1", "expert", 2, init_from=str(backbone_dir))
  second = loop.train(model_dir=str(tmp_path / "e2"), mixture_or_task_name="synthetic_sort", stage="expert",
                      model_config=TINY, feature_lengths=LENGTHS, batch_size=8, total_steps=2)
  with pytest.raises(ValueError, match="belongs to model"):  # an expert of another backbone is refused
    runner.load_expert_stack([first], T5Config(**{**TINY.__dict__, "d_ff": 48}))

  def run(out, files, expert):
    metrics = runner.evaluate(output_dir=str(tmp_path / out), tasks=["synthetic_reverse"], model_config=TINY,
                              experts=ExpertConfig(router=Fixed(expert=expert)), init_from=str(backbone_dir),
                              expert_from=files, feature_lengths=LENGTHS, max_examples=6, batch_size=4)
    lines = open(tmp_path / out / "predictions" / "synthetic_reverse.jsonl").read().splitlines()
    return metrics, lines

  stacked, stacked_lines = run("stacked", [first, second], 1)
  alone, alone_lines = run("alone", [second], 0)
  assert stacked == alone and stacked_lines == alone_lines
  assert os.path.isfile(tmp_path / "stacked" / "results.md")
