"""Evaluate: `python -m moe_jax.evaluate --gin_file=gin/models/tiny.gin --gin_file=gin/evaluate.gin [--gin.X=V]`.

See `moe_jax.evaluation.runner.evaluate` for the bindings. Set MOE_JAX_DEBUG=1 for full tracebacks of input errors.
"""

from __future__ import annotations

import gin

from moe_jax import gin_utils
from moe_jax.data import pipeline  # noqa: F401  (registers the data configurables before gin locks)
from moe_jax.evaluation import runner
from moe_jax.methods import pipeline as methods_pipeline  # noqa: F401  (evaluate.methods: configurables before gin locks)


def main(argv: list[str]) -> None:
  gin_utils.setup(argv, __doc__)
  metrics = gin_utils.run_job(lambda: runner.evaluate(gin_config_str=gin.config_str()))
  what = "method(s)" if gin.get_bindings("evaluate").get("methods") else "task(s)"
  print(f"evaluated {len(metrics)} {what}: see {gin.query_parameter('evaluate.output_dir')}/results.md")


if __name__ == "__main__":
  gin_utils.main_wrapper(main)
