"""TeacherLM enhancement over two processes under `jax.distributed` (CPU, two devices each): each process generates
its own chunks (process 0 two of them, process 1 one: uneven work must not deadlock), rows split over its local
devices, and the merged output is byte for byte the one-process output.

This file is also the worker script: `python test_teacher_multiprocess.py worker ID PORT DIR` or `... single DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, LOCAL_DEVICES = 2, 2
# 7 rows in chunks of 3: chunks 0 and 2 are process 0's, chunk 1 process 1's.
SETTINGS = dict(batch_size=2, chunk_size=3, max_prompt_length=176, max_new_tokens=12, temperature=1.0, seed=7)
CLAIMS = ["Cats purr.", "The sun is cold.", "Water is wet.", "Fish can fly.", "Ice melts.", "Rocks sing.",
          "Birds nest."]


def _enhance(directory: str, output: str, process_id: int | None, port: int | None) -> None:
  sys.path.insert(0, REPO)
  from moe_jax import distributed

  multi = process_id is not None
  distributed.initialize(argparse.Namespace(coordinator_address=f"localhost:{port}" if multi else None,
                                            num_processes=PROCESSES if multi else None, process_id=process_id))
  import jax

  from moe_jax import gin_utils
  from moe_jax.models.causal import CausalLMConfig
  from moe_jax.teacher import enhance as en

  assert jax.process_count() == (PROCESSES if multi else 1) and jax.local_device_count() == LOCAL_DEVICES
  gin_utils.configure(["gin/models/tiny_causal.gin"], ["CausalLMConfig.dtype = 'float32'"])
  en.enhance(os.path.join(directory, "prepared.jsonl"), os.path.join(directory, output), teacher=None,
             model_config=CausalLMConfig(), **SETTINGS)
  print(f"process {jax.process_index()} done")


def test_two_processes_enhance_like_one(tmp_path):
  from moe_jax.teacher import formats
  (tmp_path / "prepared.jsonl").write_text(formats.to_jsonl(formats.prepare_rows(
      [{"sentence": claim, "label": i % 2 == 0} for i, claim in enumerate(CLAIMS)], "creak")))
  from test_multiprocess import _free_port, _spawn  # pylint: disable=g-import-not-at-top  (the shared launcher)
  port = _free_port()
  script = os.path.abspath(__file__)
  procs = [_spawn(["worker", str(i), str(port), str(tmp_path)], LOCAL_DEVICES, script) for i in range(PROCESSES)]
  procs.append(_spawn(["single", str(tmp_path)], LOCAL_DEVICES, script))
  outputs = []
  try:
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0 and " done" in output, output[-5000:]
  multi, single = (tmp_path / "multi.jsonl").read_bytes(), (tmp_path / "single.jsonl").read_bytes()
  assert multi == single and len(multi.splitlines()) == len(CLAIMS)
  assert all(json.loads(line)["cot"] is not None for line in multi.splitlines())
  assert sorted(os.listdir(tmp_path / "multi.jsonl.parts")) == [
      "manifest.json", "part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]


if __name__ == "__main__":
  if sys.argv[1] == "worker":
    _enhance(sys.argv[4], "multi.jsonl", int(sys.argv[2]), int(sys.argv[3]))
  else:
    _enhance(sys.argv[2], "single.jsonl", None, None)
