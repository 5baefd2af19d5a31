"""Training metrics to a JSONL file and TensorBoard (tensorboardX: no TensorFlow needed), from process 0 only."""

from __future__ import annotations

import json
import os
from typing import Any

import jax


class MetricsWriter:
  """Appends `{"step": s, name: value, ...}` lines to `<dir>/metrics.jsonl` and scalars to `<dir>/tensorboard`."""

  def __init__(self, directory: str):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(directory, exist_ok=True)
    self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    scalars = {name: float(value) for name, value in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
