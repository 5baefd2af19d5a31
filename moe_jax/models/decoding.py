"""Autoregressive generation over a cached step function: greedy, or sampling with temperature, top-k and top-p.

Any model plugs in through a step function `step_fn(cache, tokens [B, l], mask [B, l]) -> (logits [B, l, V]
float32, cache)` that appends l tokens to its cache and returns their logits. `generate` calls it once on the whole
prompt (the prefill) and then once per new token, each call a fixed-shape update of a fixed-size cache, inside one
`lax.while_loop`: one compilation per shape, no per-step recompilation, O(length) work per step instead of
re-running the model over the whole prefix. For an encoder-decoder the prompt is the decoder start token and the
encoder side lives in the cache (`moe_jax.models.t5.t5_step_fn`).

To compile once per shape across calls, pass a step function that is a pytree with its arrays as leaves (e.g.
`t5.T5Step`, or a `jax.tree_util.Partial` of a module-level function): `generate` traces those leaves as
arguments. A plain closure is a static argument instead: each new closure object compiles again, with whatever
arrays it captured baked into the program as constants.

Under `moe_jax.training.partitioning.activate(mesh, rules)` the token, mask, logits and EOS-state arrays carry
logical constraints (`batch`, `length`, `vocab`), so rows stay split over the mesh's batch axes through the loop;
the step function constrains its own cache (the T5 decoder does: `batch`, `length`, `heads`, `kv`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any
StepFn = Callable[[Cache, Array, Array], tuple[Array, Cache]]

PAD_ID = 0


def sample_logits(logits: Array, rng: Array | None, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """One token per row [B] int32 from logits [B, V].

  temperature 0: argmax (rng unused). Otherwise a draw from softmax(logits / temperature) restricted to the
  `top_k` most likely tokens (0: no limit) and then to the nucleus: the fewest most likely tokens whose
  (renormalised) probability reaches `top_p`, i.e. token j of the sorted list is kept when the tokens before it
  hold less than `top_p`; the most likely token is always kept.
  """
  _check_sampling(rng, temperature, top_k, top_p)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k == 0 and top_p >= 1.0:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  # Sorted candidates, most likely first: exactly k of them (ties cannot add a (k+1)-th), all V for top-p alone.
  k = min(top_k, logits.shape[-1]) if top_k > 0 else logits.shape[-1]
  values, indices = jax.lax.top_k(logits, k)
  if top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    # Mass strictly before each candidate, as an exclusive cumulative sum (not cumsum - p, which rounds).
    before = jnp.concatenate([jnp.zeros_like(probs[..., :1]), jnp.cumsum(probs, axis=-1)[..., :-1]], axis=-1)
    values = jnp.where(before < top_p, values, -jnp.inf)
  choice = jax.random.categorical(rng, values, axis=-1)
  return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def _check_sampling(rng: Array | None, temperature: float, top_k: int, top_p: float) -> None:
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"sampling: temperature={temperature} (>= 0), top_k={top_k} (>= 0), top_p={top_p} "
                     "(in (0, 1])")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")


def generate(step_fn: StepFn, cache: Cache, prompt_tokens: Array, prompt_mask: Array, max_new_tokens: int,
             eos_id: int, rng: Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0) -> Array:
  """Generate `max_new_tokens` tokens [B, max_new_tokens] int32 after `prompt_tokens` [B, P].

  `prompt_mask` [B, P] (0/1) marks the real prompt tokens; pad prompts on the left, so that every row's next
  position is P (a model with relative positions then sees no gap; one with absolute positions should derive them
  from the mask). The first new token comes from the logits at each row's last real prompt token. The cache must
  hold P + max_new_tokens - 1 tokens: the last new token is never fed back.

  Greedy when temperature == 0, else sampled (`sample_logits`) with `rng`, step i using fold_in(rng, i): the same
  seed gives the same tokens. A row that has emitted `eos_id` emits `PAD_ID` (0) from then on, and the loop stops
  as soon as every row has emitted it. max_new_tokens, eos_id, temperature, top_k and top_p are Python numbers,
  static under jit: each distinct setting compiles once.
  """
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
  _check_sampling(rng, temperature, top_k, top_p)
  static = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=float(temperature), top_k=top_k,
                top_p=float(top_p))
  if _is_pytree(step_fn):
    return _generate_jit(step_fn, cache, prompt_tokens, prompt_mask, rng, **static)
  return _generate_static_jit(step_fn, cache, prompt_tokens, prompt_mask, rng, **static)


def _is_pytree(step_fn: StepFn) -> bool:
  """Whether `step_fn` is a registered pytree (its leaves can be traced), not a plain function (a leaf itself)."""
  leaves = jax.tree.leaves(step_fn)
  return not (len(leaves) == 1 and leaves[0] is step_fn)


def _generate(step_fn: StepFn, cache: Cache, prompt_tokens: Array, prompt_mask: Array, rng: Array | None, *,
              max_new_tokens: int, eos_id: int, temperature: float, top_k: int, top_p: float) -> Array:
  batch, prompt_length = prompt_tokens.shape
  constrain = nn.with_logical_constraint
  tokens = constrain(jnp.zeros((batch, max_new_tokens), jnp.int32), ("batch", "length"))
  if max_new_tokens == 0:
    return tokens
  prompt_mask = constrain(jnp.asarray(prompt_mask, jnp.int32), ("batch", "length"))
  prompt_tokens = constrain(jnp.asarray(prompt_tokens, jnp.int32), ("batch", "length"))
  logits, cache = step_fn(cache, prompt_tokens, prompt_mask)
  # Each row's last real prompt token (P - 1 for left-padded prompts and for a row with no real token).
  last = prompt_length - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=-1)
  last = jnp.where(jnp.any(prompt_mask > 0, axis=-1), last, prompt_length - 1)
  next_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def pick(step: Array, logits: Array, done: Array) -> Array:
    key = None if rng is None else jax.random.fold_in(rng, step)
    token = sample_logits(constrain(logits, ("batch", "vocab")), key, temperature, top_k, top_p)
    return constrain(jnp.where(done, PAD_ID, token), ("batch",))

  first = pick(jnp.int32(0), next_logits, jnp.zeros((batch,), bool))
  tokens = tokens.at[:, 0].set(first)
  done = first == eos_id
  ones = constrain(jnp.ones((batch, 1), jnp.int32), ("batch", "length"))

  def body(state):
    step, tokens, done, cache = state
    previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
    logits, cache = step_fn(cache, previous, ones)
    token = pick(step, logits[:, -1], done)
    tokens = constrain(jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1),
                       ("batch", "length"))
    return step + 1, tokens, done | (token == eos_id), cache

  cond = lambda state: (state[0] < max_new_tokens) & ~jnp.all(state[2])
  return jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, cache))[1]


_STATIC = ("max_new_tokens", "eos_id", "temperature", "top_k", "top_p")
_generate_jit = jax.jit(_generate, static_argnames=_STATIC)
_generate_static_jit = jax.jit(_generate, static_argnums=0, static_argnames=_STATIC)
