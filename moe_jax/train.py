"""Train: `python -m moe_jax.train --gin_file=gin/expert.gin [--gin.train.total_steps=10 ...]`.

By default this trains one stage (`moe_jax.training.loop.train`: multitask, expert or gate, chosen by the gin
files); a gin file may bind `job.fn` to a whole pipeline instead (`gin/phatgoose.gin`). Set MOE_JAX_DEBUG=1 to see
full tracebacks of input errors.
"""

from __future__ import annotations

from collections.abc import Callable

import gin

from moe_jax import gin_utils
from moe_jax.data import pipeline  # noqa: F401  (registers the data configurables before gin locks)
from moe_jax.methods import mbc_job  # noqa: F401  (the pipeline's Model-Based Clustering, configurable)
from moe_jax.methods import pipeline as phatgoose_pipeline  # noqa: F401  (registers the pipeline job)
from moe_jax.training import loop


@gin.configurable
def job(fn: Callable[..., str] | None = None, gin_config_str: str = "") -> str:
  """What `python -m moe_jax.train` runs: one training stage unless a gin file binds `job.fn`."""
  return (fn or loop.train)(gin_config_str=gin_config_str)


def main(argv: list[str]) -> None:
  gin_utils.setup(argv, __doc__)
  product = gin_utils.run_job(lambda: job(gin_config_str=gin.config_str()))
  print(f"done: {product}")


if __name__ == "__main__":
  gin_utils.main_wrapper(main)
