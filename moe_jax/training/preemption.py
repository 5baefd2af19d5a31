"""Preemption: SIGTERM (what TPU spot VMs, SLURM and Kubernetes send before they stop a job) ends training with a
checkpoint of the step just finished, so that rerunning the same command resumes there instead of at the last
periodic checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a job ended by SIGTERM: schedulers may requeue it


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is saved: the process exits with `EXIT_CODE`, without a traceback."""

  def __init__(self, step: int):
    super().__init__(EXIT_CODE)
    self.step = step


class PreemptionWatch:
  """`reached(step)` turns True at one step, the same on every process, once any process got SIGTERM.

  Under `jax.distributed`, JAX's preemption service owns SIGTERM and agrees on the step across processes (so every
  process must call `reached` at every step). A single process without it installs a handler that records the
  signal; the previous handler comes back when the `with` block ends. Handlers can only be set from the main thread:
  elsewhere SIGTERM keeps its default (the run ends at its last periodic checkpoint).
  """

  def __init__(self):
    self._received = False
    self._installed = False
    self._previous: Any = None

  def __enter__(self) -> PreemptionWatch:
    if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._record)
      self._installed = True
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self._installed:  # None: a handler set outside Python, which cannot be put back; the default is closest
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

  def _record(self, signum: int, frame: Any) -> None:
    self._received = True

  def reached(self, step: int) -> bool:
    if not jax.distributed.is_initialized():
      return self._received
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is switched off (jax_enable_preemption_service=False)
      return False
