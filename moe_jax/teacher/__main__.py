"""`python -m moe_jax.teacher prepare --dataset D --kind creak --out F.jsonl`,
`python -m moe_jax.teacher download --benchmark mmlu creak ecqa strategyqa --data_root DIR` or
`python -m moe_jax.teacher {enhance,student,evaluate} --gin_file=gin/teacherlm_{enhance,student,evaluate}.gin`.

Input errors end with one line (set MOE_JAX_DEBUG=1 for tracebacks).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from moe_jax.errors import UserError

T = TypeVar("T")
DATA_DIR_ENV = "MOE_JAX_DATA_DIR"  # moe_jax.data.files.ENV_VAR, the data root every real-data source reads under

COMMANDS = ("prepare", "download", "enhance", "student", "evaluate")


def _one_line(job: Callable[[], T]) -> T:
  """Run `job`; an input error ends the process with one line on stderr and status 1 (MOE_JAX_DEBUG=1: the
  traceback), as the gin commands do through `gin_utils.run_job`."""
  try:
    return job()
  except UserError as e:
    if os.environ.get("MOE_JAX_DEBUG"):
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    raise SystemExit(1) from None


def _prepare(argv: Sequence[str]) -> None:
  from moe_jax.teacher import formats  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m moe_jax.teacher prepare", description=formats.__doc__)
  parser.add_argument("--dataset", required=True, help="a .jsonl file or a datasets.save_to_disk folder")
  parser.add_argument("--kind", required=True, help=f"dataset format: {', '.join(formats.kinds())}")
  parser.add_argument("--out", required=True, help="the prepared .jsonl to write")
  args = parser.parse_args(argv)
  count = _one_line(lambda: formats.prepare(args.dataset, args.kind, args.out))
  print(f"prepared {count} rows: {args.out}")


def _download(argv: Sequence[str]) -> None:
  from moe_jax import fs  # pylint: disable=g-import-not-at-top
  from moe_jax.teacher import hub  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m moe_jax.teacher download", description=hub.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--benchmark", required=True, nargs="+", choices=sorted(hub.HUB_SOURCES),
                      help="one or more benchmarks (their hub ids, configs and splits: hub.HUB_SOURCES)")
  parser.add_argument("--data_root", default=os.environ.get(DATA_DIR_ENV),
                      help=f"where teacherlm/<benchmark>/<split>.jsonl is written (default: ${DATA_DIR_ENV})")
  parser.add_argument("--split", help="a split other than the paper's (one benchmark only)")
  args = parser.parse_args(argv)
  if not args.data_root:
    parser.error(f"--data_root is required (or set ${DATA_DIR_ENV})")
  if args.split and len(args.benchmark) > 1:
    parser.error("--split applies to one --benchmark at a time")
  for benchmark in dict.fromkeys(args.benchmark):
    path, count = _one_line(lambda b=benchmark: hub.download(b, args.data_root, args.split))
    print(f"prepared {count} {benchmark} rows: {path}")
  print(f"evaluate with --gin.evaluate_students.data_root=\"{fs.absolute(args.data_root)!r}\" "
        f"--gin.evaluate_students.eval_sets=\"{list(dict.fromkeys(args.benchmark))}\"")


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
  elif argv[0] == "download":
    _download(argv[1:])
  else:
    _gin_command(argv[0], argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])
