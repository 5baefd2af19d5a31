"""Method building and evaluation on a mesh of 8 virtual CPU devices: every method's parameters are jax.Arrays split
exactly as the partitioning rules declare for that method's model (nothing left as host NumPy to be uploaded per
batch), and scoring a second batch of the same shape compiles nothing.

The 8 devices need XLA_FLAGS before JAX initialises, so, as in tests/test_sharded_step.py, the test runs this file
as a script in a fresh interpreter and reports its assertion output.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
EXPERT_TASKS = ["synthetic_reverse", "synthetic_sort"]
LENGTHS = {"inputs": 24, "targets": 8}


def _random_moe(config, experts, seed):
  """An N-expert tree as `checkpointing.load_experts` returns it: host NumPy, with nonzero B and router vectors."""
  import flax
  import jax
  import numpy as np

  from moe_jax.models import experts as ex

  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(jax.device_get(ex.init_experts(config, experts, jax.random.PRNGKey(seed))))
  return flax.traverse_util.unflatten_dict(
      {k: v if k[-1] == "lora_a" else rng.normal(0, 0.3, v.shape).astype(v.dtype) for k, v in flat.items()})


def _check() -> None:
  import jax
  import numpy as np

  from moe_jax.data import vocab
  from moe_jax.evaluation.scoring import choice_log_likelihoods, greedy_generate
  from moe_jax.methods import pipeline
  from moe_jax.models import ExpertConfig, T5Config, Transformer
  from moe_jax.training import partitioning as part
  from moe_jax.training.backbone import load_backbone
  from tasks import synthetic  # pylint: disable=unused-import  # registers the synthetic tasks

  assert jax.device_count() == DEVICES, jax.devices()
  mesh, rules = part.make_mesh(data=2, fsdp=2, model=2), part.axis_rules()
  config = T5Config(vocab_size=264, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                    num_decoder_layers=1, dtype="float32", name="tiny_eval_mesh")
  backbone = load_backbone(None, config, part.logical_shardings(part.abstract_params(Transformer(config)), mesh,
                                                                rules))
  moe = _random_moe(config, ExpertConfig(num_experts=len(EXPERT_TASKS), rank=4), seed=1)

  with vocab.using(backbone.vocabulary), part.activate(mesh, rules):
    built = pipeline.build_methods(pipeline.METHODS, config, backbone.params, moe, EXPERT_TASKS, 1,
                                   ExpertConfig(rank=4), 8, 8, LENGTHS, mesh, rules)
    assert sorted(built) == sorted(pipeline.METHODS)
    for name, method in built.items():
      declared = part.logical_shardings(part.abstract_params(method.model), mesh, rules)
      assert jax.tree.structure(method.params) == jax.tree.structure(declared), name
      split = 0
      for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(method.params), jax.tree.leaves(declared)):
        where = f"{name} {jax.tree_util.keystr(path)}"
        assert isinstance(leaf, jax.Array), f"{where}: {type(leaf).__name__}, not a jax.Array on the mesh"
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), f"{where}: {leaf.sharding} instead of {want}"
        split += leaf.addressable_shards[0].data.shape != leaf.shape
      assert split, f"{name}: no leaf is split over the devices"  # the comparison above is not vacuous
      print(f"{name}: every leaf placed as declared ({split} split)")

    # Two calls on batches of the same shape: the second compiles nothing (rank scores and greedy decoding, with
    # the routing ids of Fixed()-routed methods).
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, config.vocab_size, (16, LENGTHS["inputs"])).astype(np.int32)
    choices = rng.integers(2, config.vocab_size, (16, 3, LENGTHS["targets"])).astype(np.int32)
    for name in ("phatgoose", "oracle", "merged"):
      method = built[name]
      ids = None if method.routing_ids_fn is None else np.zeros(len(inputs), np.int32)
      for half, rows in enumerate((slice(0, 8), slice(8, 16))):
        before = len(compiles)
        scores, _ = choice_log_likelihoods(method.model, method.params, inputs[rows], choices[rows], batch_size=4,
                                           routing_ids=None if ids is None else ids[rows])
        tokens = greedy_generate(method.model, method.params, inputs[rows], LENGTHS["targets"],
                                 None if ids is None else ids[rows], batch_size=4)
        assert np.isfinite(scores).all() and tokens.shape == (8, LENGTHS["targets"])
        if half == 0:
          assert len(compiles) > before, f"{name}: no compilation seen on the first batch (listener broken?)"
        else:
          assert len(compiles) == before, f"{name}: the second batch compiled {len(compiles) - before} times"
      print(f"{name}: the second batch of the same shape compiled nothing")
  print("eval mesh OK")


def test_methods_are_placed_as_declared_and_score_without_recompiling():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "eval mesh OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]
  print(proc.stdout)


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
  sys.path.insert(0, REPO)
  _check()
