"""Cost of routed LoRA experts over the frozen backbone, per routed formulation (`moe_jax.models.routed`).

Times (1) one T5 encoder layer and (2) a whole encoder-decoder forward (encode + decode, teacher-forced), without
experts (the base) and with E PHATGOOSE-routed experts on every PHATGOOSE module, for each E, k and formulation.
Prints ms per call (median over repeats, after warm-up calls, the first of which compiles), the ratio to the base
timed in the same run (their calls alternating), the analytic FLOP floor of that ratio (base + router scores + top-k
LoRA matmul FLOPs, over the base's: what a routed layer costs if the extra FLOPs ran as fast as the base's) and the
gap (ratio / floor).
Parameters are fresh random values (router vectors and lora_b included: zeros at init), so routing spreads tokens
over experts and the expert products are not trivially zero.

`--peer` also runs, after each layer case, the PHATGOOSE reference dispatch (a PyTorch layer with the reference
code's per-expert loop + index_add; `../shared/bench/phatgoose_reference_layer.py` by default) on the same shapes in
a subprocess, and ends with a markdown table of ours vs it. On a CPU another busy process shares, add
`--peer_threads 1`: there PyTorch's two spinning OpenMP threads run 30-100x slower (XLA's threads slow far less).

  python benchmarks/routed_lora.py --preset cpu            # small shapes, ~4 minutes on a 2-core CPU (most: ragged)
  python benchmarks/routed_lora.py --preset cpu_xl --peer  # T5-XL proportions at half width, one layer, vs peer
  python benchmarks/routed_lora.py --preset t5xl --check   # T5-XL shapes in bf16 (accelerator)

Needs only jax, flax and numpy (no TensorFlow); `--peer` needs PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import statistics
import subprocess
import sys
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


CPU_IMPLS = ["dense", "sorted", "grid", "ffi", "ragged", "auto"]
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for a 2-core CPU (1+1 layers, one 256-token example); float32, as bf16 matmuls are slow on CPUs.
    "cpu": dict(d_model=256, num_heads=4, d_kv=64, d_ff=640, layers=1, vocab_size=8192, batch=1, length=256,
                dtype="float32", rank=16, experts=[8, 36, 166], k=[1, 2], repeats=10, impls=CPU_IMPLS,
                benches=["layer", "model"]),
    # T5-XL's proportions (d_ff = 2.5 d_model, heads x d_kv = d_model) at half its width, one 512-token example and
    # one layer: where the router and LoRA FLOPs are as small a share of the layer as T5-XL's allow (floor ~1.1x).
    # `dense` and `ragged` (100x slower than the others on CPU) are left out to keep it to a minute or two.
    "cpu_xl": dict(d_model=1024, num_heads=16, d_kv=64, d_ff=2560, layers=1, vocab_size=8192, batch=1, length=512,
                   dtype="float32", rank=16, experts=[166], k=[2], repeats=5, impls=["sorted", "grid", "ffi", "auto"],
                   benches=["layer"]),
    "t5xl": dict(d_model=2048, num_heads=32, d_kv=64, d_ff=5120, layers=24, vocab_size=32128, batch=32, length=512,
                 dtype="bfloat16", rank=16, experts=[8, 36, 166], k=[1, 2], repeats=10,
                 impls=["dense", "sorted", "grid", "ragged", "pallas", "auto"], benches=["layer", "model"]),
}
PEER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "bench" / "phatgoose_reference_layer.py"


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
  p.add_argument("--impls", type=lambda s: s.split(","),
                 help=f"comma-separated routed formulations, from {IMPLS} (preset default)")
  p.add_argument("--benches", type=lambda s: s.split(","), help="layer, model or both (preset default)")
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
  p.add_argument("--peer", nargs="?", const=str(PEER), help="also time the PHATGOOSE reference dispatch in PyTorch "
                 f"on each layer case (this script; default {PEER})")
  p.add_argument("--peer_threads", type=int, help="OMP_NUM_THREADS for the peer (default: PyTorch's, one per core). "
                 "On a CPU shared with another busy process, PyTorch's spinning OpenMP threads slow it 30-100x; "
                 "1 keeps it to the core left free")
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


@dataclasses.dataclass(frozen=True)
class Flops:
  """Matmul FLOPs of one call: the base, and what routed experts add (router scores, the top-k LoRA products)."""

  base: float
  linears: tuple[tuple[int, int, int], ...]  # (rows, d_in, d_out) of every expert-bearing linear

  def floor(self, num_experts: int, k: int, rank: int) -> float:
    """(base + router scores + top-k LoRA) / base: the routed/base ratio if the extra FLOPs ran as fast as the base."""
    router = sum(2 * rows * num_experts * d_in for rows, d_in, _ in self.linears)
    lora = sum(2 * rows * k * rank * (d_in + d_out) for rows, d_in, d_out in self.linears)
    return (self.base + router + lora) / self.base


def flops(cfg: T5Config, bench: str, batch: int, length: int) -> Flops:
  """Analytic matmul FLOPs of `bench` (`make_benches`; encoder and decoder both `length` tokens). Every linear of a
  layer is a PHATGOOSE module; attention scores and values (4 L^2 d_kv per head, the causal half included, as XLA
  computes it) and the logits head are base-only."""
  rows, inner = batch * length, cfg.num_heads * cfg.d_kv
  attention = [(rows, cfg.d_model, inner)] * 3 + [(rows, inner, cfg.d_model)]
  up = 2 if cfg.feed_forward == "gated-gelu" else 1
  mlp = [(rows, cfg.d_model, cfg.d_ff)] * up + [(rows, cfg.d_ff, cfg.d_model)]
  scores = 4 * batch * cfg.num_heads * length * length * cfg.d_kv
  if bench == "layer":
    linears, extra = attention + mlp, scores
  else:
    linears = (attention + mlp) * cfg.num_encoder_layers + (2 * attention + mlp) * cfg.num_decoder_layers
    extra = scores * (cfg.num_encoder_layers + 2 * cfg.num_decoder_layers) + 2 * rows * cfg.d_model * cfg.vocab_size
  return Flops(extra + sum(2 * r * i * o for r, i, o in linears), tuple(linears))


@dataclasses.dataclass(frozen=True)
class PeerResult:
  base_ms: float
  routed_ms: float


def run_peer(script: str, cfg: T5Config, batch: int, length: int, num_experts: int, k: int, rank: int,
             repeats: int, threads: int | None) -> PeerResult:
  """Runs the PyTorch PHATGOOSE reference layer on this case's shapes (one process, after ours: never concurrently)
  and reads its two medians. Its layer is gated-GELU with heads x d_kv = d_model, float32 on CPU, bf16 on CUDA."""
  if cfg.feed_forward != "gated-gelu" or cfg.num_heads * cfg.d_kv != cfg.d_model:
    raise SystemExit("--peer needs a gated-gelu layer with num_heads * d_kv == d_model (the peer's layer)")
  dev = "cpu" if jax.default_backend() == "cpu" else "cuda"
  argv = [f"T={batch * length}", f"L={length}", f"d={cfg.d_model}", f"ff={cfg.d_ff}", f"H={cfg.num_heads}",
          f"E={num_experts}", f"r={rank}", f"k={k}", f"iters={repeats}", f"dev={dev}"]
  env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
  out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=True, env=env).stdout
  ms = lambda label: float(re.search(rf"{label}\s+([0-9.]+) ms", out).group(1))
  print("  peer: " + out.splitlines()[0], flush=True)
  return PeerResult(ms("torch base layer"), ms("torch PHATGOOSE-dispatch"))


def time_calls(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]], warmup: int, repeats: int) -> list[float]:
  """Median wall-clock ms per call of each (fn, args), after `warmup` calls each (the first compiles). The calls
  alternate, so a base and a variant timed together see the same load on a shared machine (another job's busy and
  idle phases otherwise land on one of them and move the ratio by 2x)."""
  for fn, args in calls:
    for _ in range(max(warmup, 1)):
      jax.block_until_ready(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for (fn, args), ts in zip(calls, times):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append((time.perf_counter() - start) * 1e3)
  return [statistics.median(ts) for ts in times]


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def print_row(cells: list[str]):
  print(" ".join(f"{c:>{w}}" for c, w in zip(cells, (6, 5, 3, 10, 11, 9, 7, 7, 6))), flush=True)


def print_summary(preset: str, rows: list[tuple[Any, ...]]):
  """The markdown table of ours (`auto`, else our fastest formulation) vs the peer, one row per layer case."""
  print("\n| preset | E | k | ours base ms | ours routed ms | ratio | floor | gap | peer base ms | "
        "peer routed ms | peer ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")
  for num_experts, k, impl, base_ms, ms, floor, peer in rows:
    print(f"| {preset} | {num_experts} | {k} | {base_ms:.2f} | {ms:.2f} ({impl}) | {ms / base_ms:.2f}x | "
          f"{floor:.2f}x | {ms / base_ms / floor:.2f} | {peer.base_ms:.2f} | {peer.routed_ms:.2f} | "
          f"{peer.routed_ms / peer.base_ms:.2f}x |")


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
        f"auto = ffi (the C++ kernel) on a CPU, else dense for E <= {DENSE_MAX_EXPERTS} (or small batches), pallas "
        f"on a GPU, grid on a CPU without the kernel; "
        f"median of {args.repeats} calls")

  benches = [b for b in make_benches(cfg, args.batch, args.length, args.seed) if b.name in args.benches]
  print("floor: (base + router scores + top-k LoRA FLOPs) / base FLOPs; gap: (x base) / floor")
  print()
  print_row(["bench", "E", "k", "impl", "ms/call", "base ms", "x base", "floor", "gap"])
  summary = []
  for bench in benches:
    bench_flops = flops(cfg, bench.name, args.batch, args.length)
    base_fn = bench.jitted(None)
    for num_experts in args.experts:
      params = random_params(bench, ExpertConfig(num_experts=num_experts, rank=args.rank), cfg,
                             args.seed + num_experts)
      inputs = bench.inputs
      base = (base_fn, (split(params)[0],) + inputs)
      for k in args.k:
        if k > num_experts:
          continue
        floor = bench_flops.floor(num_experts, k, args.rank)
        fns = {impl: bench.jitted(ExpertConfig(num_experts=num_experts, rank=args.rank, router=Phatgoose(k),
                                               impl=impl))
               for impl in dict.fromkeys(args.impls + (["dense"] if args.check else []))}
        if args.check:
          dense = fns["dense"](params, *inputs)
          for impl in args.impls:
            err = rel_err(fns[impl](params, *inputs), dense)
            print(f"  check {bench.name} E={num_experts} k={k} {impl}: rel err vs dense {err:.2e}", flush=True)
        times = {}
        for impl in args.impls:  # each timed against its own, interleaved base
          times[impl] = base_ms, ms = time_calls([base, (fns[impl], (params,) + inputs)], args.warmup, args.repeats)
          print_row([bench.name, str(num_experts), str(k), impl, f"{ms:.2f}", f"{base_ms:.2f}", f"{ms / base_ms:.2f}",
                     f"{floor:.2f}", f"{ms / base_ms / floor:.2f}"])
        if args.peer and bench.name == "layer":
          peer = run_peer(args.peer, cfg, args.batch, args.length, num_experts, k, args.rank, args.repeats,
                          args.peer_threads)
          print_row([bench.name, str(num_experts), str(k), "peer", f"{peer.routed_ms:.2f}", f"{peer.base_ms:.2f}",
                     f"{peer.routed_ms / peer.base_ms:.2f}", f"{floor:.2f}",
                     f"{peer.routed_ms / peer.base_ms / floor:.2f}"])
          impl = "auto" if "auto" in times else min(times, key=lambda i: times[i][1] / times[i][0])
          summary.append((num_experts, k, impl, *times[impl], floor, peer))
      del params
  if summary:
    print_summary(args.preset, summary)


if __name__ == "__main__":
  main()
