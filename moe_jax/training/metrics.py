"""Training metrics to a JSONL file and TensorBoard (tensorboardX: no TensorFlow needed), from process 0 only.

A resumed run repeats the steps after its checkpoint, so the writer first drops what was logged after the step it
resumes from (`resume_step`): `metrics.jsonl` then holds each step once, and TensorBoard purges the same steps.
"""

from __future__ import annotations

import json
from typing import Any

import jax

from moe_jax import fs

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Appends `{"step": s, name: value, ...}` lines to `<dir>/metrics.jsonl` and scalars to `<dir>/tensorboard`.

  The file is rewritten whole, atomically, at each write (a few hundred short lines per run), so it works on any
  `moe_jax.fs` path, object stores included, and a reader never sees half a line."""

  def __init__(self, directory: str, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._tb = None
    self._path = fs.join(directory, METRICS_FILE)
    self._lines: list[str] = []
    if not self._active:
      return
    fs.makedirs(directory)
    if fs.isfile(self._path):
      self._lines = [line for line in fs.read_text(self._path).splitlines()
                     if line.strip() and json.loads(line)["step"] <= resume_step]
      fs.write_text(self._path, "".join(line + "\n" for line in self._lines))
    if not fs.is_url(directory) or directory.startswith(("gs://", "s3://")):  # what tensorboardX can write to
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(fs.join(directory, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    scalars = {name: float(value) for name, value in metrics.items()}
    self._lines.append(json.dumps({"step": int(step), **scalars}))
    fs.write_text(self._path, "".join(line + "\n" for line in self._lines))
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
