"""A whole job's progress over its stages: after each stage, one line with the time spent and the ETA of the job.

Each stage shows its own progress bar (training steps, evaluated tasks); this adds what those cannot: how far the
whole job is. The ETA extrapolates the rate of the work done so far (in units the caller weighs, e.g. training
steps), so it is rough until a few stages are done; a stage skipped because its product exists costs nothing.
"""

from __future__ import annotations

import sys
import time

import jax


def _clock(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s"


class JobProgress:
  """`done(stage, units)` after each stage; `total` units in all (a stage's `units` are its share of the work)."""

  def __init__(self, name: str, total: float):
    self.name, self.total, self.units = name, float(total), 0.0
    self.start = time.perf_counter()

  def done(self, stage: str, units: float, worked: bool = True) -> None:
    """Count `units` of work done by `stage`; `worked=False` (its product existed) counts it as free."""
    if worked:
      self.units += units
    else:
      self.total -= units
    elapsed = time.perf_counter() - self.start
    left = self.total - self.units
    eta = elapsed / self.units * left if self.units > 0 else float("nan")
    if jax.process_index() == 0:
      print(f"[{self.name}] {stage} done: {100 * self.units / max(self.total, 1):.0f}% of the work in "
            f"{_clock(elapsed)}, ETA {_clock(eta) if eta == eta else '?'}", file=sys.stderr, flush=True)
