"""Greedy decoding throughput with the KV cache against recomputing the whole prefix every step.

For each model config, one jitted call generates `--new-tokens` tokens for a batch (encoder included in both):
  cached    `t5_step_fn` + `decoding.generate`: one decoder token per step against the self-attention cache, the
            cross-attention keys/values of the encoder output computed once;
  uncached  the loop `greedy_generate` ran before the cache: every step re-runs the decoder over the whole
            fixed-length token buffer (causal masking hides the unwritten positions), O(L^2) decoder work.
EOS is disabled (eos_id -1), so every row runs to the last token and both loops do the same number of steps. Prints
new tokens/s (batch x new tokens / median wall time, after a compiling warm-up call) and the ratio, checks that
both produce the same tokens, and times the cross-attention key/value projection of all decoder layers: what each
step would add if those were recomputed instead of cached.

  python benchmarks/decode.py                    # tiny and T5.1.1-small shapes in float32, a few minutes on 2 cores
  python benchmarks/decode.py --configs small --new-tokens 128 --experts 8

Needs only jax, flax and numpy (no TensorFlow).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import common
from moe_jax.models import decoding
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.routers import Phatgoose
from moe_jax.models.t5 import Transformer, t5_step_fn

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(config=T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                                 num_decoder_layers=1, dtype="float32", name="tiny"), batch=8, input_length=32),
    # T5.1.1 small (the T5Config defaults) in float32: bf16 matmuls are slow on CPUs.
    "small": dict(config=T5Config(dtype="float32", name="t5_1_1_small"), batch=4, input_length=64),
}
NO_EOS = -1


@functools.partial(jax.jit, static_argnums=(0, 3))
def cached_generate(model: Transformer, params: Any, inputs: jax.Array, new_tokens: int) -> jax.Array:
  step_fn, cache = t5_step_fn(model, params, inputs, new_tokens)
  start = jnp.zeros((inputs.shape[0], 1), jnp.int32)
  return decoding.generate(step_fn, cache, start, jnp.ones_like(start), new_tokens, NO_EOS)


@functools.partial(jax.jit, static_argnums=(0, 3))
def uncached_generate(model: Transformer, params: Any, inputs: jax.Array, new_tokens: int) -> jax.Array:
  """Greedy decoding as before the KV cache (the old `scoring._greedy`)."""
  variables = {"params": params}
  encoded = model.apply(variables, inputs, True, method="encode")

  def step(state):
    i, tokens, done = state
    decoder_inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits = model.apply(variables, encoded, inputs, decoder_inputs, True, method="decode")
    token = jnp.where(done, 0, jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))
    return i + 1, tokens.at[:, i].set(token), done | (token == NO_EOS)

  state = (jnp.int32(0), jnp.zeros((inputs.shape[0], new_tokens), jnp.int32), jnp.zeros((inputs.shape[0],), bool))
  return jax.lax.while_loop(lambda s: (s[0] < new_tokens) & ~jnp.all(s[2]), step, state)[1]


@functools.partial(jax.jit, static_argnums=0)
def cross_kv_projection(model: Transformer, params: Any, inputs: jax.Array) -> list[jax.Array]:
  """The encoder output's cross-attention keys and values in every decoder layer (the encoder run is outside the
  timed work: `encoded` is an input here)."""
  encoded = inputs
  out = []
  for i in range(model.config.num_decoder_layers):
    attention = params["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
    out += [encoded @ attention[name]["kernel"] for name in ("key", "value")]
  return out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", type=lambda s: s.split(","), default=["tiny", "small"], help=f"from {sorted(CONFIGS)}")
  p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
  p.add_argument("--experts", type=int, default=0, help="PHATGOOSE-routed LoRA experts on every module (0: none)")
  p.add_argument("--k", type=int, default=2, help="top-k of the router")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per loop (median), after one compiling call")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  if bad := set(args.configs) - set(CONFIGS):
    p.error(f"unknown --configs {sorted(bad)}; expected some of {sorted(CONFIGS)}")
  return args


def main():
  args = parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores; {args.new_tokens} new tokens per row, no EOS; median of {args.repeats} calls"
        + (f"; {args.experts} experts, Phatgoose(k={args.k})" if args.experts else ""))
  print(f"{'config':>7} {'batch':>5} {'in len':>6} {'cached tok/s':>12} {'uncached tok/s':>14} {'ratio':>6} "
        f"{'ms/step':>8} {'cross K/V ms':>12}")
  for name in args.configs:
    spec = CONFIGS[name]
    cfg, batch, length = spec["config"], spec["batch"], spec["input_length"]
    experts = (ExpertConfig(num_experts=args.experts, rank=16, router=Phatgoose(args.k)) if args.experts
               else None)
    model = Transformer(cfg, experts)
    tokens = jnp.ones((1, 4), jnp.int32)
    params = common.random_params(jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)["params"], cfg.d_kv,
                                  args.seed)
    inputs = jnp.asarray(np.random.default_rng(args.seed).integers(2, cfg.vocab_size, (batch, length)), jnp.int32)
    cached = cached_generate(model, params, inputs, args.new_tokens)
    uncached = uncached_generate(model, params, inputs, args.new_tokens)
    if not np.array_equal(np.asarray(cached), np.asarray(uncached)):
      differ = int(np.argmax((np.asarray(cached) != np.asarray(uncached)).any(axis=0)))
      print(f"  note: {name}: cached and uncached tokens first differ at step {differ} (a near-tie in float32)")
    t_cached = median_seconds(lambda: cached_generate(model, params, inputs, args.new_tokens), args.repeats)
    t_uncached = median_seconds(lambda: uncached_generate(model, params, inputs, args.new_tokens), args.repeats)
    encoded = jnp.asarray(np.random.default_rng(1).normal(size=(batch, length, cfg.d_model)), jnp.float32)
    t_cross = median_seconds(lambda: cross_kv_projection(model, params, encoded), max(args.repeats, 10))
    n = batch * args.new_tokens
    print(f"{name:>7} {batch:>5} {length:>6} {n / t_cached:>12.0f} {n / t_uncached:>14.0f} "
          f"{t_uncached / t_cached:>6.1f} {1e3 * t_cached / args.new_tokens:>8.2f} {1e3 * t_cross:>12.3f}",
          flush=True)


if __name__ == "__main__":
  main()
