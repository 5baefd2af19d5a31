"""Keep the best expert, as PHATGOOSE trains experts and gates: every `every` steps the loss on fixed batches of the
task's validation split; the expert with the lowest loss so far is written to `<model_dir>/best.safetensors` (with
its step and loss), and becomes the stage's product when training ends. A resumed run reads the best loss back
from that file, so an interruption never forgets the best expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_jax import fs
from moe_jax.models.config import T5Config
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import partitioning as part
from moe_jax.training.metrics import MetricsWriter

BEST_FILE = "best.safetensors"


class KeepBest:
  """Validation every `every` steps with `eval_loss(params, batch)` (`train_step.make_eval_loss`) on `batches`."""

  def __init__(self, model_dir: str, eval_loss: Any, batches: Sequence[dict[str, np.ndarray]], mesh: Any,
               rules: Any, every: int, config: T5Config, task: str, record: dict[str, Any]):
    """`record`: the product's metadata besides the expert layout (stage, backbone, config; see `loop.train`)."""
    self.path = fs.join(model_dir, BEST_FILE)
    self.eval_loss, self.mesh, self.rules, self.every = eval_loss, mesh, rules, every
    self.batches = [part.shard_batch(b, mesh, rules) for b in batches]
    self.config, self.task, self.record = config, task, record
    self.best = ckpt.read_expert_metadata(self.path)["validation_loss"] if fs.isfile(self.path) else math.inf

  def loss(self, params: Any) -> float:
    """The loss-weighted mean over the validation batches."""
    totals = [jax.device_get(self.eval_loss(params, b)) for b in self.batches]
    weight = sum(float(t["weight_sum"]) for t in totals)
    return sum(float(t["loss"]) * float(t["weight_sum"]) for t in totals) / max(weight, 1.0)

  def __call__(self, step: int, state: Any, writer: MetricsWriter, last: bool) -> None:
    """At every `every`-th step and the last: validate, log `validation_loss`, keep the expert if it is the best."""
    if step % self.every and not last:
      return
    loss = self.loss(state.params)
    writer.write(step, {"validation_loss": loss})
    if loss < self.best:
      self.best = loss
      ckpt.save_experts(self.path, state.params, ckpt.expert_metadata(
          state.params, self.config, self.task, **self.record, step=step, validation_loss=loss))

  def finish(self, product: str) -> None:
    """The best expert becomes the product (copied, then renamed into place)."""
    if jax.process_index() == 0:
      fs.copy(self.path, product)
    if jax.process_count() > 1:  # the next stage, on every process, reads the product
      multihost_utils.sync_global_devices(f"keep best {product}")
