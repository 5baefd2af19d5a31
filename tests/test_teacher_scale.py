"""TeacherLM's student at scale, on 8 virtual CPU devices: full fine-tuning sharded with fsdp (what the seed needed
DeepSpeed ZeRO-3 for) trains the same parameters as one device, with remat and gradient accumulation on; bf16
compute keeps float32 parameters; and BLOOM-7.1B's full training state (float32 weights and Adam's two moments:
79 GiB, and its float32 gradients add 26 GiB) does not fit one 80 GiB accelerator, while fsdp over 8 puts an eighth
of it on each.

JAX in the pytest process is up with one device, so the 8-device half runs this file as a script in a fresh
interpreter (as tests/test_sharded_step.py does); the one-device reference trains in the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np

from moe_jax import gin_utils
from moe_jax.models.causal import CausalLMConfig
from moe_jax.models.interface import build_model
from moe_jax.teacher import student
from moe_jax.teacher.lm import load_lm
from moe_jax.training import optimizer as opt
from moe_jax.training import partitioning as part
from moe_jax.training.train_step import abstract_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
GIB = 1 << 30
# Normwise relative difference of a parameter leaf after 4 Adam steps: sharded sums and accumulated microbatches
# round differently from one device, and Adam's g / sqrt(v) amplifies near-cancelling entries (see
# tests/test_sharded_step.py).
LEAF_TOL = 1e-4
WORDS = ("red", "sun", "pi", "ox", "up", "lo")
# 24 rows in batches of 16 (2 microbatches of 8, one row per device): 2 steps an epoch, the second with 8 fillers.
ROWS = [f"Q: Is {a} the same as {b}? (A) Yes (B) No A: The answer is ({'A' if a == b else 'B'}). Let's think step "
        f"by step. {a} and {b} are {'equal' if a == b else 'different'}." for a in WORDS for b in WORDS[:4]]
TINY_BINDINGS = ["train.feature_lengths = {'inputs': 0, 'targets': 128}", "make_optimizer.learning_rate = 1e-3",
                 "CausalLMConfig.dtype = 'float32'"]
STUDENT = dict(epochs=2, batch_size=16, seed=3)
SHARDED = ["make_mesh.data = 2", "make_mesh.fsdp = 4", "CausalLMConfig.remat = True", "train.num_microbatches = 2"]


def _train(data_file: str, model_dir: str, bindings: list[str]) -> list[str]:
  gin.clear_config()
  gin_utils.configure(["models/tiny_causal.gin", "teacherlm_student.gin"], TINY_BINDINGS + bindings)
  return student.train_student(data_file, model_dir, gin_config_str=gin.config_str(), **STUDENT)


def _restore(product: str, bindings: list[str]):
  gin.clear_config()
  gin_utils.configure(["models/tiny_causal.gin"], TINY_BINDINGS + bindings)
  return jax.device_get(load_lm(product, CausalLMConfig()).params)


def _state_gib_per_device(config, fsdp: int) -> tuple[float, float]:
  """(the whole full-fine-tuning state, its largest per-device share on a data x fsdp mesh) in GiB, from shapes
  only: nothing is allocated."""
  model = build_model(config)
  state = abstract_state(model, opt.make_optimizer("multitask", part.abstract_params(model), total_steps=10))
  mesh = part.make_mesh(data=DEVICES // fsdp, fsdp=fsdp)
  shardings = part.logical_shardings(state, mesh, part.axis_rules())
  leaves = jax.tree.leaves(jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, state,
                                        is_leaf=lambda x: hasattr(x, "value")))
  assert len(leaves) == len(jax.tree.leaves(shardings))
  whole = share = 0
  for leaf, sharding in zip(leaves, jax.tree.leaves(shardings)):
    whole += leaf.size * leaf.dtype.itemsize
    share += int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
  return whole / GIB, share / GIB


def _script(work: str) -> None:
  """The 8-device half: BLOOM-7.1B's state per device; the student on data x fsdp in float32 and in bf16."""
  assert jax.device_count() == DEVICES, jax.devices()
  gin.clear_config()
  gin_utils.configure(["models/bloom_7b1.gin"], [])
  whole, share = _state_gib_per_device(CausalLMConfig(), fsdp=DEVICES)
  data_file = os.path.join(work, "rows.jsonl")
  fp32 = _train(data_file, os.path.join(work, "fsdp"), SHARDED)
  bf16 = _train(data_file, os.path.join(work, "fsdp_bf16"), SHARDED + ["CausalLMConfig.dtype = 'bfloat16'"])
  with open(os.path.join(work, "fsdp", "epochs.json")) as f:
    assert json.load(f)["steps_per_epoch"] == 2
  print("RESULT " + json.dumps({"whole_gib": whole, "share_gib": share, "fp32": fp32[-1], "bf16": bf16[-1]}))


def test_fsdp_student_matches_one_device_and_a_7b_state_fits_only_sharded(tmp_path):
  data_file = str(tmp_path / "rows.jsonl")
  with open(data_file, "w") as f:
    f.writelines(json.dumps({"cot_tail": row}) + "\n" for row in ROWS)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=900)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
  result = json.loads(lines[-1][len("RESULT "):])

  # BLOOM-7.1B, float32 weights + Adam's mu and nu: 7.07e9 * 12 bytes.
  assert 78 < result["whole_gib"] < 80 < result["whole_gib"] * 4 / 3, result  # + gradients: over 80 GiB
  assert result["share_gib"] < result["whole_gib"] / DEVICES * 1.01, result

  one_device = _train(data_file, str(tmp_path / "one_device"), [])[-1]
  want = _restore(one_device, [])
  for name, bindings in (("fp32", []), ("bf16", ["CausalLMConfig.dtype = 'bfloat16'"])):
    got = _restore(result[name], bindings)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      assert g.dtype == np.float32, f"{name} {jax.tree_util.keystr(path)} stored as {g.dtype}"
      error = float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
      # bf16 compute moves the parameters, but by a fraction of a step, not by a different training run.
      assert error <= (LEAF_TOL if name == "fp32" else 3e-2), f"{name} {jax.tree_util.keystr(path)}: {error:.1e}"
  gin.clear_config()


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
  sys.path.insert(0, REPO)
  _script(sys.argv[1])
