"""A train step on each mesh layout of 8 virtual CPU devices equals the same step on one device, with parameters
split as the rules declare.

The 8 devices need XLA_FLAGS before JAX initialises, and JAX in the pytest process is already up with one device,
so the test runs this file as a script in a fresh interpreter and reports its assertion output.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
# float32. Losses and norms agree elementwise to RTOL. Each parameter or Adam-moment leaf agrees to LEAF_TOL relative
# to the leaf's largest entry: single-device fp32 LoRA gradients are themselves only ~1e-5 (normwise) from float64
# ones, the sharded step rounds its partial sums differently, and Adam's g / sqrt(v) amplifies near-cancelling
# entries, so an elementwise rtol on updated parameters would test rounding luck, not sharding.
RTOL, LEAF_TOL = 1e-5, 1e-4


# The layouts of the README's "Scaling out" section on 8 devices: T5X tensor parallelism, the T5-XXL layout (fsdp x
# model), and experts over their own axis. Each maps to the expected per-device shard shapes of a few leaves of
# the test model (d_model 16, d_ff 32, vocab 64, 2 experts of rank 4).
LAYOUTS = {
    "data x model": (dict(data=4, model=2), {"wi_0": (16, 16), "out": (8, 16), "embedding": (32, 16),
                                             "lora_b": (2, 4, 16), "lora_a": (2, 16, 4), "scale": (16,)}),
    "fsdp x model": (dict(fsdp=4, model=2), {"wi_0": (4, 16), "out": (8, 4), "embedding": (32, 4),
                                             "lora_b": (2, 4, 16), "lora_a": (2, 4, 4), "scale": (4,)}),
    "fsdp x expert x model": (dict(fsdp=2, expert=2, model=2), {"wi_0": (8, 16), "out": (8, 8), "embedding": (32, 8),
                                                                "lora_b": (1, 4, 16), "lora_a": (1, 8, 4),
                                                                "scale": (8,)}),
}


def _shard_shapes(state) -> dict[str, tuple[int, ...]]:
  """Per-device shapes of a few leaves (the LoRA ones when the state has experts) and of one Adam moment."""
  layer = state.params["decoder"]["layers_0"]
  leaves = {"wi_0": layer["mlp"]["wi_0"]["kernel"], "out": layer["self_attention"]["out"]["kernel"],
            "embedding": state.params["token_embedder"]["embedding"], "scale": layer["pre_mlp_layer_norm"]["scale"]}
  mu = state.opt_state.inner_states["train"].inner_state.inner_state[1].mu["decoder"]["layers_0"]["mlp"]["wi_0"]
  if "lora_b" in layer["mlp"]["wi_0"]:
    leaves.update(lora_b=layer["mlp"]["wi_0"]["lora_b"], lora_a=layer["mlp"]["wi_0"]["lora_a"], mu=mu["lora_b"])
  else:
    leaves["mu"] = mu["kernel"]
  return {name: leaf.addressable_shards[0].data.shape for name, leaf in leaves.items()}


def _check() -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest

  from moe_jax.models import ExpertConfig, T5Config, Transformer
  from moe_jax.training import optimizer as opt
  from moe_jax.training import partitioning as part
  from moe_jax.training import train_step as ts

  assert jax.device_count() == DEVICES, jax.devices()
  with pytest.raises(ValueError, match=r"data=3 x fsdp=1 x expert=1 x model=2 = 6 devices, but 8 are given"):
    part.make_mesh(data=3, model=2)
  assert dict(part.make_mesh(data=-1, model=2).shape) == {"data": 4, "fsdp": 1, "expert": 1, "model": 2}
  single = part.make_mesh(devices=jax.devices()[:1])
  rules = part.axis_rules()

  cfg = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                 num_decoder_layers=1, dtype="float32")
  rng = np.random.default_rng(0)
  batch = {
      "encoder_input_tokens": rng.integers(1, 64, (8, 7)).astype(np.int32),
      "decoder_input_tokens": rng.integers(1, 64, (8, 5)).astype(np.int32),
      "decoder_target_tokens": rng.integers(1, 64, (8, 5)).astype(np.int32),
      "decoder_loss_weights": rng.random((8, 5)).astype(np.float32),
  }
  tokens = jnp.ones((1, 1), jnp.int32)
  with pytest.raises(ValueError, match=r"dimension 'expert' of size 3 cannot be split over mesh axes \('expert',\)"):
    part.logical_shardings(part.abstract_params(Transformer(cfg, ExpertConfig(num_experts=3))),
                           part.make_mesh(fsdp=2, expert=2, model=2), rules)

  def run(model, params, tx, stage, mesh):
    state = ts.create_train_state(params, model, tx, mesh, rules)
    step = ts.make_train_step(model, tx, stage, mesh, rules, num_microbatches=2)
    sharded = part.shard_batch(batch, mesh, rules)
    metrics = []
    for _ in range(2):
      state, metric = step(state, sharded)
      metrics.append(metric)
    return state, jax.device_get(metrics), step.lower(state, sharded).as_text()

  for stage, experts in (("multitask", None), ("expert", ExpertConfig(num_experts=2, rank=4))):
    model = Transformer(cfg, experts)
    params = jax.device_get(nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens, tokens))["params"])
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, x.dtype), params)  # lora_b != 0
    tx = opt.make_optimizer(stage, params, learning_rate=1e-2, warmup_fraction=0.0)
    want_state, want_metrics, _ = run(model, params, tx, stage, single)
    want = jax.device_get(want_state)
    for layout, (sizes, shard_shapes) in LAYOUTS.items():
      mesh = part.make_mesh(**sizes)
      sharded_state, got_metrics, hlo = run(model, params, tx, stage, mesh)
      got = jax.device_get(sharded_state)
      for g, w in zip(got_metrics, want_metrics):
        for key in ("loss", "grad_norm", "weight_sum", "learning_rate"):
          np.testing.assert_allclose(g[key], w[key], rtol=RTOL, err_msg=f"{layout} {stage} {key}")
      worst = 0.0
      for (path, g), w in zip(jax.tree_util.tree_leaves_with_path((got.params, got.opt_state)),
                              jax.tree.leaves((want.params, want.opt_state))):
        error = float(np.max(np.abs(g - w), initial=0.0) / max(float(np.max(np.abs(w), initial=0.0)), 1e-30))
        where = f"{layout} {stage} {jax.tree_util.keystr(path)}"
        assert error <= LEAF_TOL, f"{where}: normwise relative error {error:.1e}"
        worst = max(worst, error)
      print(f"{layout} {stage}: largest normwise relative difference of a parameter or moment leaf {worst:.1e}")

      # Parameters and their Adam moments are split across devices as the rules declare for this mesh.
      got_shapes = _shard_shapes(sharded_state)
      expected = {k: v for k, v in shard_shapes.items() if k in got_shapes}
      expected["mu"] = expected["lora_b" if experts else "wi_0"]
      assert got_shapes == expected, f"{layout} {stage}: {got_shapes} != {expected}"
      assert part.shard_batch(batch, mesh, rules)["decoder_target_tokens"].addressable_shards[0].data.shape == \
          (8 // part.batch_shards(mesh, rules), 5)
      assert "sharding_constraint" in hlo
  print("sharded step OK")


def test_sharded_step_matches_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "sharded step OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]
  print(proc.stdout)


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
  sys.path.insert(0, REPO)
  _check()
