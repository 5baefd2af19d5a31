"""Routing on CPU as C++ XLA FFI kernels (`csrc/routing_cpu.cc`), built on first use: the routed LoRA forward and
the routers' top-k.

Why: on XLA:CPU the pure-XLA formulations spend most of a routed module in the shrink's batched matmul over ~166
small expert groups, which XLA runs on one thread while reading A at a fraction of memory bandwidth. The kernel
sorts the assignments by expert itself, streams each expert's A and B once per group on every thread of XLA's
intra-op pool, and pads nothing. It accumulates in float32 and keeps the rank-r intermediate in float32. XLA:CPU's
TopK, for its part, took as long per module as that whole kernel (~0.1 ms for top-2 of 166 over 256 tokens).

The source ships with the package and is compiled with the machine's C++17 compiler (`$CXX`, default `c++`) against
the FFI headers that jaxlib ships (`jax.ffi.include_dir()`), at `-O3 -march=native`, into a cache keyed by the
source, the compiler, jax's version and the CPU's flags (`$MOE_JAX_KERNEL_CACHE`, default
`~/.cache/moe_jax/kernels`): the first process on a machine pays ~2 s, later ones load the library. Where no
compiler works, `available()` is False (the reason is logged once): `routed.routed_lora`'s `auto` uses `grid` and
the routers `jax.lax.top_k`.

The gradient (`jax.custom_vjp`) is `grid`'s: training tunes one expert or one gate (no routed backward), so the
backward only has to be right, not fast. The kernels have no sharding rule: on a mesh of several CPU devices XLA's
partitioner hands them whole operands (correct; CPU meshes serve tests here, accelerators take other paths).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError
from moe_jax.models.routers import Routing

Array = jax.Array

SOURCE = Path(__file__).with_name("csrc") / "routing_cpu.cc"
TARGETS = {"moe_jax_routed_lora_cpu": "MoeJaxRoutedLoraCpu", "moe_jax_top_k_cpu": "MoeJaxTopKCpu"}  # name: symbol
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
  return Path(os.environ.get("MOE_JAX_KERNEL_CACHE") or Path.home() / ".cache" / "moe_jax" / "kernels")


def _compiler() -> str:
  return os.environ.get("CXX") or "c++"


def _cpu_flags() -> str:
  """The CPU's feature flags (`-march=native` code must not be loaded on a CPU without them)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def _build() -> Path:
  """Compiles the kernel into the cache unless it is there; returns the shared library's path. Raises
  `RuntimeError` with the compiler's message when it cannot be built."""
  compiler = shutil.which(_compiler())
  if compiler is None:
    raise RuntimeError(f"no C++ compiler {_compiler()!r} on PATH (set CXX)")
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), jax.__version__,
                                  platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  path = cache_dir() / f"routing_cpu-{key}.so"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  log.info("compiling the routing CPU kernels into %s (once per machine)", path)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same filesystem: the rename below is atomic
    built = Path(tmp) / path.name
    result = subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
    os.replace(built, path)
  return path


@functools.cache
def _load() -> str | None:
  """Builds (or finds) the kernels and registers them with XLA; None when ready, else why they are not."""
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (RuntimeError, OSError) as e:
    log.warning("routing CPU kernels unavailable (routed LoRA uses `grid`, routers jax.lax.top_k): %s", e)
    return str(e)
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return None


def available() -> bool:
  """Whether the kernels are built and registered (building them on the first call)."""
  return _load() is None


def top_k_indices(scores: Array, k: int) -> Array:
  """The indices of `jax.lax.top_k(scores, k)` for float32 scores [..., n] (the same order: IEEE total order, ties
  to the lower index), from the C++ kernel; int32 [..., k]. Call only where `available()`."""
  rows = jax.lax.stop_gradient(scores).reshape(-1, scores.shape[-1])  # integer indices: no gradient to pass
  out = jax.ShapeDtypeStruct((rows.shape[0], k), jnp.int32)
  indices = jax.ffi.ffi_call("moe_jax_top_k_cpu", out, vmap_method="sequential")(rows)
  return indices.reshape(scores.shape[:-1] + (k,))


def routed_lora_cpu(x: Array, a: Array, b: Array, experts: Array, weights: Array, block: int,
                    base: Array | None = None) -> Array:
  """x [T, d_in], a [E, d_in, r], b [E, r, d_out], experts/weights [T, k] -> float32 [T, d_out], plus `base`
  [T, d_out] when given (the kernel adds into it in place: no pass of its own over the output). Inputs are cast to
  float32. `block` is the block of `sorted`, used by the backward (`grid`'s, which may fall back to it)."""
  reason = _load()
  if reason is not None:
    raise ConfigError(f"routed LoRA impl='ffi' needs its C++ kernel, which could not be built: {reason}")
  base = jnp.zeros((x.shape[0], b.shape[-1]), jnp.float32) if base is None else base.astype(jnp.float32)
  return _routed(x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), experts.astype(jnp.int32),
                 weights.astype(jnp.float32), base, block)


def _forward(x: Array, a: Array, b: Array, experts: Array, weights: Array, base: Array) -> Array:
  call = jax.ffi.ffi_call("moe_jax_routed_lora_cpu", jax.ShapeDtypeStruct(base.shape, jnp.float32),
                          vmap_method="sequential", input_output_aliases={5: 0})
  return call(x, a, b, experts, weights, base)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _routed(x, a, b, experts, weights, base, block):
  return _forward(x, a, b, experts, weights, base)


def _routed_fwd(x, a, b, experts, weights, base, block):
  return _forward(x, a, b, experts, weights, base), (x, a, b, experts, weights)


def _routed_bwd(block, residuals, cotangent):
  from moe_jax.models import routed  # pylint: disable=g-import-not-at-top  (routed imports this module lazily)
  x, a, b, experts, weights = residuals
  grid = lambda x, a, b, weights: routed.routed_lora(x, a, b, Routing(experts, weights), "grid", block)
  dx, da, db, dweights = jax.vjp(grid, x, a, b, weights)[1](cotangent)
  return dx, da, db, None, dweights, cotangent


_routed.defvjp(_routed_fwd, _routed_bwd)
