"""Routing diagnostics: per expert module, the share of each task's tokens that the router sends to each expert.

Routing decisions are recomputed from each module's input with the model's own router (a flax method
interceptor, no hook in the model), counted over real tokens (encoder tokens for modules that read encoder
positions, target positions otherwise), and reduced on device per batch. Under `partitioning.activate` the batches
go onto the mesh as evaluation's do (`moe_jax.evaluation.scoring.fixed_batches`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.evaluation.scoring import batch_rows, fixed_batches, pad_tokens
from moe_jax.methods.average_activation import reads_encoder_positions
from moe_jax.models.lora import Linear, has_experts, module_path
from moe_jax.models.routers import Uniform
from moe_jax.models.t5 import Transformer
from moe_jax.training import partitioning as part

_COLLECTION = "routing_counts"


@functools.partial(jax.jit, static_argnums=0)
def _batch_counts(model: Transformer, params: Any, encoder_tokens: jax.Array, decoder_tokens: jax.Array,
                  targets: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """{module path: tokens routed to each expert [E] (a token counts once per chosen expert)}; rows not `valid`
  (padding to the fixed batch shape) count for nothing."""
  encoder_mask = ((encoder_tokens > 0) & valid[:, None]).astype(jnp.float32)
  decoder_mask = ((targets > 0) & valid[:, None]).astype(jnp.float32)

  def capture(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, Linear) and has_experts(module.experts,
                                                                                        module_path(module)):
      vectors = module.get_variable("params", "router")
      router = module.experts.router or Uniform()
      routing = router(args[0], vectors, args[1] if len(args) > 1 else None)
      weights = routing.weights if routing.experts is None else jnp.sum(
          jax.nn.one_hot(routing.experts, vectors.shape[0], dtype=jnp.float32), axis=-2)
      if routing.experts is None:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
      mask = encoder_mask if reads_encoder_positions(module_path(module)) else decoder_mask
      module.sow(_COLLECTION, "counts", jnp.einsum("ble,bl->e", weights, mask))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    _, state = model.apply({"params": params}, encoder_tokens, decoder_tokens, mutable=[_COLLECTION])
  flat = flax.traverse_util.flatten_dict(state[_COLLECTION])
  return {"/".join(key[:-1]): value[0] for key, value in flat.items()}


def routing_shares(model: Transformer, params: Any, tasks: Sequence[str], split: str,
                   feature_lengths: Mapping[str, int], max_examples: int | None = None,
                   batch_size: int = 32) -> dict[str, np.ndarray]:
  """{module path: [len(tasks), E] share of each task's tokens routed to each expert} on the tasks' `split`,
  teacher-forced on the targets. Rows sum to k for top-k routers. A mixture counts as one task (its tasks'
  examples in equal shares)."""
  from moe_jax.data.pipeline import mixture_examples  # pylint: disable=g-import-not-at-top

  shares: dict[str, list[np.ndarray]] = {}
  for task in tasks:
    examples = mixture_examples(task, split, feature_lengths, max_examples)
    inputs = pad_tokens([e["inputs"] for e in examples], feature_lengths["inputs"])
    targets = pad_tokens([e["targets"] for e in examples], feature_lengths["targets"])
    decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    tokens = {"encoder": float(np.sum(inputs > 0)), "decoder": float(np.sum(targets > 0))}
    index = np.arange(-(-len(examples) // batch_rows(batch_size)) * batch_rows(batch_size))
    valid = index < len(examples)  # whole batches: padding rows (copies of row 0) are marked, so they count nothing
    index = np.where(valid, index, 0)
    totals: dict[str, np.ndarray] = {}
    for _, _, batch in fixed_batches(len(index), batch_size, inputs[index], decoder_inputs[index], targets[index],
                                     valid):
      for path, value in part.to_host(_batch_counts(model, params, *batch)).items():
        totals[path] = totals.get(path, 0.0) + np.asarray(value, np.float64)
    for path, value in totals.items():
      side = "encoder" if reads_encoder_positions(path) else "decoder"
      shares.setdefault(path, []).append(value / tokens[side])
  return {path: np.stack(rows) for path, rows in shares.items()}
