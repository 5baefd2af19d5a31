"""Throughput of the expert-training step (frozen backbone, one LoRA expert) vs the full-finetuning step.

Both steps are `moe_jax.training.train_step.make_train_step` on the mesh of `partitioning.make_mesh()` with
`axis_rules()`, AdamW from `optimizer.make_optimizer`, on synthetic random token batches:

  expert     stage 'expert': `ExpertConfig(num_experts=1, rank=r)` on PHATGOOSE's modules, Uniform router (plain
             LoRA); only lora_a/lora_b train, the backbone gets no weight gradients and no Adam state
  multitask  stage 'multitask': no experts, every backbone parameter trains (full finetuning)

Per step it prints ms (median of the timed steps, after warm-up steps; compiling is not timed), tokens/s (encoder +
decoder tokens), model FLOPs (analytic) next to XLA's `compiled.cost_analysis()['flops']`, achieved FLOP/s and
MFU = model FLOPs / step time / (peak FLOP/s per device x devices in the mesh).

Model FLOPs per step (a multiply-add is 2 FLOPs):
  W = 2 * sum over kernels of d_in * d_out * (tokens it sees)          forward weight matmuls; encoder linears and
      the decoder's cross-attention key/value see B * L_in tokens, the other decoder linears and the logits B * L_tgt
  A = 4 * B * heads * d_kv * (enc_layers * L_in^2 + dec_layers * (L_tgt^2 + L_tgt * L_in))
                                                                     forward QK^T and PV (causal counted in full)
  R = 2 * sum over LoRA modules of E * r * (d_in + d_out) * (tokens it sees)     forward LoRA matmuls
  full finetune:  3W + 3A        backward = activation gradients + weight gradients = 2x forward (the usual 6NT)
  expert:         2W + 3A + 3R   frozen kernels get activation gradients only (2NT + 2NT = 4NT); attention has no
                                 weights, so its backward is 2x its forward either way; the LoRA factors train
Not counted: embedding gathers, norms, softmax and other elementwise work, rematerialised forwards (`--remat`; the
MFU convention counts model FLOPs only), and the few activation gradients XLA may drop in the expert step (the
first layer's query/key/value input gradients, which only lead to the frozen embedding). XLA's count includes
elementwise FLOPs and recomputation (about 1.2x the analytic count with `--remat`), but counts a loop body once:
with `--microbatches M` (a scan) it reports roughly 1/M of the step.

Packing (expert step only): real (non-padding) tokens/s on a P3-like length mix, the same examples one per row
padded vs packed (segment ids and restarting positions, as seqio's `EncDecFeatureConverter(pack=True)`) into the
same [batch, length] shapes, and the ratio. Lengths are log-uniform, inputs from 30/512 of `--inputs_length` up to
it and targets from 1 up to `--targets_length` (30..512 and 1..128 at T5X's P3 lengths): an assumed mix, not one
measured on P3. Rows are filled greedily in order (seqio's packer is close to this).

Peak FLOP/s: `--peak_tflops`, else dense bf16 peak by device kind, else (CPU, unknown devices) a large matmul
in the compute dtype measured in-process. An out-of-memory step (e.g. full finetuning of T5-XL) prints OOM.

  python benchmarks/train_step.py --preset cpu                      # tiny shapes, well under a minute on 2 CPU cores
  python benchmarks/train_step.py --preset t5xl --remat --batch 32  # T5-XL shapes in bf16 (accelerator)

Needs only jax, flax, optax and numpy (no TensorFlow, no seqio).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

import common
from moe_jax.models.attention import resolve_impl
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.experts import split
from moe_jax.models.t5 import Transformer
from moe_jax.training import partitioning as part
from moe_jax.training.optimizer import make_optimizer, trainable_mask
from moe_jax.training.train_step import Batch, TrainState, create_train_state, make_train_step

STAGES = ("expert", "multitask")

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for a 2-core CPU; float32, as bf16 matmuls are slow on CPUs.
    "cpu": dict(d_model=256, num_heads=4, d_kv=64, d_ff=640, layers=2, vocab_size=8192, batch=4, inputs_length=128,
                targets_length=32, dtype="float32", param_dtype="float32", repeats=10),
    # T5X trains T5-XL with float32 parameters and bfloat16 activations.
    "t5xl": dict(d_model=2048, num_heads=32, d_kv=64, d_ff=5120, layers=24, vocab_size=32128, batch=32,
                 inputs_length=512, targets_length=128, dtype="bfloat16", param_dtype="float32", repeats=10),
}

# Dense (no sparsity) bf16 peak TFLOP/s per device; the first key found in `device_kind` wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
)


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs per step of the weight matmuls (W), attention scores and values (A) and LoRA matmuls (R)."""

  weights: float
  attention: float
  lora: float

  def step(self, stage: str) -> float:
    if stage == "multitask":
      return 3 * self.weights + 3 * self.attention
    return 2 * self.weights + 3 * self.attention + 3 * self.lora


