"""Multi-process runs under JAX's own distributed runtime: one process per host (TPU VM worker, SLURM task, MPI rank).

Every entry point calls `initialize` before JAX touches a device, so the same command runs on one host or many: with
`--coordinator_address/--num_processes/--process_id`, with MOE_JAX_DISTRIBUTED=1 (JAX detects Cloud TPU, SLURM and
Open MPI clusters itself), or when SLURM or Open MPI start more than one task. After it, `jax.devices()` lists every
process's devices, the mesh spans them all, and each process feeds its own rows of the batch.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import jax

ENV_FLAG = "MOE_JAX_DISTRIBUTED"
# Launchers that start one task per host and tell it the task count; JAX reads the rest of their environment.
_TASK_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def add_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (default: detected; see moe_jax.distributed)")
  group.add_argument("--coordinator_address", default=None, help="host:port of process 0's coordinator")
  group.add_argument("--num_processes", type=int, default=None, help="processes in the job (one per host)")
  group.add_argument("--process_id", type=int, default=None, help="this process's index in [0, num_processes)")


def wanted(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this run is one process of several: explicit flags, MOE_JAX_DISTRIBUTED (1 or 0 wins over detection),
  or a SLURM / Open MPI launch of more than one task."""
  if any(v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)):
    return True
  if environ.get(ENV_FLAG, "") != "":
    return environ[ENV_FLAG] not in ("0", "false", "False")
  return any(int(environ.get(name, "1") or 1) > 1 for name in _TASK_COUNTS)


def initialize(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` when `wanted`; unset flags are left to JAX's cluster detection."""
  if not wanted(args) or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only setting: collectives across processes
  jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                             process_id=args.process_id)
  print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} devices", flush=True)
