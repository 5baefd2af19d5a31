"""The training loop end to end on the tiny model and a synthetic task: stages, products, exact resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import flax
import gin
import numpy as np
import pytest

import tasks  # noqa: F401  (registers the synthetic tasks)
from moe_jax.data import pipeline
from moe_jax.errors import MismatchError
from moe_jax.models import experts as ex
from moe_jax.models.config import T5Config
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import loop
from moe_jax.training.preemption import Preempted

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
  settings = {"mixture_or_task_name": "synthetic_reverse", "save_every": 2, "log_every": 2, **kwargs}
  return loop.train(model_dir=str(model_dir), stage=stage, model_config=TINY, feature_lengths=LENGTHS, batch_size=8,
                    total_steps=steps, **settings)


def _logged_steps(model_dir):
  return [json.loads(line)["step"] for line in open(os.path.join(model_dir, "metrics.jsonl"))]


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
  # Another run's settings: the product is not reused, and the error says what differs and how to go on.
  with pytest.raises(MismatchError, match=r"made by another run \(config\.total_steps: 3 -> 4.*overwrite=True"):
    _train(tmp_path / "expert", "expert", 4, init_from=str(backbone_dir))
  assert os.path.getmtime(expert) == mtime
  _train(tmp_path / "expert", "expert", 4, init_from=str(backbone_dir), overwrite=True)
  assert ckpt.read_expert_metadata(expert)["config"]["total_steps"] == 4
  assert _logged_steps(tmp_path / "expert") == [2, 4]  # the earlier run's metrics went with its product


@pytest.fixture(scope="module")
def straight_expert(backbone_dir, tmp_path_factory):
  """Expert parameters after an uninterrupted 5-step run: what every interrupted and resumed run must end with."""
  return _flat(_train(tmp_path_factory.mktemp("straight"), "expert", 5, init_from=str(backbone_dir)))


def test_interrupted_run_resumes_to_identical_params(backbone_dir, straight_expert, tmp_path, monkeypatch):
  reference = straight_expert
  original = pipeline.train_batches

  def crash_after_three(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 3:
        raise KeyboardInterrupt
      yield batch

  monkeypatch.setattr(pipeline, "train_batches", crash_after_three)
  with pytest.raises(KeyboardInterrupt):  # steps 1-3 logged, the checkpoint of step 2 kept
    _train(tmp_path / "resumed", "expert", 5, init_from=str(backbone_dir), log_every=1)
  assert not os.path.exists(tmp_path / "resumed" / ckpt.EXPERT_FILE)
  assert _logged_steps(tmp_path / "resumed") == [1, 2, 3]
  monkeypatch.setattr(pipeline, "train_batches", original)
  with pytest.raises(MismatchError, match="task='synthetic_reverse'.*task='synthetic_sort'"):
    _train(tmp_path / "resumed", "expert", 5, init_from=str(backbone_dir), mixture_or_task_name="synthetic_sort")
  resumed = _flat(_train(tmp_path / "resumed", "expert", 5, init_from=str(backbone_dir), log_every=1))
  for key in reference:
    np.testing.assert_array_equal(reference[key], resumed[key])
  assert _logged_steps(tmp_path / "resumed") == [1, 2, 3, 4, 5]  # step 3, redone after the resume, once


def test_each_task_starts_its_expert_from_its_own_key():
  """LoRA A is random at init (B is zero): experts of two tasks must not start as the same matrix, while one task
  starts the same way in every run."""
  layout = loop.stage_experts("expert", None)
  a_of = lambda task: [v for k, v in flax.traverse_util.flatten_dict(ex.init_experts(
      TINY, layout, loop.expert_key(0, task))).items() if k[-1] == "lora_a"]
  reverse, sort, again = a_of("synthetic_reverse"), a_of("synthetic_sort"), a_of("synthetic_reverse")
  assert all(not np.allclose(x, y) for x, y in zip(reverse, sort))
  assert all(np.array_equal(x, y) for x, y in zip(reverse, again))


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(backbone_dir, straight_expert, tmp_path,
                                                                  monkeypatch):
  original = pipeline.train_batches

  def sigterm_during_third_batch(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  handler = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(pipeline, "train_batches", sigterm_during_third_batch)
  with pytest.raises(Preempted) as stopped:
    _train(tmp_path / "run", "expert", 5, init_from=str(backbone_dir))
  assert stopped.value.step == 3 and stopped.value.code == 143
  assert signal.getsignal(signal.SIGTERM) is handler
  checkpoints = ckpt.Checkpointer(tmp_path / "run" / loop.CHECKPOINT_DIR, {})
  assert checkpoints.latest_step() == 3  # not a multiple of save_every=2: saved because of the signal
  checkpoints.close()
  assert not os.path.exists(tmp_path / "run" / ckpt.EXPERT_FILE)
  monkeypatch.setattr(pipeline, "train_batches", original)
  resumed = _flat(_train(tmp_path / "run", "expert", 5, init_from=str(backbone_dir)))
  for key in straight_expert:
    np.testing.assert_array_equal(straight_expert[key], resumed[key])


def test_sigterm_to_the_command_line_saves_then_a_rerun_resumes(tmp_path):
  """A real signal to `python -m moe_jax.train`: exit status 143, a checkpoint of the step it was on, no other."""
  model_dir = tmp_path / "run"
  command = [sys.executable, "-m", "moe_jax.train", "--gin_file=gin/demo.gin", f"--gin.train.model_dir='{model_dir}'",
             "--gin.train.save_every=1000", "--gin.train.log_every=1", "--gin.train.batch_size=4"]
  proc = subprocess.Popen(command + ["--gin.train.total_steps=1000"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = model_dir / "metrics.jsonl"
  try:
    for _ in range(1500):  # until two steps are logged (at most ~5 minutes)
      if proc.poll() is not None or (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in err and "Traceback" not in err
  steps = [int(name) for name in os.listdir(model_dir / loop.CHECKPOINT_DIR) if name.isdigit()]
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert len(steps) == 1 and 2 <= last_logged <= steps[0] < 1000, (steps, last_logged)
  rerun = subprocess.run(command + [f"--gin.train.total_steps={steps[0] + 1}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert rerun.returncode == 0 and f"at step {steps[0]}" in rerun.stdout, rerun.stderr[-3000:]


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
                      model_config=TINY, feature_lengths=LENGTHS, batch_size=8, total_steps=2,
                      init_from=str(backbone_dir))
  stray = loop.train(model_dir=str(tmp_path / "e3"), mixture_or_task_name="synthetic_sort", stage="expert",
                     model_config=TINY, feature_lengths=LENGTHS, batch_size=8, total_steps=1)
  with pytest.raises(ValueError, match="belongs to model"):  # an expert of another architecture is refused
    runner.load_expert_stack([first], T5Config(**{**TINY.__dict__, "d_ff": 48}))
  with pytest.raises(ValueError, match="was trained on backbone random"):  # same shapes, other weights
    runner.evaluate(output_dir=str(tmp_path / "stray"), tasks=["synthetic_reverse"], model_config=TINY,
                    init_from=str(backbone_dir), expert_from=[stray], feature_lengths=LENGTHS, max_examples=2)

  def run(out, files, expert):
    metrics = runner.evaluate(output_dir=str(tmp_path / out), tasks=["synthetic_reverse"], model_config=TINY,
                              experts=ExpertConfig(router=Fixed(expert=expert)), init_from=str(backbone_dir),
                              expert_from=files, feature_lengths=LENGTHS, max_examples=6, batch_size=4)
    lines = open(tmp_path / out / "predictions" / "synthetic_reverse.jsonl").read().splitlines()
    return metrics, lines

  stacked, stacked_lines = run("stacked", [first, second], 1)
  alone, alone_lines = run("alone", [second], 0)
  assert stacked == alone
  # The same predictions; scores equal up to float32 summation order (XLA may fuse a 2-expert stack differently)
  for s, a in zip(map(json.loads, stacked_lines), map(json.loads, alone_lines), strict=True):
    assert {k: v for k, v in s.items() if k != "scores"} == {k: v for k, v in a.items() if k != "scores"}
    np.testing.assert_allclose(s["scores"], a["scores"], rtol=1e-6)
  assert os.path.isfile(tmp_path / "stacked" / "results.md")

  # The same experts from an expert library: evaluation and concatenation by names or by tag
  from moe_jax.library import ExpertInfo, ExpertLibrary, make_expert
  from moe_jax.methods.concatenate import concatenate

  library = ExpertLibrary(f"local://{tmp_path}/library")
  for name, path, tags in (("b/second", second, ["kept"]), ("a/first", first, ["kept"]), ("stray", stray, [])):
    tree, meta = ckpt.load_experts(ckpt.expert_file(path))
    library.add(make_expert(ExpertInfo(name, backbone=meta["backbone"], tags=tags), tree))
  metrics = runner.evaluate(output_dir=str(tmp_path / "from_library"), tasks=["synthetic_reverse"],
                            model_config=TINY, experts=ExpertConfig(router=Fixed(expert=1)),
                            init_from=str(backbone_dir), library=library.uri, library_experts=["a/first", "b/second"],
                            feature_lengths=LENGTHS, max_examples=6, batch_size=4)
  assert metrics == stacked
  with pytest.raises(ValueError, match="one MoE holds one backbone.s experts"):  # every expert: stray too
    runner.evaluate(output_dir=str(tmp_path / "all"), tasks=["synthetic_reverse"], model_config=TINY,
                    init_from=str(backbone_dir), library=library.uri, feature_lengths=LENGTHS, max_examples=2)
  by_tag, _ = ckpt.load_experts(concatenate(output=str(tmp_path / "tagged.safetensors"), library=library.uri,
                                            tags=["kept"]))
  by_files, _ = ckpt.load_experts(concatenate([first, second], str(tmp_path / "files.safetensors")))
  flat = lambda tree: {k: np.asarray(v) for k, v in __import__("flax").traverse_util.flatten_dict(tree).items()}
  assert all(np.array_equal(v, flat(by_files)[k]) for k, v in flat(by_tag).items())  # sorted names: first, second


def test_validation_keeps_the_best_expert(backbone_dir, tmp_path):
  """validate_every: the product is the expert with the lowest validation loss of those logged, its loss recomputed
  here from the product's parameters; a resumed run keeps the best found before the interruption."""
  from moe_jax.models import experts as ex
  from moe_jax.models.t5 import Transformer
  from moe_jax.training import partitioning as part
  from moe_jax.training.train_step import make_eval_loss
  from moe_jax.training.validation import BEST_FILE

  run = tmp_path / "expert"
  gin.bind_parameter("make_optimizer.learning_rate", 0.3)  # large steps: the validation loss goes up and down
  product = _train(run, "expert", 6, init_from=str(backbone_dir), validate_every=2, validation_batches=2)
  logged = {json.loads(line)["step"]: json.loads(line)["validation_loss"]
            for line in open(run / "metrics.jsonl") if "validation_loss" in line}
  assert sorted(logged) == [2, 4, 6]
  params, metadata = ckpt.load_experts(product, TINY)
  best_step = min(logged, key=logged.get)
  assert metadata["step"] == best_step and metadata["validation_loss"] == pytest.approx(logged[best_step])
  mesh, rules = part.make_mesh(), part.axis_rules()
  layout = loop.stage_experts("expert", None)
  model = Transformer(TINY, layout)
  backbone = loop.load_backbone(str(backbone_dir), TINY, part.logical_shardings(
      part.abstract_params(Transformer(TINY)), mesh, rules), seed=0).params
  eval_loss = make_eval_loss(model, mesh, rules)
  batches = pipeline.validation_batches("synthetic_reverse", LENGTHS, 8, 2)
  totals = [eval_loss(ex.merge(backbone, params), part.shard_batch(b, mesh, rules)) for b in batches]
  recomputed = sum(float(t["loss"] * t["weight_sum"]) for t in totals) / sum(float(t["weight_sum"]) for t in totals)
  assert recomputed == pytest.approx(logged[best_step], rel=1e-5)
  # Resume: a best file with a lower loss than any the run will find is kept, whatever the run does next.
  os.remove(product)
  _, best_meta = ckpt.load_experts(run / BEST_FILE)
  ckpt.save_experts(run / BEST_FILE, params, {**best_meta, "validation_loss": -1.0})
  _train(run, "expert", 8, init_from=str(backbone_dir), validate_every=2, validation_batches=2)
  assert ckpt.load_experts(product)[1]["validation_loss"] == -1.0
