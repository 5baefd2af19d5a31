"""Average Activation router vectors: each expert module's router vector is the mean input that module sees on the
expert's own training data, with that expert active (a PHATGOOSE baseline that needs no gate training).

Which positions are averaged: a module that reads encoder positions (every encoder module, and the key/value of
decoder cross-attention, whose input is the encoder output) averages over real encoder tokens
(`encoder_input_tokens > 0`); every other decoder module (self-attention, cross-attention query/out, MLP) averages
over real target positions (`decoder_loss_weights > 0`, i.e. the positions the expert was trained to predict).
Inputs are captured with a flax method interceptor, so the model code needs no hook; per-batch sums are reduced
on device (jitted, on the parameters where they lie; under `partitioning.activate` the batches go onto the mesh
too) and accumulated across batches in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig
from moe_jax.models.lora import Linear, has_experts, module_path
from moe_jax.models.routers import Phatgoose, Uniform
from moe_jax.evaluation.scoring import batch_rows
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models import interface
from moe_jax.models.interface import build_model
from moe_jax.training import partitioning as part

Params = dict[str, Any]
_COLLECTION = "activation_sums"
_ENCODER_POSITIONS = re.compile(r"encoder/.*|.*/encoder_decoder_attention/(key|value)")


def reads_encoder_positions(path: str) -> bool:
  """Whether the module at `path` (e.g. `decoder/layers_0/encoder_decoder_attention/key`) sees encoder positions."""
  return _ENCODER_POSITIONS.fullmatch(path) is not None


@functools.lru_cache(maxsize=8)
def _batch_sums_fn(config: Any, layout: ExpertConfig):
  """Jitted (params, batch arrays) -> {module path: (masked sum of its inputs [d_in] float32, count int32)}.

  A decoder-only model's modules all read one sequence (input and target): they average over its real tokens."""
  model = build_model(config, layout)
  decoder_only = interface.is_decoder_only(config)

  def batch_sums(params, encoder_tokens, decoder_tokens, decoder_weights, valid):
    if decoder_only:  # (decoder_input_tokens, decoder_target_tokens, decoder_loss_weights) of PrefixLM batches
      real = ((decoder_tokens > 0) & valid[:, None]).astype(jnp.float32)
      encoder_mask = decoder_mask = real
    else:
      encoder_mask = ((encoder_tokens > 0) & valid[:, None]).astype(jnp.float32)
      decoder_mask = ((decoder_weights > 0) & valid[:, None]).astype(jnp.float32)

    def capture(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, Linear) and has_experts(module.experts,
                                                                                          module_path(module)):
        mask = encoder_mask if reads_encoder_positions(module_path(module)) else decoder_mask
        total = jnp.einsum("bld,bl->d", args[0].astype(jnp.float32), mask, precision=jax.lax.Precision.HIGHEST)
        module.sow(_COLLECTION, "stats", (total, jnp.sum(mask).astype(jnp.int32)))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
      if decoder_only:
        _, state = model.apply({"params": params}, encoder_tokens, decoder_mask.astype(jnp.int32),
                               mutable=[_COLLECTION])
      else:
        _, state = model.apply({"params": params}, encoder_tokens, decoder_tokens, mutable=[_COLLECTION])
    flat = flax.traverse_util.flatten_dict(state[_COLLECTION])
    return {"/".join(key[:-1]): value[0] for key, value in flat.items()}  # each module is called once

  return jax.jit(batch_sums)


