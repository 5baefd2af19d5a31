"""The routing CPU kernels (`moe_jax.models.routed_cpu`, C++ through XLA's FFI): the routed LoRA against the float64
oracle at the shapes that take its vector paths (ranks that are multiples of 8, column tails), the top-k against
`jax.lax.top_k`, and their build cache and errors.

Every formulation, this one included, also runs through `tests/test_routing.py`'s oracle tests (rank 4: the
kernel's scalar path)."""

from __future__ import annotations

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.models import reference, routed, routed_cpu, routers
from moe_jax.models.routers import Routing


def run(x, a, b, experts, weights):
  routing = Routing(jnp.asarray(experts, jnp.int32), jnp.asarray(weights, jnp.float32))
  return jax.jit(lambda x, a, b, r: routed.routed_lora(x, a, b, r, "ffi"))(x, a, b, routing)


def inputs(seed, tokens, num_experts, d_in, rank, d_out, k):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, d_in)).astype(np.float32)
  a = (rng.standard_normal((num_experts, d_in, rank)) * d_in**-0.5).astype(np.float32)
  b = rng.standard_normal((num_experts, rank, d_out)).astype(np.float32)
  experts = np.stack([rng.permutation(num_experts)[:k] for _ in range(tokens)])  # distinct experts per token
  return x, a, b, experts, rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)


@pytest.mark.parametrize("rank,d_out,k", [(8, 72, 2), (16, 128, 2), (32, 64, 1), (64, 136, 3), (12, 70, 2)])
def test_matches_float64_reference(rank, d_out, k):
  """Ranks 8-64 take the vector shrink (4 assignments per pass over A[e], groups of 1-7 leave partial passes); rank 12
  the scalar one; d_out 72/70/136 leave a column tail after the 64-column tiles of the expand."""
  x, a, b, experts, weights = inputs(rank + d_out, 45, 9, 40, rank, d_out, k)
  out = run(x, a, b, experts, weights)
  ref = reference.routed_lora(x, a, b, experts, weights)
  assert out.dtype == jnp.float32
  assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) <= 1e-6


def test_large_group_across_threads():
  """One expert with 300 of 600 assignments and 165 experts sharing the rest: groups far larger than a pass and
  uneven work across the pool's threads."""
  rng = np.random.default_rng(3)
  x, a, b, _, weights = inputs(3, 300, 166, 64, 16, 96, 2)
  experts = np.stack([np.zeros(300, int), rng.integers(1, 166, 300)], axis=1)
  out = run(x, a, b, experts, weights)
  ref = reference.routed_lora(x, a, b, experts, weights)
  assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) <= 1e-6


def test_bfloat16_inputs_are_cast():
  x, a, b, experts, weights = inputs(4, 17, 5, 32, 8, 64, 2)
  out = run(jnp.asarray(x, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), experts, weights)
  as_f32 = lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32), np.float64)
  ref = reference.routed_lora(as_f32(x), as_f32(a), as_f32(b), experts, weights)
  assert out.dtype == jnp.float32
  assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) <= 1e-6


def test_expert_id_out_of_range_is_an_error():
  x, a, b, experts, weights = inputs(5, 6, 4, 16, 8, 64, 2)
  experts[2, 1] = 4
  with pytest.raises(Exception, match="expert id is outside"):
    jax.block_until_ready(run(x, a, b, experts, weights))


def test_build_is_cached(monkeypatch, tmp_path):
  """A second build finds the library the first one wrote (same source, compiler and CPU) and compiles nothing."""
  monkeypatch.setenv("MOE_JAX_KERNEL_CACHE", str(tmp_path))
  first = routed_cpu._build()
  assert first.parent == tmp_path and first.exists()
  stamp = first.stat().st_mtime_ns
  calls, real_run = [], subprocess.run
  monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args[1:]) or real_run(args, **kw))
  assert routed_cpu._build() == first and first.stat().st_mtime_ns == stamp
  assert calls == [["--version"]]


def test_without_a_compiler(monkeypatch, tmp_path):
  """No compiler: the build says so in one line, `impl='ffi'` is a ConfigError carrying it, `auto` uses `grid` and
  the routers `jax.lax.top_k`."""
  monkeypatch.setenv("MOE_JAX_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(RuntimeError, match="no C.. compiler 'no-such-compiler-here'"):
    routed_cpu._build()
  monkeypatch.setattr(routed_cpu, "_load", lambda: "no C++ compiler 'no-such-compiler-here' on PATH (set CXX)")
  x, a, b, experts, weights = inputs(6, 4, 3, 16, 8, 64, 1)
  with pytest.raises(ConfigError, match="impl='ffi' needs its C.. kernel"):
    routed.routed_lora(x, a, b, Routing(jnp.asarray(experts, jnp.int32), jnp.asarray(weights)), "ffi")
  assert routed._auto(512, 2, 166, routed.sorted_block(512, 2, 166)) == "grid"
  scores = jnp.asarray(np.random.default_rng(6).standard_normal((5, 9)), jnp.float32)
  assert "ffi_call" not in str(jax.make_jaxpr(lambda s: routers.top_k(s, 2))(scores))


@pytest.mark.parametrize("shape,k", [((256, 166), 2), ((3, 7, 17), 3), ((70, 5), 5), ((130, 9), 1)])
def test_top_k_matches_lax_top_k_with_ties(shape, k):
  """The kernel's indices against `jax.lax.top_k`'s on integer-valued scores (many ties: the lower index first),
  over more rows than one task of the pool (64); values gathered from the scores."""
  scores = jnp.asarray(np.random.default_rng(k).integers(-3, 4, shape), jnp.float32)
  values, indices = jax.jit(lambda s: routers.top_k(s, k))(scores)
  want_values, want_indices = jax.lax.top_k(scores, k)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_array_equal(values, want_values)


def test_top_k_total_order():
  """NaN above +inf, +0 above -0, -NaN below everything: IEEE total order, as `jax.lax.top_k`."""
  scores = jnp.array([[1.0, jnp.nan, 3.0, -0.0, 0.0, jnp.inf, 3.0, -jnp.nan, -jnp.inf]], jnp.float32)
  np.testing.assert_array_equal(routed_cpu.top_k_indices(scores, 9), [[1, 5, 2, 6, 0, 4, 3, 8, 7]])


def test_top_k_gradient_flows_through_values():
  scores = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
  grad = lambda top_k: jax.grad(lambda s: jnp.sum(top_k(s, 2)[0] ** 2))(scores)
  np.testing.assert_allclose(grad(routers.top_k), grad(jax.lax.top_k))
