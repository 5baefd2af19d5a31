"""`python -m moe_jax.teacher prepare --dataset D --kind creak --out F.jsonl` or
`python -m moe_jax.teacher {enhance,student,evaluate} --gin_file=gin/teacherlm_{enhance,student,evaluate}.gin`.

Input errors end with one line (set MOE_JAX_DEBUG=1 for tracebacks).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from moe_jax.errors import UserError

COMMANDS = ("prepare", "enhance", "student", "evaluate")


def _prepare(argv: Sequence[str]) -> None:
  from moe_jax.teacher import formats  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m moe_jax.teacher prepare", description=formats.__doc__)
  parser.add_argument("--dataset", required=True, help="a .jsonl file or a datasets.save_to_disk folder")
  parser.add_argument("--kind", required=True, help=f"dataset format: {', '.join(formats.kinds())}")
  parser.add_argument("--out", required=True, help="the prepared .jsonl to write")
  args = parser.parse_args(argv)
  try:
    count = formats.prepare(args.dataset, args.kind, args.out)
  except UserError as e:
    if os.environ.get("MOE_JAX_DEBUG"):
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    raise SystemExit(1) from None
  print(f"prepared {count} rows: {args.out}")


def _gin_command(command: str, argv: Sequence[str]) -> None:
  """A gin-configured command: its module registers its configurables before gin parses the files."""
  import gin  # pylint: disable=g-import-not-at-top
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  if command == "enhance":
    from moe_jax.teacher import enhance as module  # pylint: disable=g-import-not-at-top
    job = lambda: module.enhance()
  elif command == "student":
    from moe_jax.teacher import student as module  # pylint: disable=g-import-not-at-top
    job = lambda: module.train_student(gin_config_str=gin.config_str())
  else:
    from moe_jax.teacher import evaluate as module  # pylint: disable=g-import-not-at-top
    job = lambda: module.evaluate_students()

  def main(args: list[str]) -> None:
    gin_utils.setup(args, module.__doc__)
    print(f"done: {gin_utils.run_job(job)}")

  gin_utils.main_wrapper(main, list(argv))


def main(argv: Sequence[str]) -> None:
  if not argv or argv[0] not in COMMANDS:
    print(f"usage: python -m moe_jax.teacher {{{','.join(COMMANDS)}}} ...\n{__doc__}", file=sys.stderr)
    raise SystemExit(2)
  if argv[0] == "prepare":
    _prepare(argv[1:])
  else:
    _gin_command(argv[0], argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])
