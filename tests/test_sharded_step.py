"""A train step on a 4 x 2 (data x model) mesh of 8 virtual CPU devices equals the same step on one device.

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


def _check() -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest
  from jax.sharding import PartitionSpec as P

  from moe_jax.models import ExpertConfig, T5Config, Transformer
  from moe_jax.training import optimizer as opt
  from moe_jax.training import partitioning as part
  from moe_jax.training import train_step as ts

  assert jax.device_count() == DEVICES, jax.devices()
  with pytest.raises(ValueError, match=r"data=3 x model=2 = 6 devices, but 8 are given"):
    part.make_mesh(data=3, model=2)
  mesh = part.make_mesh(data=-1, model=2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
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
  for stage, experts in (("multitask", None), ("expert", ExpertConfig(num_experts=2, rank=4))):
    model = Transformer(cfg, experts)
    params = jax.device_get(nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens, tokens))["params"])
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, x.dtype), params)  # lora_b != 0
    tx = opt.make_optimizer(stage, params, learning_rate=1e-2, warmup_fraction=0.0)
    results = []
    for m in (mesh, single):
      state = ts.create_train_state(params, model, tx, m, rules)
      step = ts.make_train_step(model, tx, stage, m, rules, num_microbatches=2)
      sharded = part.shard_batch(batch, m, rules)
      metrics = []
      for _ in range(2):
        state, metric = step(state, sharded)
        metrics.append(metric)
      results.append((jax.device_get(state), jax.device_get(metrics), step.lower(state, sharded).as_text(), state))
    (got, got_metrics, hlo, sharded_state), (want, want_metrics, _, _) = results
    for g, w in zip(got_metrics, want_metrics):
      for key in ("loss", "grad_norm", "weight_sum", "learning_rate"):
        np.testing.assert_allclose(g[key], w[key], rtol=RTOL, err_msg=f"{stage} {key}")
    worst = 0.0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path((got.params, got.opt_state)),
                            jax.tree.leaves((want.params, want.opt_state))):
      error = float(np.max(np.abs(g - w), initial=0.0) / max(float(np.max(np.abs(w), initial=0.0)), 1e-30))
      assert error <= LEAF_TOL, f"{stage} {jax.tree_util.keystr(path)}: normwise relative error {error:.2e}"
      worst = max(worst, error)
    print(f"{stage}: largest normwise relative difference of a parameter or moment leaf {worst:.1e}")

    # Parameters and their Adam moments are laid out as the rules declare; activations carry constraints.
    layer = sharded_state.params["decoder"]["layers_0"]
    assert layer["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, "model")
    assert layer["self_attention"]["out"]["kernel"].sharding.spec == P("model", None)
    assert sharded_state.params["token_embedder"]["embedding"].sharding.spec == P("model", None)
    assert layer["pre_mlp_layer_norm"]["scale"].sharding.spec == P(None)
    mu = sharded_state.opt_state.inner_states["train"].inner_state.inner_state[1].mu
    if stage == "expert":
      assert layer["mlp"]["wi_0"]["lora_b"].sharding.spec == P(None, None, "model")
      assert mu["decoder"]["layers_0"]["mlp"]["wi_0"]["lora_b"].sharding.spec == P(None, None, "model")
    else:
      assert mu["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, "model")
    assert part.shard_batch(batch, mesh, rules)["decoder_target_tokens"].sharding.spec == P("data")
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
