"""Can the P3 input pipeline feed the T5-XL expert step? Examples/s of `train_batches` on the P3 pool mixture vs the
examples/s one host's accelerators consume.

Data: a P3-release-style copy written to a temporary data root (`tests/data_fixtures.py` TFRecords and info files):
`--datasets` of the 36 pool datasets x `--templates` configs x `--rows` rows of `--words` random words each (P3
inputs run to a few hundred tokens), read through `tasks.p3` -> seqio -> `EncDecFeatureConverter`, batched per
host, as training reads it. Vocabulary: a SentencePiece model trained here on that text (`--vocab spm`, the
T5-like case) or bytes (`--vocab byte`, more tokens per example).

Demand: examples/s = devices per host x examples per device-second. A step's time is `--step_ms` when you measured
it (`benchmarks/train_step.py --preset t5xl` prints it per `--batch`), else the analytic expert-step FLOPs
(`train_step.analytic_flops`, the T5-XL preset, 512/128 tokens) at `--mfu` (default 0.45, the training
issue's target) of `--peak_tflops` (H100 dense bf16). A faster step only raises demand, so an estimate at the
target MFU is the bar the pipeline must clear. Prints the measured rate, the demand and their ratio (>1: keeps up).

  python benchmarks/input_pipeline.py                     # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

LENGTHS = {"inputs": 512, "targets": 128}


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", type=int, default=36)
  p.add_argument("--templates", type=int, default=3)
  p.add_argument("--rows", type=int, default=400, help="rows per config (the mixture repeats them)")
  p.add_argument("--words", type=int, default=150, help="words per input")
  p.add_argument("--vocab", choices=("spm", "byte"), default="spm")
  p.add_argument("--batch", type=int, default=128, help="examples per host batch")
  p.add_argument("--batches", type=int, default=30, help="timed batches (after 3 warm-up batches)")
  p.add_argument("--devices_per_host", type=int, default=8)
  p.add_argument("--step_ms", type=float, help="measured expert-step time for --step_batch examples per device")
  p.add_argument("--step_batch", type=int, default=32)
  p.add_argument("--mfu", type=float, default=0.45)
  p.add_argument("--peak_tflops", type=float, default=989.0)
  return p.parse_args()


def write_data(root: str, args: argparse.Namespace) -> list[str]:
  """P3-style configs for the first `--datasets` pool datasets; returns the text (for the vocabulary)."""
  import data_fixtures as fx
  from tasks import p3

  rng = random.Random(0)
  words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
  text = []
  for dataset in p3.P3_POOL[:args.datasets]:
    for t in range(args.templates):
      rows = []
      for i in range(args.rows):
        body = " ".join(rng.choice(words) for _ in range(args.words))
        rows.append({"inputs_pretokenized": f"Template {t}: {body}", "targets_pretokenized": rng.choice(words),
                     "answer_choices": rng.sample(words, 3)})
        text.append(rows[-1]["inputs_pretokenized"])
      fx.write_p3_config(root, f"{dataset.prefixes[0]}_template_{t}", "train", rows,
                         {**fx.P3_FEATURES, **fx.P3_CHOICES})
  return text


def train_spm(text: list[str], directory: str) -> str:
  import sentencepiece as spm

  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=os.path.join(directory, "spm"),
                                 vocab_size=4000, hard_vocab_limit=False, model_type="unigram",
                                 input_sentence_size=20000, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)  # T5's special ids
  return os.path.join(directory, "spm.model")


def demand(args: argparse.Namespace) -> tuple[float, str]:
  """Examples/s one host consumes, and how that was obtained."""
  if args.step_ms is not None:
    per_device = args.step_batch / (args.step_ms / 1e3)
    return args.devices_per_host * per_device, f"measured step {args.step_ms} ms per {args.step_batch} examples"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step
  from moe_jax.models.config import ExpertConfig, T5Config
  from moe_jax.models.routers import Uniform
  from moe_jax.models.t5 import Transformer

  preset = train_step.PRESETS["t5xl"]
  config = T5Config(vocab_size=preset["vocab_size"], d_model=preset["d_model"], num_heads=preset["num_heads"],
                    d_kv=preset["d_kv"], d_ff=preset["d_ff"], num_encoder_layers=preset["layers"],
                    num_decoder_layers=preset["layers"])
  model = Transformer(config, ExpertConfig(num_experts=1, rank=16, router=Uniform()))
  flops = train_step.analytic_flops(model, 1, LENGTHS["inputs"], LENGTHS["targets"]).step("expert")
  per_device = args.mfu * args.peak_tflops * 1e12 / flops
  return args.devices_per_host * per_device, (f"T5-XL expert step at {args.mfu:.0%} MFU of {args.peak_tflops:g} "
                                               f"TFLOP/s: {flops / 1e12:.2f} TFLOP per example (estimate)")


def main() -> None:
  args = parse_args()
  needed, how = demand(args)
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    text = write_data(root, args)
    print(f"wrote {args.datasets} datasets x {args.templates} templates x {args.rows} rows in "
          f"{time.perf_counter() - start:.0f} s")
    import gin

    if args.vocab == "spm":
      gin.bind_parameter("get_vocabulary.kind", "sentencepiece")
      gin.bind_parameter("get_vocabulary.path", train_spm(text, root))
    os.environ["MOE_JAX_DATA_DIR"] = root
    import tasks  # noqa: F401
    from moe_jax.data import pipeline

    batches = pipeline.train_batches("p3_t0_heldin", LENGTHS, args.batch, seed=0)
    for _ in range(3):
      next(batches)
    tokens, start = 0, time.perf_counter()
    for _ in range(args.batches):
      batch = next(batches)
      tokens += int((batch["encoder_input_tokens"] > 0).sum())
    elapsed = time.perf_counter() - start
  rate = args.batches * args.batch / elapsed
  print(f"vocab {args.vocab}: {rate:,.0f} examples/s ({tokens / args.batches / args.batch:.0f} input tokens per "
        f"example, {os.cpu_count()} CPUs)")
  print(f"demand: {needed:,.1f} examples/s per host ({args.devices_per_host} devices; {how})")
  print(f"ratio supply / demand: {rate / needed:.1f}x")


if __name__ == "__main__":
  main()
