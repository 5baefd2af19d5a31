"""Training: mesh and rules, per-stage optimizer partition and schedule, gradient accumulation, checkpoints and
expert files (CPU, one device; the sharded step is in test_sharded_step.py)."""

import dataclasses
import os
import shutil
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax.models import experts as ex
from moe_jax.models import ExpertConfig, Fixed, SigmoidGate, T5Config, Transformer
from moe_jax.training import checkpointing as ck
from moe_jax.training import optimizer as opt
from moe_jax.training import partitioning as part
from moe_jax.training import train_step as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
               dtype="float32", name="tiny_test")
EXPERTS = ExpertConfig(num_experts=2, rank=4)
MESH = part.make_mesh()
RULES = part.axis_rules()
TOKENS = jnp.ones((1, 1), jnp.int32)


def _params(model: Transformer, seed: int = 0, lora_b_std: float = 0.1):
  """Host parameters; nonzero lora_b so that lora_a and router vectors get gradients from the first step."""
  params = jax.device_get(nn.meta.unbox(model.init(jax.random.PRNGKey(seed), TOKENS, TOKENS))["params"])
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(params)
  for key in flat:
    if key[-1] in ("lora_b", "router"):
      flat[key] = (lora_b_std * rng.standard_normal(flat[key].shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _batch(seed: int, size: int = 4, weights: np.ndarray | None = None, routing: bool = False):
  rng = np.random.default_rng(seed)
  batch = {
      "encoder_input_tokens": rng.integers(1, 64, (size, 7)).astype(np.int32),
      "decoder_input_tokens": rng.integers(1, 64, (size, 5)).astype(np.int32),
      "decoder_target_tokens": rng.integers(1, 64, (size, 5)).astype(np.int32),
      "decoder_loss_weights": rng.random((size, 5)).astype(np.float32) if weights is None else weights,
  }
  batch["encoder_input_tokens"][:, 5:] = 0  # padding
  if routing:
    batch["routing_ids"] = rng.integers(0, EXPERTS.num_experts, (size,)).astype(np.int32)
  return batch


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


def test_mesh_rules_and_param_shardings():
  with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x expert=1 x model=1 = 2 devices, but 1 are given"):
    part.make_mesh(data=2)
  assert dict(MESH.shape) == {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
  rules = part.axis_rules(overrides=(("embed", "model"),))
  assert rules[0] == ("embed", "model") and dict(part.DEFAULT_RULES)["embed"] == "fsdp"
  specs = nn.get_partition_spec(part.abstract_params(Transformer(CFG, EXPERTS)))
  assert specs["encoder"]["layers_0"]["mlp"]["wi_0"]["lora_b"] == P("expert", "lora_rank", "mlp")
  shardings = part.logical_shardings(part.abstract_params(Transformer(CFG)), MESH, RULES)
  assert shardings["encoder"]["layers_0"]["mlp"]["wo"]["kernel"].spec == P("model", "fsdp")
  assert part.batch_sharding(MESH, RULES).spec == P(("data", "fsdp", "expert"))


def _reference_loss(model, params, batch):
  """Weighted mean token cross-entropy over the whole batch, written independently of train_step."""
  logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                       routing_ids=batch.get("routing_ids"))
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch["decoder_loss_weights"]) / jnp.sum(batch["decoder_loss_weights"])


def _capture_gradients() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the latest gradient and whose update is zero: the train step's exact gradient."""
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return optax.GradientTransformation(zeros, lambda grads, state, params=None: (zeros(grads), grads))


def _assert_leaves_close(got, want, tol: float, what: str):
  """Each leaf within `tol` relative to the leaf's largest entry (normwise): fp32 gradients with another summation
  order or loss formula differ by ~1e-6 of the leaf's scale, which is far above the ulp of near-zero entries."""
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.max(np.abs(w)), err_msg=what + jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage, experts, microbatches", [
    ("multitask", None, (1, 2)),
    ("expert", dataclasses.replace(EXPERTS, router=Fixed()), (2,)),  # routing_ids are split with the batch
])
def test_gradient_accumulation_equals_full_batch(stage, experts, microbatches):
  """Two microbatches (rows 0,2 and rows 1,3) with very different
  weight sums give the full batch's weighted-mean gradient, not a mean of the microbatch means."""
  model = Transformer(CFG, experts)
  params = _params(Transformer(CFG, experts and EXPERTS))  # `Fixed()` routes by routing_ids, which init lacks
  weights = np.zeros((4, 5), np.float32)
  weights[0::2] = 1.0  # microbatch 0: 10 tokens of weight 1
  weights[1, 0], weights[3, 2] = 0.5, 0.25  # microbatch 1: 2 tokens, weight 0.75
  batch = _batch(1, weights=weights, routing=experts is not None)
  mask = opt.trainable_mask(stage, params)
  trainable, frozen = opt.partition(params, mask)
  loss, reference = jax.jit(jax.value_and_grad(lambda t: _reference_loss(model, ex.merge(frozen, t), batch)))(
      trainable)
  grads = {}
  for micro in microbatches:
    step = jax.jit(ts.train_step_fn(model, _capture_gradients(), stage, num_microbatches=micro))
    state, metrics = step(ts.TrainState.create(params, _capture_gradients()), batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    assert float(metrics["weight_sum"]) == 10.75
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(reference), rtol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
    grads[micro] = opt.partition(state.opt_state, mask)[0]
    _assert_leaves_close(grads[micro], reference, 1e-5, f"{micro} microbatches vs reference: ")
  if len(grads) == 2:
    _assert_leaves_close(grads[2], grads[1], 1e-6, "2 vs 1 microbatches: ")


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim > 0)


