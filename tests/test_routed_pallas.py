"""The Pallas routed LoRA kernels (interpret mode on CPU) against the float64 NumPy oracle, and their GPU lowering."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.models import reference, routed_pallas

jax.config.update("jax_enable_x64", False)

RTOL = 1e-5


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def lora_inputs(seed: int, tokens: int, num_experts: int, d_in: int = 24, rank: int = 4, d_out: int = 40):
  """Shapes that are not multiples of any block: d_in, d_out and r all get padded."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, d_in)).astype(np.float32)
  a = (rng.standard_normal((num_experts, d_in, rank)) * d_in**-0.5).astype(np.float32)
  return rng, x, a, rng.standard_normal((num_experts, rank, d_out)).astype(np.float32)


def check(x, a, b, experts, weights, dtype=jnp.float32, **blocks):
  """Runs the kernels on `dtype` inputs; the oracle sees the same (rounded) values in float64."""
  x, a, b = (jnp.asarray(v, dtype) for v in (x, a, b))
  out = routed_pallas.routed_lora_pallas(x, a, b, jnp.asarray(experts, jnp.int32), jnp.asarray(weights, jnp.float32),
                                         interpret=True, **blocks)
  assert out.shape == (x.shape[0], b.shape[-1]) and out.dtype == jnp.float32
  ref = reference.routed_lora(*(np.asarray(v.astype(jnp.float32)) for v in (x, a, b)), np.asarray(experts),
                              np.asarray(weights, np.float32))
  return rel_err(out, ref)


@pytest.mark.parametrize("num_experts,k,tokens", [(1, 1, 7), (1, 2, 9), (5, 1, 21), (5, 2, 21), (5, 3, 6)])
def test_random_routing(num_experts, k, tokens):
  rng, x, a, b = lora_inputs(num_experts * 10 + k, tokens, num_experts)
  experts = rng.integers(0, num_experts, (tokens, k))
  assert check(x, a, b, experts, rng.uniform(0.1, 1.0, (tokens, k))) <= RTOL


def test_many_experts_few_tokens():
  """166 experts, 10 assignments: most groups are empty and most tiles lie past the last group."""
  rng, x, a, b = lora_inputs(1, 5, 166)
  experts = rng.choice(166, (5, 2), replace=False)
  assert check(x, a, b, experts, rng.uniform(0.1, 1.0, (5, 2))) <= RTOL


def test_unequal_groups():
  """Groups of 37, 1, 16 (exactly a tile) and 0 rows: tiles split mid-group, a lone row, an empty expert."""
  rng, x, a, b = lora_inputs(2, 27, 4)
  experts = np.array([0] * 37 + [2] + [3] * 16)
  rng.shuffle(experts)
  assert check(x, a, b, experts.reshape(27, 2), rng.uniform(0.1, 1.0, (27, 2))) <= RTOL


def test_same_expert_twice():
  """A token that picks one expert in several slots gets the sum of the slots' contributions."""
  rng, x, a, b = lora_inputs(3, 11, 6)
  experts = rng.integers(0, 6, (11, 3))
  experts[:, 1] = experts[:, 0]
  experts[::3, 2] = experts[::3, 0]
  assert check(x, a, b, experts, rng.uniform(0.1, 1.0, (11, 3))) <= RTOL


def test_zero_weights_contribute_nothing():
  """A slot with weight 0 adds nothing, also when its expert's other rows do."""
  rng, x, a, b = lora_inputs(4, 8, 3)
  experts = rng.integers(0, 3, (8, 2))
  weights = rng.uniform(0.1, 1.0, (8, 2))
  weights[:, 1] = 0.0
  assert check(x, a, b, experts, weights) <= RTOL
  assert check(x, a, b, experts[:, :1], weights[:, :1]) <= RTOL


def test_several_blocks_per_dimension():
  """16-wide feature blocks: d_in=40 takes three accumulation steps, d_out=40 three expand blocks; 32-row tiles."""
  rng, x, a, b = lora_inputs(5, 19, 5, d_in=40, rank=8)
  experts = rng.integers(0, 5, (19, 2))
  assert check(x, a, b, experts, rng.uniform(0.1, 1.0, (19, 2)), block_tokens=32, block_features=16) <= RTOL


def test_bfloat16_inputs_accumulate_in_float32():
  """bf16 x, A, B: against the oracle on the same bf16 values, fp32 accumulation and a fp32 rank-r intermediate
  stay at fp32 accuracy (a bf16 intermediate would be off by ~1e-3). d_in=256 makes the sums long."""
  rng, x, a, b = lora_inputs(6, 13, 5, d_in=256)
  experts = rng.integers(0, 5, (13, 2))
  assert check(x, a, b, experts, rng.uniform(0.1, 1.0, (13, 2)), dtype=jnp.bfloat16) <= RTOL


@pytest.mark.parametrize("blocks", [{"block_tokens": 8}, {"block_tokens": 24}, {"block_features": 64 + 32}])
def test_bad_blocks(blocks):
  _, x, a, b = lora_inputs(7, 4, 2)
  with pytest.raises(ConfigError):
    routed_pallas.routed_lora_pallas(x, a, b, jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1)), interpret=True, **blocks)


def test_unavailable_on_cpu():
  assert routed_pallas.available() == (jax.default_backend() == "gpu")


@pytest.mark.skipif(routed_pallas.pltriton is None, reason="this jax has no Pallas Triton lowering")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton(dtype):
  """Both kernels lower to Triton IR for CUDA (no GPU needed for this step): block sizes are powers of two, every
  primitive has a Triton rule. Compiling that IR to PTX and running it needs a GPU and is not checked here."""
  args = [jax.ShapeDtypeStruct(s, dtype) for s in ((13, 24), (166, 24, 4), (166, 4, 40))]
  args += [jax.ShapeDtypeStruct((13, 2), jnp.int32), jax.ShapeDtypeStruct((13, 2), jnp.float32)]
  kernel = functools.partial(routed_pallas.routed_lora_pallas, interpret=False)
  try:
    text = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:  # jaxlib > 0.10.2 compiles the IR to PTX while lowering, with the CUDA plugin's Triton.
    if "Triton compilation handler" not in str(e):
      raise
    pytest.skip("lowering compiles with the CUDA plugin's Triton, which is not installed")
  assert "routed_lora_shrink" in text and "routed_lora_expand" in text