@dataclasses.dataclass(frozen=True)
class Row:
  trainable: int
  ms: float
  tokens_per_s: float
  model_flops: float
  xla_flops: float | None


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument("--stages", type=lambda s: s.split(","), default=list(STAGES), help="expert, multitask or both")
  p.add_argument("--batch", type=int, help="examples per step (preset default)")
  p.add_argument("--inputs_length", type=int, help="encoder tokens per example (preset default)")
  p.add_argument("--targets_length", type=int, help="decoder tokens per example (preset default)")
  p.add_argument("--layers", type=int, help="encoder and decoder layers (preset default)")
  p.add_argument("--dtype", help="compute dtype (preset default)")
  p.add_argument("--param_dtype", help="parameter dtype (preset default)")
  p.add_argument("--rank", type=int, default=16, help="LoRA rank r of the expert")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
  p.add_argument("--microbatches", type=int, default=1, help="gradient-accumulation microbatches per step")
  p.add_argument("--model_parallel", type=int, default=1, help="size of the mesh's `model` axis")
  p.add_argument("--attention", default="auto", help="T5Config.attention_impl: auto, xla, cudnn or tpu_flash")
  p.add_argument("--peak_tflops", type=float, help="peak TFLOP/s per device for MFU (default: by device kind)")
  p.add_argument("--repeats", type=int, help="timed steps per stage (preset default)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (after compiling)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  common.apply_preset(args, PRESETS[args.preset])
  if bad := set(args.stages) - set(STAGES):
    p.error(f"unknown --stages {sorted(bad)}; expected some of {STAGES}")
  if args.repeats < 1:
    p.error("--repeats must be at least 1")
  return args


def synthetic_batch(batch: int, inputs_length: int, targets_length: int, vocab_size: int,
                    seed: int) -> dict[str, np.ndarray]:
  """Random non-padding tokens; decoder inputs are the targets shifted right (unpacked)."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, vocab_size, (batch, targets_length), dtype=np.int32)
  return {"encoder_input_tokens": rng.integers(1, vocab_size, (batch, inputs_length), dtype=np.int32),
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones((batch, targets_length), np.float32)}


def shortest_inputs(inputs_length: int) -> int:
  """The mix's shortest inputs: 30 tokens at P3's 512, scaled with the inputs length."""
  return max(1, round(inputs_length * 30 / 512))


def p3_like_lengths(n: int, inputs_length: int, targets_length: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """n (inputs, targets) lengths, log-uniform: short prompts and answers are common, long ones rare."""
  def draw(lo: int, hi: int) -> np.ndarray:
    return np.clip(np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(np.int64), lo, hi)

  return draw(shortest_inputs(inputs_length), inputs_length), draw(1, targets_length)


MixBatch = tuple[dict[str, np.ndarray], int, int]  # (batch, examples in it, real tokens in it)


def length_mix_batches(batch: int, inputs_length: int, targets_length: int, vocab_size: int,
                       seed: int) -> tuple[MixBatch, MixBatch]:
  """(unpacked, packed) from one stream of P3-like examples: unpacked rows take the first `batch` examples, packed
  rows take examples in order while both the inputs and the targets fit."""
  rng = np.random.default_rng(seed)
  # 64 per row is more than a row can hold (the shortest inputs are 30/512 of a row), so every row fills.
  inputs, targets = p3_like_lengths(64 * batch, inputs_length, targets_length, rng)
  packed_rows, row = [], []
  for example in zip(inputs, targets):
    if sum(i for i, _ in row) + example[0] > inputs_length or sum(t for _, t in row) + example[1] > targets_length:
      packed_rows.append(row)
      row = []
      if len(packed_rows) == batch:
        break
    row.append(example)

  def build(rows: list[list[tuple[int, int]]], packed: bool) -> MixBatch:
    shapes = {"encoder": (batch, inputs_length), "decoder": (batch, targets_length)}
    out = {f"{side}_{name}": np.zeros(shape, np.int32) for side, shape in shapes.items()
           for name in ("segment_ids", "positions")}
    out |= {name: np.zeros(shapes[name.split("_")[0]], np.int32)
            for name in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
    for r, examples in enumerate(rows):
      e = d = 0
      for segment, (li, lt) in enumerate(examples, 1):
        target = rng.integers(1, vocab_size, lt, dtype=np.int32)
        out["encoder_input_tokens"][r, e:e + li] = rng.integers(1, vocab_size, li, dtype=np.int32)
        out["decoder_target_tokens"][r, d:d + lt] = target
        out["decoder_input_tokens"][r, d + 1:d + lt] = target[:-1]  # shifted right within the example
        for side, start, length in (("encoder", e, li), ("decoder", d, lt)):
          out[f"{side}_segment_ids"][r, start:start + length] = segment
          out[f"{side}_positions"][r, start:start + length] = np.arange(length)
        e, d = e + li, d + lt
    out["decoder_loss_weights"] = (out["decoder_target_tokens"] > 0).astype(np.float32)
    if not packed:
      out = {k: v for k, v in out.items() if not k.endswith(("segment_ids", "positions"))}
    tokens = int((out["encoder_input_tokens"] > 0).sum() + (out["decoder_target_tokens"] > 0).sum())
    return out, sum(map(len, rows)), tokens

  return build([[example] for example in zip(inputs[:batch], targets[:batch])], False), build(packed_rows, True)


def sees_encoder_tokens(path: tuple[str, ...]) -> bool:
  return path[0] == "encoder" or path[-3:-1] in (("encoder_decoder_attention", "key"),
                                                 ("encoder_decoder_attention", "value"))


def analytic_flops(model: Transformer, batch: int, inputs_length: int, targets_length: int) -> Flops:
  """W, A and R of the module docstring, with W and R summed over the model's actual parameter shapes."""
  cfg = model.config
  tokens = {True: batch * inputs_length, False: batch * targets_length}
  weights = lora = 0
  for path, leaf in traverse_util.flatten_dict(nn.unbox(part.abstract_params(model))).items():
    flops = 2 * math.prod(leaf.shape) * tokens[sees_encoder_tokens(path)]
    if path[-1] == "kernel":
      weights += flops
    elif path[-1] in ("lora_a", "lora_b"):
      lora += flops
  per_layer = cfg.num_encoder_layers * inputs_length**2 + cfg.num_decoder_layers * (
      targets_length**2 + targets_length * inputs_length)
  return Flops(float(weights), float(4 * batch * cfg.num_heads * cfg.d_kv * per_layer), float(lora))


def matmul_params(model: Transformer) -> int:
  shapes = traverse_util.flatten_dict(nn.unbox(part.abstract_params(model)))
  return sum(math.prod(leaf.shape) for path, leaf in shapes.items() if path[-1] == "kernel")


def measured_tflops(dtype: jnp.dtype, size: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` TFLOP/s of a size^3 matmul on the default device."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, a))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e12


def peak_tflops(flag: float | None, device_kind: str, dtype: jnp.dtype) -> tuple[float, str]:
  """(peak TFLOP/s per device, where it came from)."""
  if flag is not None:
    return flag, "--peak_tflops"
  for name, tflops in PEAK_TFLOPS:
    if name in device_kind:
      return tflops, f"{name} dense bf16 peak"
  return measured_tflops(dtype), f"measured {dtype.name} 2048^3 matmul"


def time_steps(step: Callable[[TrainState, Batch], tuple[TrainState, Any]], state: TrainState, batch: Batch,
               warmup: int, repeats: int) -> float:
  """Median wall-clock ms per step after `warmup` steps; the state is donated and threaded through."""
  for _ in range(warmup):
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) * 1e3)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
  return statistics.median(times)


def run_stage(stage: str, cfg: T5Config, args: argparse.Namespace, mesh: Mesh, rules: part.Rules, batch: Batch,
              flops: Flops, tokens: int) -> Row:
  """Fresh state (same random backbone for both stages), compile, then time `stage`'s train step; `tokens` per
  step give tokens/s."""
  expert_model = Transformer(cfg, ExpertConfig(num_experts=1, rank=args.rank))
  model = expert_model if stage == "expert" else Transformer(cfg)
  params = common.random_params(part.abstract_params(expert_model), cfg.d_kv, args.seed)  # same backbone values for both stages
  if stage == "multitask":
    params = split(params)[0]
  mask = jax.tree.leaves(trainable_mask(stage, params))
  trainable = sum(x.size for x, train in zip(jax.tree.leaves(params), mask) if train)
  tx = make_optimizer(stage, params)
  state = create_train_state(params, model, tx, mesh, rules)
  del params  # donated with the state
  compiled = make_train_step(model, tx, stage, mesh, rules, num_microbatches=args.microbatches).lower(
      state, batch).compile()
  cost = compiled.cost_analysis()
  ms = time_steps(compiled, state, batch, args.warmup, args.repeats)
  return Row(trainable, ms, tokens / ms * 1e3, flops.step(stage), cost.get("flops") if cost else None)


def run_packing(cfg: T5Config, args: argparse.Namespace, mesh: Mesh, rules: part.Rules, flops: Flops) -> None:
  """Print real tokens/s of the expert step on the P3-like mix, unpacked vs packed, and the ratio."""
  print(f"\npacking, expert step, P3-like mix (inputs log-uniform {shortest_inputs(args.inputs_length)}.."
        f"{args.inputs_length}, targets 1..{args.targets_length}); tokens/s counts real (non-padding) encoder + "
        "decoder tokens")
  print_row(["batch", "examples", "ms/step", "tokens/s", "real tok", "padding"])
  rows = {}
  for name, (batch, examples, tokens) in zip(("unpacked", "packed"), length_mix_batches(
      args.batch, args.inputs_length, args.targets_length, cfg.vocab_size, args.seed)):
    try:
      rows[name] = run_stage("expert", cfg, args, mesh, rules, part.shard_batch(batch, mesh, rules), flops, tokens)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print_row([name, str(examples), "OOM", "-", str(tokens), "-"])
      continue
    padding = 1 - tokens / (args.batch * (args.inputs_length + args.targets_length))
    print_row([name, str(examples), f"{rows[name].ms:.2f}", f"{rows[name].tokens_per_s:.0f}", str(tokens),
               f"{padding:.0%}"])
  if len(rows) == 2:
    packed, unpacked = rows["packed"], rows["unpacked"]
    print(f"packed / unpacked: real tokens/s x{packed.tokens_per_s / unpacked.tokens_per_s:.2f}, time per step "
          f"x{packed.ms / unpacked.ms:.2f}")


def print_row(cells: list[str]):
  print(" ".join(f"{c:>{w}}" for c, w in zip(cells, (9, 10, 9, 10, 11, 11, 6, 9, 7))), flush=True)


def main():
  args = parse_args()
  start = time.perf_counter()
  cfg = T5Config(d_model=args.d_model, num_heads=args.num_heads, d_kv=args.d_kv, d_ff=args.d_ff,
                 num_encoder_layers=args.layers, num_decoder_layers=args.layers, vocab_size=args.vocab_size,
                 dtype=args.dtype, param_dtype=args.param_dtype, attention_impl=args.attention, remat=args.remat,
                 name=args.preset)
  mesh, rules = part.make_mesh(model=args.model_parallel), part.axis_rules()
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
        f"(x{jax.device_count()}), mesh {dict(mesh.shape)}")
  attention = resolve_impl(cfg.attention_impl, cfg.compute_dtype, cfg.d_kv, dropout=False)
  print(f"attention impl: {cfg.attention_impl} -> {attention}")
  print(f"preset {args.preset}: d_model {cfg.d_model}, {cfg.num_heads} heads x d_kv {cfg.d_kv}, d_ff {cfg.d_ff} "
        f"{cfg.feed_forward}, {args.layers}+{args.layers} layers, vocab {cfg.vocab_size}, batch {args.batch} x "
        f"({args.inputs_length} inputs + {args.targets_length} targets) tokens, compute {cfg.dtype}, params "
        f"{cfg.param_dtype}, remat {cfg.remat}, {args.microbatches} microbatch(es), expert LoRA r={args.rank} on "
        f"PHATGOOSE modules (Uniform router); median of {args.repeats} steps after {args.warmup} warm-up")
  peak, source = peak_tflops(args.peak_tflops, device.device_kind, cfg.compute_dtype)
  print(f"peak {peak:.4g} TFLOP/s per device ({source}), x{mesh.size} devices in the mesh")

  flops = analytic_flops(Transformer(cfg, ExpertConfig(num_experts=1, rank=args.rank)), args.batch,
                         args.inputs_length, args.targets_length)
  print(f"params in matmuls N = {matmul_params(Transformer(cfg)) / 1e6:.1f}M; forward TFLOP/step: "
        f"W {flops.weights / 1e12:.4g}, A {flops.attention / 1e12:.4g}, R {flops.lora / 1e12:.4g}; "
        "model FLOPs: full 3W+3A, expert 2W+3A+3R")
  batch = part.shard_batch(synthetic_batch(args.batch, args.inputs_length, args.targets_length, cfg.vocab_size,
                                           args.seed), mesh, rules)
  print()
  print_row(["stage", "trainable", "ms/step", "tokens/s", "model TFLOP", "XLA TFLOP", "XLA/m", "TFLOP/s", "MFU"])
  rows = {}
  for stage in args.stages:
    try:
      row = run_stage(stage, cfg, args, mesh, rules, batch, flops,
                      args.batch * (args.inputs_length + args.targets_length))
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print_row([stage, "-", "OOM", "-", f"{flops.step(stage) / 1e12:.4g}", "-", "-", "-", "-"])
      print(f"  {str(e).splitlines()[0][:200]}", flush=True)
      continue
    rows[stage] = row
    achieved = row.model_flops / row.ms * 1e3
    xla = "-" if row.xla_flops is None else f"{row.xla_flops / 1e12:.4g}"
    xla_ratio = "-" if row.xla_flops is None else f"{row.xla_flops / row.model_flops:.2f}"
    print_row([stage, f"{row.trainable / 1e6:.2f}M", f"{row.ms:.2f}", f"{row.tokens_per_s:.0f}",
               f"{row.model_flops / 1e12:.4g}", xla, xla_ratio, f"{achieved / 1e12:.3g}",
               f"{achieved / (peak * 1e12 * mesh.size):.1%}"])
  if len(rows) == 2:
    expert, full = rows["expert"], rows["multitask"]
    print(f"\nexpert / full finetune: time x{expert.ms / full.ms:.2f}, tokens/s "
          f"x{expert.tokens_per_s / full.tokens_per_s:.2f}, model FLOPs x{expert.model_flops / full.model_flops:.2f}")
  if "expert" in args.stages:
    run_packing(cfg, args, mesh, rules, flops)
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