def average_activations(config: Any, backbone: Params, expert_tree: Params,
                        batches: Iterable[Mapping[str, np.ndarray]], max_examples: int = 1000) -> Params:
  """Router tree {module path: {"router": [1, d_in] float32}} of one expert (E=1), from at most `max_examples`
  examples of `batches` (feature-converter dicts: encoder_input_tokens, decoder_input_tokens, decoder_loss_weights;
  a decoder-only model's: decoder_input_tokens, decoder_target_tokens, decoder_loss_weights).

  Merge it over the expert tree (`moe_jax.models.experts.merge`) to replace the expert's router vectors.
  """
  modules, num_experts, rank = ex.layout(expert_tree)
  if num_experts != 1:
    raise ValueError(f"average_activations takes one expert, got {num_experts}; see average_activation_routers")
  layout = ExpertConfig(num_experts=1, rank=rank, modules="|".join(map(re.escape, modules)), router=Uniform())
  step = _batch_sums_fn(dataclasses.replace(config, remat=False), layout)  # remat changes only the backward pass
  params = ex.merge(ex.split(backbone)[0], expert_tree)
  keys = (("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights") if interface.is_decoder_only(config)
          else ("encoder_input_tokens", "decoder_input_tokens", "decoder_loss_weights"))
  sums: dict[str, np.ndarray] = {}
  counts: dict[str, int] = {}
  seen = 0
  for batch in batches:
    if seen >= max_examples:
      break
    arrays = [np.asarray(batch[key]) for key in keys]
    size = arrays[0].shape[0]
    valid = np.arange(size) < max_examples - seen  # rows past the budget count for nothing (no reshape, no retrace)
    stats = part.to_host(step(params, *part.place_batch((*arrays, valid))))
    for path in modules:
      sums[path] = sums.get(path, 0.0) + np.asarray(stats[path][0], np.float64)
      counts[path] = counts.get(path, 0) + int(stats[path][1])
    seen += min(size, max_examples - seen)
  empty = [path for path in modules if counts.get(path, 0) == 0]
  if empty:
    raise ValueError(f"average_activations: no real tokens reached {empty[0]} ({seen} examples given)")
  return flax.traverse_util.unflatten_dict(
      {tuple(path.split("/")) + ("router",): (sums[path] / counts[path])[None].astype(np.float32) for path in modules})


def average_activation_routers(config: Any, backbone: Params, moe_tree: Params,
                               batches_per_expert: Sequence[Iterable[Mapping[str, np.ndarray]]],
                               max_examples: int = 1000) -> Params:
  """Router tree {module path: {"router": [N, d_in]}} of an N-expert tree: expert i's vectors from
  `batches_per_expert[i]` (its own task's data) with expert i alone active. `ex.merge(moe_tree, result)` replaces
  the MoE tree's router leaves."""
  _, num_experts, _ = ex.layout(moe_tree)
  if len(batches_per_expert) != num_experts:
    raise ValueError(f"average_activation_routers: {len(batches_per_expert)} data sources for {num_experts} experts")
  flat = flax.traverse_util.flatten_dict(moe_tree)
  per_expert = []
  for i, batches in enumerate(batches_per_expert):
    one = flax.traverse_util.unflatten_dict({key: value[i:i + 1] for key, value in flat.items()})  # stays put
    per_expert.append(flax.traverse_util.flatten_dict(average_activations(config, backbone, one, batches,
                                                                          max_examples)))
  return flax.traverse_util.unflatten_dict(
      {key: np.concatenate([routers[key] for routers in per_expert]) for key in per_expert[0]})


@register("average_activation", auxiliary=("average_activation",))
def build_average_activation(experts: Experts) -> Method:
  """Every expert behind PHATGOOSE's router with Average Activation vectors instead of trained gates, each
  expert's computed on unpacked examples of its own task (a packed row would mix tasks' positions in one mean)
  and cached in the library."""
  from moe_jax.data.pipeline import train_batches  # pylint: disable=g-import-not-at-top  (TensorFlow)

  decoder_only = interface.is_decoder_only(experts.config)
  settings = {"max_examples": experts.activation_examples, "feature_lengths": dict(experts.lengths), "pack": False}

  def compute(i: int, task: str) -> Params:
    batches = train_batches(task, experts.lengths, batch_rows(32), seed=0, pack=False, decoder_only=decoder_only)
    return average_activations(experts.config, experts.backbone, experts.one_expert(i), batches,
                               experts.activation_examples)

  routers = experts.per_expert_routers("average_activation", settings, compute)
  return experts.routed(Phatgoose(k=experts.top_k), routers)