@pytest.mark.parametrize("stage, experts, trained", [
    ("multitask", None, None),
    ("expert", EXPERTS, ("lora_a", "lora_b")),
    ("gate", dataclasses.replace(EXPERTS, router=SigmoidGate()), ("router",)),
])
def test_stage_trains_only_its_leaves_and_only_they_have_moments(stage, experts, trained):
  model = Transformer(CFG, experts)
  params = _params(model)
  mask = _flat(opt.trainable_mask(stage, params))
  assert all(mask[k] == (k[-1] in trained if trained else True) for k in mask)
  trainable = [k for k, m in mask.items() if m]
  tx = opt.make_optimizer(stage, params, learning_rate=1e-2, warmup_fraction=0.0)
  state = ts.create_train_state(params, model, tx, MESH, RULES)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # the rest are step counts and the lr
  assert len(moments) == 2 * len(trainable)
  assert _nbytes(state.opt_state) == 2 * sum(params_leaf.nbytes for k, params_leaf in _flat(params).items()
                                             if mask[k])
  step = ts.make_train_step(model, tx, stage, MESH, RULES)
  for seed in range(2):
    state, metrics = step(state, part.shard_batch(_batch(seed), MESH, RULES))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  after = _flat(jax.device_get(state.params))
  for key, before in _flat(params).items():
    assert np.array_equal(after[key], before) != mask[key], f"{stage}: {'/'.join(key)}"
  with pytest.raises(ValueError, match="trains no parameter"):
    opt.trainable_mask("expert", _params(Transformer(CFG)))
  with pytest.raises(ValueError, match="unknown training stage"):
    opt.trainable_mask("pretrain", params)


def test_schedule_is_linear_warmup_then_constant():
  assert opt.warmup_steps(0.06, 1000) == 60
  schedule = opt.make_schedule(1e-2, warmup_fraction=0.1, total_steps=40)  # W = 4
  for step in range(8):
    np.testing.assert_allclose(schedule(step), 1e-2 * min(step / 4, 1.0), rtol=1e-6)
  assert float(opt.make_schedule(3e-3, 0.0, 10)(0)) == pytest.approx(3e-3)


def test_clipping_sees_only_trainable_leaves():
  """A huge gradient on a frozen kernel must not shrink the trainable update (eps=1 makes Adam nearly linear)."""
  params = {"layer": {"kernel": np.zeros((3,), np.float32), "lora_a": np.zeros((2,), np.float32),
                      "lora_b": np.zeros((2,), np.float32)}}
  grads = {"layer": {"kernel": np.full((3,), 1e3, np.float32), "lora_a": np.array([0.3, 0.0], np.float32),
                     "lora_b": np.array([0.0, 0.4], np.float32)}}  # trainable norm 0.5
  for clip, scale in ((1.0, 1.0), (0.25, 0.5)):
    tx = opt.make_optimizer("expert", params, learning_rate=1.0, eps=1.0, warmup_fraction=0.0, clip=clip)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = scale * np.array([0.3, 0.4])
    np.testing.assert_allclose([updates["layer"]["lora_a"][0], updates["layer"]["lora_b"][1]], -g / (g + 1.0),
                               rtol=1e-5)
    assert not np.any(updates["layer"]["kernel"])


