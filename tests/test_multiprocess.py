"""Two processes on this machine under `jax.distributed` (CPU, gloo collectives), two devices each, train the tiny
model for a few steps on a 2 x 2 (data x model) mesh spanning both, each feeding its own half of every batch, and
end with the parameters of the same run in one process with four devices. The run also saves and restores an orbax
checkpoint from both processes, and then a SIGTERM to one process stops both at the same step. Validation on shards
of unequal size runs the same number of batches on both processes (no deadlock) and gives the one-process loss.

This file is also the worker script: `python test_multiprocess.py worker ID PORT OUT` or `... single OUT`, and
`... validate-worker ID PORT OUT` or `... validate-single OUT`.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, LOCAL_DEVICES, STEPS, BATCH = 2, 2, 3, 8


def _train(out: str, process_id: int | None, port: int | None) -> None:
  """Train on a data=2 x model=2 mesh; write the final (gathered) parameters to OUT/params_<process>.npz."""
  sys.path.insert(0, REPO)
  from moe_jax import distributed

  multi = process_id is not None
  distributed.initialize(argparse.Namespace(coordinator_address=f"localhost:{port}" if multi else None,
                                            num_processes=PROCESSES if multi else None, process_id=process_id))
  import flax
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  from moe_jax import gin_utils
  from moe_jax.models import T5Config, Transformer
  from moe_jax.training import checkpointing as ckpt
  from moe_jax.training import optimizer as opt
  from moe_jax.training import partitioning as part
  from moe_jax.training import train_step as ts
  from moe_jax.training.preemption import PreemptionWatch

  assert jax.device_count() == PROCESSES * LOCAL_DEVICES and jax.local_device_count() == (
      LOCAL_DEVICES if multi else PROCESSES * LOCAL_DEVICES), jax.devices()
  assert jax.process_count() == (PROCESSES if multi else 1)
  gin_utils.configure(["gin/models/tiny.gin"], [])
  config = T5Config()
  mesh, rules = part.make_mesh(data=2, model=2), part.axis_rules()
  model = Transformer(config)
  tokens = jnp.ones((1, 1), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  tx = opt.make_optimizer("multitask", params, learning_rate=1e-2, warmup_fraction=0.0)
  initial = np.asarray(params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])
  state = ts.create_train_state(params, model, tx, mesh, rules)
  step = ts.make_train_step(model, tx, "multitask", mesh, rules)
  rng = np.random.default_rng(0)
  rows = BATCH // jax.process_count()
  for _ in range(STEPS):
    batch = {"encoder_input_tokens": rng.integers(1, 264, (BATCH, 12)), "decoder_input_tokens":
             rng.integers(1, 264, (BATCH, 6)), "decoder_target_tokens": rng.integers(1, 264, (BATCH, 6)),
             "decoder_loss_weights": np.ones((BATCH, 6))}
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows].astype(
        np.float32 if k == "decoder_loss_weights" else np.int32) for k, v in batch.items()}
    state, _ = step(state, part.shard_batch(local, mesh, rules))

  checkpointer = ckpt.Checkpointer(os.path.join(out, "checkpoints"), ckpt.checkpoint_metadata(
      "multitask", config, None, "random"))
  checkpointer.save(state, data_position=STEPS)
  checkpointer.wait()
  restored, position = checkpointer.restore(state)
  checkpointer.close()
  assert position == STEPS and int(restored.step) == STEPS
  gathered = multihost_utils.process_allgather((state.params, restored.params), tiled=True)
  flat, flat_restored = (flax.traverse_util.flatten_dict(tree, sep="/") for tree in gathered)
  for key, value in flat.items():
    np.testing.assert_array_equal(value, flat_restored[key], err_msg=f"restored {key}")
  assert not np.allclose(flat["encoder/layers_0/mlp/wi_0/kernel"], initial)  # the steps trained something
  np.savez(os.path.join(out, f"params_{jax.process_index() if multi else 'single'}.npz"), **flat)
  if multi:  # SIGTERM to process 1 only: both processes stop at one agreed step
    with PreemptionWatch() as watch:
      for number in range(STEPS + 1, STEPS + 1000):
        state, _ = step(state, part.shard_batch(local, mesh, rules))
        if process_id == 1 and number == STEPS + 2:
          os.kill(os.getpid(), signal.SIGTERM)
        if watch.reached(number):
          print(f"preempted at step {number}", flush=True)
          break
  print(f"worker {process_id} OK", flush=True)


# Validation examples per task: 5 split 3 + 2 over two shards (2 and 1 batches of VALIDATION_BATCH rows), 1 split
# 1 + 0 (one shard empty), 0 (the split empty everywhere).
VALIDATION_SIZES = {"uneven_validation_5": 5, "uneven_validation_1": 1, "uneven_validation_0": 0}
VALIDATION_BATCH, VALIDATION_LENGTHS = 2, {"inputs": 24, "targets": 24}


def _validate(out: str, process_id: int | None, port: int | None) -> None:
  """The validation loss (aggregated as training's `KeepBest.loss`) of a random tiny model on each task of
  VALIDATION_SIZES; writes OUT/validation_<process>.json: {task: {batches, loss, weight} or {error}}. One process
  reads the whole split in batches of PROCESSES * VALIDATION_BATCH rows, each of two reads its shard in batches of
  VALIDATION_BATCH rows: the global batches are equal in size."""
  sys.path.insert(0, REPO)
  from moe_jax import distributed

  multi = process_id is not None
  distributed.initialize(argparse.Namespace(coordinator_address=f"localhost:{port}" if multi else None,
                                            num_processes=PROCESSES if multi else None, process_id=process_id))
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import seqio
  import tensorflow as tf

  from moe_jax import gin_utils
  from moe_jax.data import pipeline
  from moe_jax.models import T5Config, Transformer
  from moe_jax.training import partitioning as part
  from moe_jax.training.train_step import make_eval_loss

  gin_utils.configure(["gin/models/tiny.gin"], [])
  features = {k: seqio.Feature(seqio.ByteVocabulary(), add_eos=True) for k in ("inputs", "targets")}
  for name, size in VALIDATION_SIZES.items():
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, size: int = size) -> tf.data.Dataset:
      del split, shuffle_files, seed
      rows = [f"example {i}: " + "ab" * i for i in range(size)]  # inputs and targets of different lengths
      return tf.data.Dataset.from_tensor_slices({"inputs": tf.constant(rows, tf.string),
                                                 "targets": tf.constant([r[::-1] for r in rows], tf.string)})
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
                           output_features=features,
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])
  config = T5Config()
  mesh, rules = part.make_mesh(data=2, model=2), part.axis_rules()
  model = Transformer(config)
  tokens = jnp.ones((1, 1), jnp.int32)
  init = lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  params = jax.jit(init, out_shardings=part.logical_shardings(part.abstract_params(model), mesh, rules))()
  eval_loss = make_eval_loss(model, mesh, rules)
  results = {}
  for name in VALIDATION_SIZES:
    try:
      batches = pipeline.validation_batches(name, VALIDATION_LENGTHS, VALIDATION_BATCH * (1 if multi else PROCESSES),
                                            10, jax.process_index(), jax.process_count())
    except ValueError as e:
      results[name] = {"error": str(e)}
      continue
    # Aggregated as `KeepBest.loss` does: sum(loss * weight_sum) / sum(weight_sum) over the batches.
    totals = [jax.device_get(eval_loss(params, part.shard_batch(b, mesh, rules))) for b in batches]
    loss = sum(float(t["loss"]) * float(t["weight_sum"]) for t in totals) / sum(float(t["weight_sum"]) for t in totals)
    results[name] = {"batches": len(batches), "loss": loss,
                     "weight": int(sum(b["decoder_loss_weights"].sum() for b in batches))}
  with open(os.path.join(out, f"validation_{process_id if multi else 'single'}.json"), "w") as f:
    json.dump(results, f)
  print(f"validate {process_id} OK", flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _communicate(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  """Each process's output once it exits; all are killed if one runs past `timeout` seconds (a deadlock)."""
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  return outputs


def _spawn(args: list[str], devices: int, script: str = os.path.abspath(__file__)) -> subprocess.Popen:
  """`python script *args` on `devices` virtual CPU devices, outside any distributed setting of this process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
  env.pop("MOE_JAX_DISTRIBUTED", None)
  return subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("flags,environ,expected", [
    ({}, {}, False),
    ({"num_processes": 2}, {}, True),
    ({}, {"SLURM_NTASKS": "4"}, True),
    ({}, {"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({}, {"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({}, {"MOE_JAX_DISTRIBUTED": "1"}, True),
    ({}, {"MOE_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, False),
])
def test_when_a_run_joins_other_processes(flags, environ, expected):
  from moe_jax import distributed

  args = argparse.Namespace(**{"coordinator_address": None, "num_processes": None, "process_id": None, **flags})
  assert distributed.wanted(args, environ) is expected


def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  procs = [_spawn(["worker", str(i), str(port), str(tmp_path)], LOCAL_DEVICES) for i in range(PROCESSES)]
  procs.append(_spawn(["single", str(tmp_path / "single")], PROCESSES * LOCAL_DEVICES))
  outputs = _communicate(procs, 300)
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-5000:]
  assert "process 1 of 2: 2 local of 4 devices" in outputs[1], outputs[1][-2000:]
  stops = [re.findall(r"preempted at step (\d+)", output) for output in outputs[:PROCESSES]]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  # The checkpoint was written once, by both processes together, and holds one step.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(STEPS)]
  first, second, single = (np.load(tmp_path / name) for name in
                           ("params_0.npz", "params_1.npz", "single/params_single.npz"))
  assert sorted(first.files) == sorted(single.files) and len(first.files) > 10
  for key in single.files:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    np.testing.assert_array_equal(first[key], single[key], err_msg=key)


def test_validation_on_unequal_shards_neither_deadlocks_nor_changes_the_loss(tmp_path):
  """5 validation examples, 2 rows per process and batch: process 0 holds examples 0, 2, 4 (2 batches), process 1
  examples 1, 3 (1 batch) and pads with one all-zero batch, so both run the jitted loss (a collective) twice;
  with 1 example, process 1 has none and pads. The loss is the one-process loss over the same examples (batches of
  4 rows, the short last one padded): padding adds no weight. An empty split raises on both processes."""
  port = _free_port()
  procs = [_spawn(["validate-worker", str(i), str(port), str(tmp_path)], LOCAL_DEVICES) for i in range(PROCESSES)]
  procs.append(_spawn(["validate-single", str(tmp_path)], PROCESSES * LOCAL_DEVICES))
  outputs = _communicate(procs, 300)  # before the fix, process 0 waited forever in its second batch
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-5000:]
  first, second, single = (json.load(open(tmp_path / f"validation_{name}.json")) for name in ("0", "1", "single"))
  for name, batches in (("uneven_validation_5", 2), ("uneven_validation_1", 1)):
    assert first[name]["batches"] == second[name]["batches"] == single[name]["batches"] == batches, name
    assert first[name]["loss"] == second[name]["loss"], name  # one replicated result
    assert first[name]["weight"] + second[name]["weight"] == single[name]["weight"] > 0, name
    np.testing.assert_allclose(first[name]["loss"], single[name]["loss"], rtol=1e-5, err_msg=name)
  assert second["uneven_validation_1"]["weight"] == 0  # process 1's shard is empty: padding only
  for result in (first, second, single):
    assert result["uneven_validation_0"] == {"error": "uneven_validation_0: the validation split is empty"}


if __name__ == "__main__":
  if sys.argv[1] == "worker":
    _train(sys.argv[4], int(sys.argv[2]), int(sys.argv[3]))
  elif sys.argv[1] == "validate-worker":
    _validate(sys.argv[4], int(sys.argv[2]), int(sys.argv[3]))
  elif sys.argv[1] == "validate-single":
    _validate(sys.argv[2], None, None)
  else:
    os.makedirs(sys.argv[2], exist_ok=True)
    _train(sys.argv[2], None, None)
