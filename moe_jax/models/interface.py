"""One model interface between the backbones and everything that trains, scores or routes them, as T5X separates
`EncoderDecoderModel` from `DecoderOnlyModel`: the model gin file picks the family (a `T5Config` or a
`CausalLMConfig`) and training stages, evaluation and the methods call these functions, never the family's own.

Both flax modules take `(tokens, second tokens, routing_ids=...)` at init (T5: encoder and decoder tokens; a causal
LM: tokens and attention mask), so initialisation, abstract shapes and expert layouts are shared code. What differs:

- the training batch (`moe_jax.data.pipeline.feature_converter`): an encoder-decoder reads seqio's EncDec
  features; a decoder-only model reads PrefixLM features (the input and the target in one sequence, loss on the
  target only), unpacked;
- the loss and per-choice scores: a choice's log-likelihood given its input, from the decoder (T5) or from the
  continuation of "input" in one causal sequence;
- the prompt's own positions, for Average Activation and retrieval embeddings: T5's encoder; a causal LM's input
  tokens.

A `TaskMoEConfig` in place of the `ExpertConfig` builds the task-level MoE (`moe_jax.models.taskmoe.TaskMoE`): a T5
whose layers are routed per task. Its calls read the example's task id (`task_ids` in a training batch, the
routing ids in scoring), the optimizer step (its routing temperature schedules), and, for routings that sample at
evaluation (random_instance; Gumbel with `gumbel_at_eval`), a `routing` key derived from each example's input
tokens: the same example gets the same route in every batch, order and padding, so scores are reproducible.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.t5 import Transformer
from moe_jax.models.taskmoe import ROUTING_RNG, TaskMoE, TaskMoEConfig

START_ID = 0  # the decoder start / shift-right token of both families' training format (seqio's)
EVAL_ROUTING_SEED = 0  # the root of the per-example routing keys of sampling routings at evaluation


def build_model(config: Any, experts: ExpertConfig | TaskMoEConfig | None = None) -> nn.Module:
  """The flax module of a model config: `Transformer` for a T5Config (a `TaskMoE` when `experts` is a
  `TaskMoEConfig`), `CausalLM` for a CausalLMConfig."""
  if isinstance(experts, TaskMoEConfig):
    if not isinstance(config, T5Config):
      raise ConfigError(f"a TaskMoEConfig routes the layers of a T5; model_config is a {type(config).__name__}")
    return TaskMoE(config, experts)
  if isinstance(config, T5Config):
    return Transformer(config, experts)
  from moe_jax.models.causal import CausalLM, CausalLMConfig  # pylint: disable=g-import-not-at-top
  if isinstance(config, CausalLMConfig):
    return CausalLM(config, experts)
  raise ConfigError(f"model_config is a {type(config).__name__}; expected a T5Config or a CausalLMConfig")


def is_decoder_only(model_or_config: Any) -> bool:
  """Whether a model (or its config) is a decoder-only causal LM."""
  from moe_jax.models.causal import CausalLMConfig  # pylint: disable=g-import-not-at-top
  return isinstance(getattr(model_or_config, "config", model_or_config), CausalLMConfig)


def is_taskmoe(model: Any) -> bool:
  """Whether a model is the task-level MoE (routes per task, reads `task_ids` and the step)."""
  return isinstance(model, TaskMoE)


def samples_routes_at_eval(model: nn.Module) -> bool:
  """Whether a TaskMoE draws random routes at evaluation too, so an evaluation call needs a `routing` key."""
  moe = model.moe
  return moe.routing == "random_instance" or (moe.routing == "gumbel" and moe.gumbel_at_eval)


def example_keys(inputs: jax.Array, seed: int = EVAL_ROUTING_SEED) -> jax.Array:
  """One PRNG key per example [B] from its input tokens [B, L] (a polynomial hash of its tokens): a function of the
  example alone (trailing padding included: 0 adds nothing), not of its batch, its row or its batchmates."""
  powers = jnp.cumprod(jnp.full((inputs.shape[1],), 31, jnp.uint32))  # 31^(i+1) mod 2^32 (uint32 wraps)
  digest = jnp.sum(inputs.astype(jnp.uint32) * powers, axis=1)
  return jax.vmap(lambda d: jax.random.fold_in(jax.random.PRNGKey(seed), d))(digest)


def eval_routes(model: nn.Module, params: Any, inputs: jax.Array, task_ids: jax.Array | None) -> jax.Array:
  """Routes [B, layers, m] of a TaskMoE that samples at evaluation, each example's drawn with its own
  `example_keys` key: one draw per example shared by its encoder, its decoder and all its answer choices."""
  def one(key: jax.Array, task_id: jax.Array | None) -> jax.Array:
    ids = None if task_id is None else task_id[None]
    return model.apply({"params": params}, ids, 1, True, None, method="routes", rngs={ROUTING_RNG: key})[0]

  keys = example_keys(inputs)
  if task_ids is None:
    return jax.vmap(lambda k: one(k, None))(keys)
  return jax.vmap(one)(keys, jnp.asarray(task_ids, jnp.int32))


def _taskmoe_routing(model: nn.Module, params: Any, inputs: jax.Array, task_ids: jax.Array | None,
                     deterministic: bool) -> dict[str, Any]:
  """How an evaluation call routes a TaskMoE: by the task ids, or by explicit routes when the routing samples
  (so that encoder and decoder, and every answer choice, share one draw)."""
  if deterministic and samples_routes_at_eval(model):
    return {"routes": eval_routes(model, params, inputs, task_ids)}
  return {"task_ids": task_ids}


def logits_and_targets(model: nn.Module, params: Any, batch: dict[str, Any], deterministic: bool = True,
                       rng: jax.Array | None = None,
                       step: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits [B, L, V], target tokens [B, L], loss weights [B, L]) of a training batch of the model's family.

  A TaskMoE reads the batch's `task_ids` (else `routing_ids`) and `step` (the optimizer step: its temperature
  schedules); in training its random routes come from the dropout `rng`."""
  rngs = None if rng is None else {"dropout": rng}
  routing_ids = batch.get("routing_ids")
  if is_taskmoe(model):
    task_ids = batch.get("task_ids", routing_ids)
    routing = ({"task_ids": task_ids} if rng is not None else
               _taskmoe_routing(model, params, batch["encoder_input_tokens"], task_ids, deterministic))
    packing = {name: batch.get(name) for name in ("encoder_segment_ids", "decoder_segment_ids",
                                                  "encoder_positions", "decoder_positions")}
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         deterministic=deterministic, step=step, rngs=rngs, **routing, **packing)
    return logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  if is_decoder_only(model):
    mask = (batch["decoder_target_tokens"] != 0).astype(jnp.int32)  # the start token is real, padding is not
    logits = model.apply({"params": params}, batch["decoder_input_tokens"], mask, routing_ids=routing_ids,
                         deterministic=deterministic, rngs=rngs)
  else:
    # Packed batches (seqio pack=True) carry segment ids and positions; without them examples would attend across.
    packing = {name: batch.get(name) for name in ("encoder_segment_ids", "decoder_segment_ids",
                                                  "encoder_positions", "decoder_positions")}
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         deterministic=deterministic, routing_ids=routing_ids, rngs=rngs, **packing)
  return logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]