def _run(step, state, batches, start, stop, checkpointer=None, save_at=None):
  lrs = []
  for i in range(start, stop):
    if checkpointer is not None and i == save_at:
      checkpointer.save(state, data_position=i)
    state, metrics = step(state, part.shard_batch(batches[i], MESH, RULES))
    lrs.append(float(metrics["learning_rate"]))
  return state, lrs


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
  """Save at step 2 of 4 (with dropout, so the step-derived rngs matter too), restore into a fresh state, continue:
  bit-identical to the uninterrupted run. Only the trainable leaves are in the checkpoint."""
  cfg = dataclasses.replace(CFG, dropout_rate=0.1)
  model = Transformer(cfg, EXPERTS)
  params = _params(model)
  tx = opt.make_optimizer("expert", params, learning_rate=1e-2, warmup_fraction=0.5, total_steps=4)
  step = ts.make_train_step(model, tx, "expert", MESH, RULES, num_microbatches=2)
  batches = [_batch(seed) for seed in range(4)]
  checkpointer = ck.Checkpointer(tmp_path, ck.checkpoint_metadata("expert", cfg, EXPERTS, "demo"))
  state = ts.create_train_state(params, model, tx, MESH, RULES)
  state, lrs = _run(step, state, batches, 0, 4, checkpointer, save_at=2)
  np.testing.assert_allclose(lrs, [1e-2 * min(s / 2, 1) for s in range(4)], rtol=1e-6)
  checkpointer.wait()
  uninterrupted = jax.device_get(state)

  resumed = ck.Checkpointer(tmp_path, ck.checkpoint_metadata("expert", cfg, EXPERTS, "demo"))
  assert resumed.latest_step() == 2
  restored, position = resumed.restore(ts.create_train_state(params, model, tx, MESH, RULES))
  assert position == 2 and int(restored.step) == 2
  state, _ = _run(step, restored, batches, position, 4)
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state), uninterrupted))
  saved = ck.ocp.PyTreeCheckpointer().metadata(tmp_path / "2" / "trainable").item_metadata.tree
  assert {k[-1] for k in _flat(saved)} == {"lora_a", "lora_b"}
  assert resumed.read_metadata(2)["num_experts"] == 2


def test_restore_names_both_models_on_fingerprint_mismatch(tmp_path):
  model = Transformer(CFG, EXPERTS)
  params = _params(model)
  tx = opt.make_optimizer("expert", params)
  state = ts.create_train_state(params, model, tx, MESH, RULES)
  ck.Checkpointer(tmp_path, ck.checkpoint_metadata("expert", CFG, EXPERTS, "demo"), async_save=False).save(state, 0)
  other = dataclasses.replace(CFG, d_ff=48, name="other")
  checkpointer = ck.Checkpointer(tmp_path, ck.checkpoint_metadata("expert", other, EXPERTS, "demo"))
  pattern = rf"'tiny_test' \(fingerprint {CFG.fingerprint()}\).*'other' \(fingerprint {other.fingerprint()}\)"
  with pytest.raises(ValueError, match=pattern):
    checkpointer.restore(state)
  with pytest.raises(ValueError, match="has stage='expert', but this run has stage='gate'"):
    ck.Checkpointer(tmp_path, ck.checkpoint_metadata("gate", CFG, EXPERTS, "demo")).restore(state)
  with pytest.raises(ValueError, match="has rank=4, but this run has rank=8"):
    ck.Checkpointer(tmp_path, ck.checkpoint_metadata("expert", CFG, dataclasses.replace(EXPERTS, rank=8),
                                                     "demo")).restore(state)


def _toy_state(value: float) -> ts.TrainState:
  """A small expert-stage state without a model, for the checkpoint-only tests."""
  params = {"layer": {"kernel": np.full((4, 4), 7.0, np.float32), "lora_a": np.full((2, 4, 3), value, np.float32),
                      "lora_b": np.full((2, 3, 4), -value, np.float32)}}
  tx = opt.make_optimizer("expert", params)
  return ts.TrainState.create(jax.device_put(params), tx).replace(step=jnp.asarray(int(value), jnp.int32))


