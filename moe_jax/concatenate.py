"""Concatenate expert files into one MoE file: `python -m moe_jax.concatenate --gin_file=gin/concatenate.gin
--gin.concatenate.expert_files="['runs/gate_a', 'runs/gate_b']" --gin.concatenate.output="'runs/moe.safetensors'"`.

See `moe_jax.methods.concatenate.concatenate` for the bindings (`append_to` adds experts to an existing MoE file).
Set MOE_JAX_DEBUG=1 to see full tracebacks of input errors.
"""

from __future__ import annotations

from moe_jax import gin_utils
from moe_jax.methods import concatenate as concat


def main(argv: list[str]) -> None:
  gin_utils.setup(argv, __doc__)
  product = gin_utils.run_job(concat.concatenate)
  print(f"done: {product}")


if __name__ == "__main__":
  gin_utils.main_wrapper(main)
