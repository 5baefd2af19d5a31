"""Build the task-level MoE's stage-2 checkpoint: stage 1's routers and task embeddings, everything else the
pretrained backbone (every layer copied m times plus N(0, noise_std^2) noise), as the seed's
example_scripts/build_a_checkpoint2.py does.

  python -m moe_jax.taskmoe.stage2 --stage1=runs/taskmoe/stage1 --init_from=BACKBONE --output=runs/taskmoe/stage2_init

`--stage1`: a `taskmoe_stage1` model_dir (or its `taskmoe/`); `--init_from`: the backbone stage 1 was expanded
from (checked by its weights' checksum); the model config comes from the stage-1 checkpoint. Optional gin files
and bindings (`--gin_file`, `--gin.X=V`) configure what the backbone's loading reads from gin (its vocabulary, for
a random or T5X backbone) and stage 2's TaskMoEConfig when `--taskmoe_from_gin` is given (default: stage 1's
with softmax routing). Then train stage 2 with gin/taskmoe_stage2.gin and `train.expert_from` = `--output`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from moe_jax import gin_utils


def parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
  parser.add_argument("--stage1", required=True, help="the stage-1 model_dir (or its taskmoe/ checkpoint)")
  parser.add_argument("--init_from", default=None, help="the pretrained backbone (None: random, seeded by --seed)")
  parser.add_argument("--output", required=True, help="where to write the stage-2 checkpoint")
  parser.add_argument("--noise_std", type=float, default=None, help="copy noise (default: the config's, 1e-8)")
  parser.add_argument("--seed", type=int, default=0, help="seeds the copy noise (and a random backbone)")
  parser.add_argument("--taskmoe_from_gin", action="store_true", help="stage 2's TaskMoEConfig from the gin files")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_bindings", action="append", default=[])
  gin_style = [a for a in argv if a.startswith("--gin.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--gin.")])
  args.gin_bindings += [f"{a[len('--gin.'):].split('=', 1)[0]} = {a.split('=', 1)[1]}" for a in gin_style if "=" in a]
  return args


def main(argv: list[str]) -> None:
  args = parse(argv)
  # Every module with gin configurables the run reads, before gin locks (vocabulary, mesh, TaskMoEConfig, ...).
  import moe_jax.data.vocab  # noqa: F401  pylint: disable=g-import-not-at-top
  import moe_jax.taskmoe.stages  # noqa: F401  pylint: disable=g-import-not-at-top
  import moe_jax.training.backbone  # noqa: F401  pylint: disable=g-import-not-at-top
  import moe_jax.training.partitioning  # noqa: F401  pylint: disable=g-import-not-at-top

  gin_utils.configure(args.gin_file, args.gin_bindings)
  gin_utils.run_job(lambda: print(f"done: {run(args)}"))


def run(args: argparse.Namespace) -> str:
  from moe_jax.models.interface import build_model  # pylint: disable=g-import-not-at-top
  from moe_jax.models.taskmoe import TaskMoEConfig  # pylint: disable=g-import-not-at-top
  from moe_jax.taskmoe import checkpoint as tckpt  # pylint: disable=g-import-not-at-top
  from moe_jax.taskmoe.stages import build_stage2  # pylint: disable=g-import-not-at-top
  from moe_jax.training import partitioning as part  # pylint: disable=g-import-not-at-top
  from moe_jax.training.backbone import load_backbone  # pylint: disable=g-import-not-at-top

  config, _ = tckpt.configs(tckpt.read_metadata(args.stage1))
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = load_backbone(args.init_from, config, part.logical_shardings(
      part.abstract_params(build_model(config)), mesh, rules), args.seed)
  moe = TaskMoEConfig() if args.taskmoe_from_gin else None
  return build_stage2(args.stage1, backbone, args.output, moe, args.seed, args.noise_std)


if __name__ == "__main__":
  gin_utils.main_wrapper(main)