_KILLED_SAVE = """
import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_training import _toy_state
from moe_jax.training import checkpointing as ck
checkpointer = ck.Checkpointer({directory!r}, {{"stage": "expert", "fingerprint": "f", "model_name": "toy"}})
checkpointer.save(_toy_state(1.0), data_position=1)
checkpointer.wait()
os.rename = os.replace = lambda *args, **kwargs: os._exit(17)  # the process dies where orbax commits the save
checkpointer.save(_toy_state(2.0), data_position=2)
checkpointer.wait()
"""


def test_interrupted_save_is_never_restored(tmp_path):
  """A process killed while committing step 2 leaves only its temporary directory: step 1 stays the latest."""
  directory = str(tmp_path / "run")
  script = _KILLED_SAVE.format(repo=REPO, tests=os.path.dirname(__file__), directory=directory)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 17, proc.stderr[-3000:]
  assert any(name.startswith("2.orbax-checkpoint-tmp") for name in os.listdir(directory)), os.listdir(directory)
  # A second crash, simulated: a complete copy of a later step that was never renamed into place.
  shutil.copytree(os.path.join(directory, "1"), os.path.join(directory, "3.orbax-checkpoint-tmp"))
  checkpointer = ck.Checkpointer(directory, {"stage": "expert", "fingerprint": "f", "model_name": "toy"})
  assert checkpointer.latest_step() == 1
  state, position = checkpointer.restore(_toy_state(0.0))
  assert position == 1 and int(state.step) == 1
  np.testing.assert_array_equal(state.params["layer"]["lora_a"], 1.0)
  np.testing.assert_array_equal(state.params["layer"]["kernel"], 7.0)  # frozen: from the template


def test_expert_file_round_trip(tmp_path):
  model = Transformer(CFG, EXPERTS)
  params = _params(model, seed=3)
  path = tmp_path / "experts" / "task_a.safetensors"
  metadata = ck.expert_metadata(params, CFG, "task_a")
  ck.save_experts(path, params, metadata)
  assert os.listdir(path.parent) == ["task_a.safetensors"]  # no temporary file left behind
  loaded, found = ck.load_experts(path, CFG)
  assert found == metadata
  assert found["num_experts"] == 2 and found["rank"] == 4 and found["task"] == "task_a"
  assert found["fingerprint"] == CFG.fingerprint() and found["base_model"] == "tiny_test"
  assert len(found["modules"]) == 7 + 11 and "decoder/layers_0/encoder_decoder_attention/query" in found["modules"]
  expected = {k: v for k, v in _flat(params).items() if k[-1] in ("lora_a", "lora_b", "router")}
  assert _flat(loaded).keys() == expected.keys()
  assert all(np.array_equal(_flat(loaded)[k], v) for k, v in expected.items())
  with pytest.raises(ValueError, match=r"expert file .* belongs to model 'tiny_test'"):
    ck.load_experts(path, dataclasses.replace(CFG, d_model=32))


def test_eval_loss_is_the_weighted_mean_and_z_loss_adds_log_z_squared():
  model = Transformer(CFG, dataclasses.replace(EXPERTS, router=Fixed()))  # needs routing_ids, also to build shapes
  params = _params(Transformer(CFG, EXPERTS))
  batch = _batch(5, routing=True)
  metrics = ts.make_eval_loss(model, MESH, RULES)(params, part.shard_batch(batch, MESH, RULES))
  np.testing.assert_allclose(metrics["loss"], jax.jit(_reference_loss, static_argnums=0)(model, params, batch),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["weight_sum"], batch["decoder_loss_weights"].sum(), rtol=1e-6)

  logits = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
  targets, weights = batch["decoder_target_tokens"][:2, :3], batch["decoder_loss_weights"][:2, :3]
  (plain, total), (with_z, _) = (ts.weighted_cross_entropy(logits, targets, weights, z) for z in (0.0, 0.1))
  log_z = np.log(np.sum(np.exp(logits.astype(np.float64)), axis=-1))
  np.testing.assert_allclose(with_z - plain, 0.1 * np.sum(weights * log_z**2), rtol=1e-5)
  np.testing.assert_allclose(total, weights.sum(), rtol=1e-6)
