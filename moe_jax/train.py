"""Train one stage: `python -m moe_jax.train --gin_file=gin/expert.gin [--gin.train.total_steps=10 ...]`.

The gin files choose the stage (multitask, expert, gate), model, data and hyper-parameters; see
`moe_jax.training.loop.train` for every binding. Set MOE_JAX_DEBUG=1 to see full tracebacks of input errors.
"""

from __future__ import annotations

import os
import sys

import gin

from moe_jax import gin_utils
from moe_jax.data import pipeline  # noqa: F401  (registers the data configurables before gin locks)
from moe_jax.training import loop


def main(argv: list[str]) -> None:
  args = gin_utils.parse_flags(argv, __doc__)
  gin_utils.configure(args.gin_file, args.gin_bindings, args.gin_search_paths)
  try:
    product = loop.train(gin_config_str=gin.config_str())
  except (FileNotFoundError, ValueError) as e:
    if os.environ.get("MOE_JAX_DEBUG"):
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    raise SystemExit(1) from None
  print(f"done: {product}")


if __name__ == "__main__":
  gin_utils.main_wrapper(main)
