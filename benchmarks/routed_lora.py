"""Cost of routed LoRA experts over the frozen backbone, per routed formulation (`moe_jax.models.routed`).

Times (1) one T5 encoder layer and (2) a whole encoder-decoder forward (encode + decode, teacher-forced), without
experts (the base) and with E PHATGOOSE-routed experts on every PHATGOOSE module, for each E, k and formulation.
Prints ms per call (median over repeats, after warm-up calls, the first of which compiles) and the ratio to the base
timed in the same run. Parameters are fresh random values (router vectors and lora_b included: zeros at init),
so routing spreads tokens over experts and the expert products are not trivially zero.

  python benchmarks/routed_lora.py --preset cpu            # small shapes, a minute or two on a 2-core CPU
  python benchmarks/routed_lora.py --preset t5xl --check   # T5-XL shapes in bf16 (accelerator)

Needs only jax, flax and numpy (no TensorFlow).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common
from moe_jax.models.attention import RelativePositionBias, resolve_impl
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.experts import split
from moe_jax.models.routed import DENSE_MAX_EXPERTS, IMPLS
from moe_jax.models.routers import Phatgoose
from moe_jax.models.t5 import EncoderLayer, Transformer


PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for a 2-core CPU (1+1 layers, one 256-token example); float32, as bf16 matmuls are slow on CPUs.
    "cpu": dict(d_model=256, num_heads=4, d_kv=64, d_ff=640, layers=1, vocab_size=8192, batch=1, length=256,
                dtype="float32", rank=16, experts=[8, 36, 166], k=[1, 2], repeats=10),
    "t5xl": dict(d_model=2048, num_heads=32, d_kv=64, d_ff=5120, layers=24, vocab_size=32128, batch=32, length=512,
                 dtype="bfloat16", rank=16, experts=[8, 36, 166], k=[1, 2], repeats=10),
}


class OneEncoderLayer(nn.Module):
  """An encoder layer named as in the model (`layers_0/attention/query`, ...), so module regexes see real paths."""

  config: T5Config
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x, bias, mask):
    return EncoderLayer(self.config, self.experts, name="layers_0")(x, bias, mask, True)


@dataclasses.dataclass(frozen=True)
class Bench:
  """One benchmarked call: `make(experts).apply(params, *inputs)`."""

  name: str
  make: Callable[[ExpertConfig | None], nn.Module]
  inputs: tuple[Any, ...]

  def jitted(self, experts: ExpertConfig | None) -> Callable[..., Any]:
    return jax.jit(self.make(experts).apply)


def int_list(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument("--experts", type=int_list, help="comma-separated numbers of experts E (preset default)")
  p.add_argument("--k", type=int_list, help="comma-separated top-k values (preset default)")
  p.add_argument("--impls", type=lambda s: s.split(","), default=["dense", "sorted", "ragged", "auto"],
                 help=f"comma-separated routed formulations, from {IMPLS}")
  p.add_argument("--benches", type=lambda s: s.split(","), default=["layer", "model"], help="layer, model or both")
  p.add_argument("--repeats", type=int, help="timed calls per configuration (preset default)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (the first one compiles)")
  p.add_argument("--dtype", help="compute and parameter dtype (preset default)")
  p.add_argument("--rank", type=int, help="LoRA rank r (preset default)")
  p.add_argument("--batch", type=int, help="examples per call (preset default)")
  p.add_argument("--length", type=int, help="encoder and decoder tokens per example (preset default)")
  p.add_argument("--layers", type=int, help="encoder and decoder layers of the whole model (preset default)")
  p.add_argument("--attention", default="auto", help="T5Config.attention_impl: auto, xla, cudnn or tpu_flash")
  p.add_argument("--check", action="store_true", help="first compare each formulation's output with dense's "
                 "(rel err ~1e-7 in float32; ~5e-3 in bf16, where each linear's output is rounded to bf16)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  common.apply_preset(args, PRESETS[args.preset])
  if bad := set(args.impls) - set(IMPLS):
    p.error(f"unknown --impls {sorted(bad)}; expected some of {IMPLS}")
  if bad := set(args.benches) - {"layer", "model"}:
    p.error(f"unknown --benches {sorted(bad)}; expected layer and/or model")
  return args


def random_params(bench: Bench, experts: ExpertConfig, cfg: T5Config, seed: int):
  return common.random_params(jax.eval_shape(bench.make(experts).init, jax.random.key(0), *bench.inputs), cfg.d_kv,
                              seed)


def make_benches(cfg: T5Config, batch: int, length: int, seed: int) -> list[Bench]:
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, length, cfg.d_model)), cfg.compute_dtype)
  mask = jnp.ones((batch, length), bool)
  relpos = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=True, dtype=cfg.compute_dtype)
  table = jnp.asarray(rng.standard_normal((cfg.num_heads, cfg.relative_attention_num_buckets)), jnp.float32)
  bias = relpos.apply({"params": {"rel_embedding": table}}, length, length)
  tokens = lambda: jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, length)), jnp.int32)
  return [Bench("layer", lambda ex: OneEncoderLayer(cfg, ex), (x, bias, mask)),
          Bench("model", lambda ex: Transformer(cfg, ex), (tokens(), tokens()))]


def time_call(fn: Callable[..., Any], args: tuple[Any, ...], warmup: int, repeats: int) -> float:
  """Median wall-clock ms per call, after `warmup` calls (the first compiles)."""
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def print_row(cells: list[str]):
  print(" ".join(f"{c:>{w}}" for c, w in zip(cells, (6, 5, 3, 7, 11, 9))), flush=True)


def main():
  args = parse_args()
  cfg = T5Config(d_model=args.d_model, num_heads=args.num_heads, d_kv=args.d_kv, d_ff=args.d_ff,
                 num_encoder_layers=args.layers, num_decoder_layers=args.layers, vocab_size=args.vocab_size,
                 dtype=args.dtype, param_dtype=args.dtype, attention_impl=args.attention, name=args.preset)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
        f"(x{jax.device_count()}, benchmarking on one)")
  attention = resolve_impl(cfg.attention_impl, cfg.compute_dtype, cfg.d_kv, dropout=False)
  print(f"attention impl: {cfg.attention_impl} -> {attention}")
  print(f"preset {args.preset}: d_model {cfg.d_model}, {cfg.num_heads} heads x d_kv {cfg.d_kv}, d_ff {cfg.d_ff} "
        f"{cfg.feed_forward}, {args.layers}+{args.layers} layers, vocab {cfg.vocab_size}, {args.batch} x "
        f"{args.length} tokens (encoder and decoder), {cfg.dtype}, r={args.rank}, router Phatgoose(k), "
        f"auto = dense for E <= {DENSE_MAX_EXPERTS} else sorted; median of {args.repeats} calls")

  benches = [b for b in make_benches(cfg, args.batch, args.length, args.seed) if b.name in args.benches]
  print()
  print_row(["bench", "E", "k", "impl", "ms/call", "x base"])
  for bench in benches:
    base_ms = None
    for num_experts in args.experts:
      params = random_params(bench, ExpertConfig(num_experts=num_experts, rank=args.rank), cfg,
                             args.seed + num_experts)
      inputs = bench.inputs
      if base_ms is None:  # the base shares the backbone parameters of the first E
        base_ms = time_call(bench.jitted(None), (split(params)[0],) + inputs, args.warmup, args.repeats)
        print_row([bench.name, "-", "-", "base", f"{base_ms:.2f}", "1.00"])
      for k in args.k:
        if k > num_experts:
          continue
        fns = {impl: bench.jitted(ExpertConfig(num_experts=num_experts, rank=args.rank, router=Phatgoose(k),
                                               impl=impl))
               for impl in dict.fromkeys(args.impls + (["dense"] if args.check else []))}
        if args.check:
          dense = fns["dense"](params, *inputs)
          for impl in args.impls:
            err = rel_err(fns[impl](params, *inputs), dense)
            print(f"  check {bench.name} E={num_experts} k={k} {impl}: rel err vs dense {err:.2e}", flush=True)
        for impl in args.impls:
          ms = time_call(fns[impl], (params,) + inputs, args.warmup, args.repeats)
          print_row([bench.name, str(num_experts), str(k), impl, f"{ms:.2f}", f"{ms / base_ms:.2f}"])
      del params


if __name__ == "__main__":
  main()
