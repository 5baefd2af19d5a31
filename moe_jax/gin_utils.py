"""Gin command lines, T5X style: `--gin_file=A.gin --gin.SOME.binding=value --gin_bindings='...'`.

Every entry point (`train`, `evaluate`, `concatenate`) parses its flags here so that a typo in a binding, an
unknown configurable or a missing gin file ends the run with one clear line before anything is compiled.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gin

from moe_jax import distributed
from moe_jax.errors import UserError

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class GinError(SystemExit):
  """A configuration error, reported as one line on stderr with exit status 2."""

  def __init__(self, message: str):
    super().__init__(2)
    self.message = message


def parse_flags(argv: Sequence[str], description: str) -> argparse.Namespace:
  """Flags: --gin_file (repeatable), --gin_bindings (repeatable), --gin_search_paths (comma list), --gin.X=V, and
  the multi-process flags of `moe_jax.distributed`.

  `--gin.train.steps=10` is the same as `--gin_bindings='train.steps = 10'`.
  """
  parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
  parser.add_argument("--gin_file", action="append", default=[], help="gin file(s), parsed in order")
  parser.add_argument("--gin_bindings", action="append", default=[], help="extra gin bindings, e.g. 'train.steps=5'")
  parser.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files and includes")
  distributed.add_flags(parser)
  gin_style = [a for a in argv if a.startswith("--gin.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--gin.")])
  for arg in gin_style:
    binding = arg[len("--gin."):]
    if "=" not in binding:
      parser.error(f"{arg}: expected --gin.NAME=VALUE")
    name, value = binding.split("=", 1)
    args.gin_bindings.append(f"{name} = {value}")
  if not args.gin_file:
    parser.error("at least one --gin_file is required (e.g. --gin_file=gin/phatgoose.gin)")
  return args


def setup(argv: Sequence[str], description: str) -> argparse.Namespace:
  """Every entry point's start: parse the flags, join the other processes of a multi-process run (before JAX
  touches a device), configure gin."""
  args = parse_flags(argv, description)
  distributed.initialize(args)
  configure(args.gin_file, args.gin_bindings, args.gin_search_paths)
  return args


def search_paths(extra: str = "") -> list[str]:
  """Folders gin looks in: the given ones, this repository's gin/, then the current directory (gin logs each miss,
  so the folder that holds most includes comes early)."""
  paths = [p for p in extra.split(",") if p] + [REPO_GIN_DIR, os.getcwd()]
  return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def _resolve(path: str, folders: Sequence[str]) -> str:
  candidates = [path] + [os.path.join(folder, path) for folder in folders]
  if path.startswith("gin/"):  # `gin/x.gin` as written in the README, run from anywhere
    candidates.append(os.path.join(REPO_GIN_DIR, path[len("gin/"):]))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise GinError(f"gin file {path!r} not found (looked in: {', '.join(dict.fromkeys(map(os.path.dirname, candidates[1:])))})")


def configure(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths: str = "") -> None:
  """Parse gin files and bindings; any error becomes a `GinError` naming what was wrong."""
  folders = search_paths(extra_search_paths)
  for folder in folders:
    gin.add_config_file_search_path(folder)
  files = [_resolve(f, folders) for f in gin_files]
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)  # gin logs an ERROR for every search-path miss of an include, found or not
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except (ValueError, KeyError, IOError, SyntaxError, TypeError) as e:
    message = " ".join(str(e).split())
    raise GinError(f"gin configuration error: {message}") from None
  finally:
    root.setLevel(level)
  gin.finalize()


def run_job(job: Callable[[], Any]) -> Any:
  """Call a configured job. A `moe_jax.errors.UserError` (bad value, missing file, mismatched product) becomes one
  line on stderr and exit status 1 (2 for an unbound required binding), unless MOE_JAX_DEBUG is set; any other
  exception, a ValueError from JAX or the model code included, is a bug and keeps its traceback."""
  try:
    return job()
  except RuntimeError as e:  # gin: a gin.REQUIRED argument was not bound
    if "Required bindings" not in str(e):
      raise
    raise GinError(f"gin configuration error: {_one_line(e)}") from None
  except UserError as e:
    if os.environ.get("MOE_JAX_DEBUG"):
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    raise SystemExit(1) from None


def _one_line(error: BaseException) -> str:
  """The message without gin's "In call to configurable ..." trail, on one line."""
  return re.sub(r"\s*In call to configurable .*$", "", " ".join(str(error).split()))


def main_wrapper(main, argv: Sequence[str] | None = None) -> None:
  """Run `main(argv)`, turning configuration errors into one line on stderr and exit status 2."""
  try:
    main(sys.argv[1:] if argv is None else argv)
  except GinError as e:
    print(f"error: {e.message}", file=sys.stderr)
    raise SystemExit(2) from None
