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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.t5 import Transformer

START_ID = 0  # the decoder start / shift-right token of both families' training format (seqio's)


def build_model(config: Any, experts: ExpertConfig | None = None) -> nn.Module:
  """The flax module of a model config: `Transformer` for a T5Config, `CausalLM` for a CausalLMConfig."""
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


def logits_and_targets(model: nn.Module, params: Any, batch: dict[str, Any], deterministic: bool = True,
                       rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits [B, L, V], target tokens [B, L], loss weights [B, L]) of a training batch of the model's family."""
  rngs = None if rng is None else {"dropout": rng}
  routing_ids = batch.get("routing_ids")
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