def _token_logp(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, without materialising a second [.., V] array."""
  logits = logits.astype(jnp.float32)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def choice_scores(model: nn.Module, params: Any, inputs: jax.Array, targets: jax.Array,
                  routing_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """inputs [B, Li] (0-padded on the right), targets [B, C, Lt] (0-padded) -> summed log p(target | input) [B, C]
  and target token counts [B, C]; jittable. A causal LM scores the choice as the continuation of the input in the
  training format: start token, input tokens, choice tokens, one sequence."""
  b, c, lt = targets.shape
  flat = targets.reshape(b * c, lt)
  repeat = lambda x: None if x is None else jnp.repeat(x, c, axis=0)
  mask = flat != 0
  if is_decoder_only(model):
    li = inputs.shape[1]
    prompt = repeat(inputs)
    n_in = jnp.sum(prompt != 0, axis=1)  # inputs are right-padded: the choice starts right after them
    length = 1 + li + lt
    positions = jnp.arange(length)[None, :]
    offset = (positions - 1 - n_in[:, None])  # index into the choice at each position
    in_choice = (offset >= 0) & (offset < lt)
    sequence = jnp.where(positions == 0, START_ID,
                         jnp.where(positions - 1 < n_in[:, None],
                                   jnp.take_along_axis(prompt, jnp.clip(positions - 1, 0, li - 1), axis=1),
                                   jnp.where(in_choice, jnp.take_along_axis(flat, jnp.clip(offset, 0, lt - 1),
                                                                            axis=1), 0)))
    real = (positions <= n_in[:, None]) | (in_choice & jnp.take_along_axis(mask, jnp.clip(offset, 0, lt - 1), axis=1))
    logits = model.apply({"params": params}, sequence[:, :-1], real[:, :-1].astype(jnp.int32),
                         routing_ids=repeat(routing_ids))
    logp = _token_logp(logits, sequence[:, 1:])
    scored = (in_choice & real)[:, 1:]
    scores = jnp.sum(jnp.where(scored, logp, 0.0), axis=-1)
  elif is_taskmoe(model):
    variables = {"params": params}
    routing = _taskmoe_routing(model, params, inputs, routing_ids, True)
    encoded = model.apply(variables, inputs, True, method="encode", **routing)
    decoder_inputs = jnp.pad(flat[:, :-1], ((0, 0), (1, 0)), constant_values=START_ID)  # shift right
    logits = model.apply(variables, repeat(encoded), repeat(inputs), decoder_inputs, True, method="decode",
                         **{k: repeat(v) for k, v in routing.items()})
    scores = jnp.sum(jnp.where(mask, _token_logp(logits, flat), 0.0), axis=-1)
  else:
    variables = {"params": params}
    encoded = model.apply(variables, inputs, True, routing_ids, method="encode")
    decoder_inputs = jnp.pad(flat[:, :-1], ((0, 0), (1, 0)), constant_values=START_ID)  # shift right
    logits = model.apply(variables, repeat(encoded), repeat(inputs), decoder_inputs, True, repeat(routing_ids),
                         method="decode")
    scores = jnp.sum(jnp.where(mask, _token_logp(logits, flat), 0.0), axis=-1)
  return scores.reshape(b, c), mask.sum(axis=-1).reshape(b, c).astype(jnp.int32)


def generation_start(model: nn.Module, params: Any, inputs: jax.Array, max_new_tokens: int,
                     routing_ids: jax.Array | None) -> tuple[Any, Any, jax.Array, jax.Array]:
  """(step function, empty cache, prompt [B, P], prompt mask [B, P]) for `moe_jax.models.decoding.generate` to
  continue `inputs` [B, Li] (right-padded) by up to `max_new_tokens` tokens; jittable. T5: the encoder runs here
  and the prompt is the decoder start token. A causal LM: the prompt is the training format's "start, input",
  moved to the right end of its row (generation continues every row from its last real token)."""
  if is_taskmoe(model):
    return (*taskmoe_step_fn(model, params, inputs, max(max_new_tokens, 1), routing_ids),
            jnp.full((inputs.shape[0], 1), START_ID, jnp.int32), jnp.ones((inputs.shape[0], 1), jnp.int32))
  if not is_decoder_only(model):
    from moe_jax.models.t5 import t5_step_fn  # pylint: disable=g-import-not-at-top
    step_fn, cache = t5_step_fn(model, params, inputs, max(max_new_tokens, 1), routing_ids)
    start = jnp.full((inputs.shape[0], 1), START_ID, jnp.int32)
    return step_fn, cache, start, jnp.ones_like(start)
  from moe_jax.models.causal import causal_step_fn, init_cache  # pylint: disable=g-import-not-at-top
  b, li = inputs.shape
  length = li + 1
  sequence = jnp.pad(inputs, ((0, 0), (1, 0)), constant_values=START_ID)
  real = 1 + jnp.sum(inputs != 0, axis=1)  # the start token and the input's tokens
  source = jnp.arange(length)[None, :] - (length - real[:, None])  # where each left-padded slot reads from
  mask = source >= 0
  prompt = jnp.where(mask, jnp.take_along_axis(sequence, jnp.clip(source, 0, li), axis=1), 0)
  return (causal_step_fn(model, params, routing_ids), init_cache(model, b, length + max_new_tokens), prompt,
          mask.astype(jnp.int32))


def taskmoe_step_fn(model: nn.Module, params: Any, inputs: jax.Array, max_decode_length: int,
                    task_ids: jax.Array | None) -> tuple[Any, dict[str, jax.Array]]:
  """(step function, cache) for `decoding.generate` on a TaskMoE, which has no key/value cache: the cache holds the
  encoder output, the routes and a [B, max_decode_length] buffer of the decoder tokens so far, and each step
  re-runs the (causal) decoder over the whole buffer, O(length) times the cached cost: fine for the short answers
  of rank-classification-free tasks at evaluation, not for long generation."""
  variables = {"params": params}
  routing = _taskmoe_routing(model, params, inputs, task_ids, True)
  if "routes" not in routing:  # one route lookup for every step (deterministic routings: argmax / softmax at tau 1)
    routing = {"routes": model.apply(variables, routing["task_ids"], inputs.shape[0], True, None, method="routes")}
  encoded = model.apply(variables, inputs, True, method="encode", **routing)
  cache = {"encoded": encoded, "inputs": inputs, "routes": routing["routes"], "position": jnp.zeros((), jnp.int32),
           "tokens": jnp.zeros((inputs.shape[0], max_decode_length), jnp.int32)}

  def step(cache: dict[str, jax.Array], tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    del mask  # the prompt is the start token: every row's tokens are real
    length = tokens.shape[1]
    buffer = jax.lax.dynamic_update_slice(cache["tokens"], tokens.astype(jnp.int32), (0, cache["position"]))
    logits = model.apply(variables, cache["encoded"], cache["inputs"], buffer, True, routes=cache["routes"],
                         method="decode")
    out = jax.lax.dynamic_slice_in_dim(logits, cache["position"], length, axis=1)
    return out, {**cache, "tokens": buffer, "position": cache["position"] + length}

  return step, cache
