"""Arrow: prototypes from the LoRA factors, the Arrow router and an Arrow-routed module, against float64 NumPy."""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moe_jax.methods.arrow import arrow_prototypes, arrow_routers
from moe_jax.models import experts as ex
from moe_jax.models import reference, routed
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.lora import Linear
from moe_jax.models.routers import Arrow

jax.config.update("jax_enable_x64", False)

RTOL = 1e-5
COS_TOL = 1e-6  # 1 - |cos| between a prototype and the float64 top singular vector


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def full_svd_top(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(top left singular vectors [E, d_in], singular values [E, min(d_in, d_out)]) of the full A_i B_i, float64."""
  tops, values = [], []
  for a_i, b_i in zip(a.astype(np.float64), b.astype(np.float64)):
    u, s, _ = np.linalg.svd(a_i @ b_i)
    tops.append(u[:, 0])
    values.append(s)
  return np.stack(tops), np.stack(values)


def check_prototypes(protos: np.ndarray, a: np.ndarray, b: np.ndarray, cos_tol: float) -> float:
  """Asserts unit rows, the sign convention and |cos| with the full SVD's top vector; returns max 1 - |cos|."""
  want, s = full_svd_top(a, b)
  assert np.all((s[:, 0] - s[:, 1]) / s[:, 0] > 1e-3)  # a separated top singular value: the vector is defined
  protos = np.asarray(protos, np.float64)
  np.testing.assert_allclose(np.linalg.norm(protos, axis=-1), 1.0, rtol=1e-6)
  assert np.all(protos[np.arange(len(protos)), np.argmax(np.abs(protos), -1)] > 0)
  worst = float(np.max(1.0 - np.abs(np.sum(protos * want, -1))))
  assert worst <= cos_tol, worst
  return worst


# --- prototypes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,d_in,rank,d_out", [
    (3, 16, 4, 12),   # d_in > d_out
    (2, 8, 6, 3),     # r > d_out
    (2, 5, 7, 9),     # r > d_in, d_in < d_out
    (4, 20, 1, 6),    # r = 1
    (1, 6, 3, 24),    # d_in < d_out, one expert
    (5, 24, 24, 24),  # full rank, square
])
def test_prototypes_match_full_svd(num_experts, d_in, rank, d_out):
  rng = np.random.default_rng(d_in * 100 + rank * 10 + d_out)
  a, b = normal(rng, num_experts, d_in, rank), normal(rng, num_experts, rank, d_out)
  protos = arrow_prototypes(a, b)
  assert isinstance(protos, np.ndarray) and protos.shape == (num_experts, d_in) and protos.dtype == np.float32
  check_prototypes(protos, a, b, COS_TOL)
  protos64 = arrow_prototypes(a.astype(np.float64), b.astype(np.float64))
  assert protos64.dtype == np.float64
  check_prototypes(protos64, a, b, 1e-12)


def test_prototypes_of_jax_arrays_are_jax_arrays():
  rng = np.random.default_rng(1)
  a, b = normal(rng, 3, 10, 4), normal(rng, 3, 4, 7)
  protos = arrow_prototypes(jnp.asarray(a), jnp.asarray(b))
  assert isinstance(protos, jax.Array) and protos.dtype == jnp.float32
  np.testing.assert_array_equal(protos, arrow_prototypes(a, b))


def test_rank_deficient_and_known_answers():
  """Expert 0: A = 3 e_2 (r=1 padded to r=3 with zero columns) -> e_2 exactly. Expert 1: A's columns repeat
  (rank 1) and B has rank 2. Expert 2: B = 0 (a fresh expert), no direction -> a zero row. Expert 3: the update
  stretches -e_4 most: the sign convention makes it +e_4."""
  rng = np.random.default_rng(2)
  d_in, rank, d_out = 9, 3, 5
  a, b = normal(rng, 4, d_in, rank), normal(rng, 4, rank, d_out)
  a[0] = 0.0
  a[0, 2, 0] = 3.0
  a[1] = np.repeat(a[1][:, :1], rank, axis=1) * np.array([1.0, -2.0, 0.5], np.float32)
  b[1, 2] = b[1, 0] + b[1, 1]
  b[2] = 0.0
  a[3] = 0.0
  a[3, 4] = [-5.0, 0.0, 0.0]
  a[3, 0] = [0.0, 1.0, 0.0]
  b[3] = np.eye(rank, d_out, dtype=np.float32)
  protos = arrow_prototypes(a, b)
  np.testing.assert_allclose(protos[0], np.eye(d_in)[2], atol=1e-7)
  np.testing.assert_array_equal(protos[2], 0.0)
  np.testing.assert_allclose(protos[3], np.eye(d_in)[4], atol=1e-7)
  want = a[1][:, 0] / np.linalg.norm(a[1][:, 0])  # span(A_1) is one direction
  assert 1.0 - abs(float(np.dot(protos[1], want))) <= COS_TOL
  check_prototypes(protos[1:2], a[1:2], b[1:2], COS_TOL)


def test_prototypes_bad_shapes():
  with pytest.raises(ValueError):
    arrow_prototypes(np.ones((2, 8, 4)), np.ones((2, 3, 5)))
  with pytest.raises(ValueError):
    arrow_prototypes(np.ones((8, 4)), np.ones((4, 5)))


# --- the router ---------------------------------------------------------------------------------------------------


def arrow_reference(x: np.ndarray, vectors: np.ndarray, k: int | None, temperature: float):
  """Float64: scores |x . v_i| / T; stable descending order (ties: lower index first); softmax over the kept k.
  Returns ([T, k] ids, [T, k] weights); k=None keeps all experts in index order."""
  x, vectors = np.asarray(x, np.float64), np.asarray(vectors, np.float64)
  scores = np.abs(x @ vectors.T) / temperature
  if k is None:
    ids = np.tile(np.arange(vectors.shape[0]), (x.shape[0], 1))
  else:
    ids = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  kept = np.take_along_axis(scores, ids, -1)
  weights = np.exp(kept - kept.max(-1, keepdims=True))
  return ids, weights / weights.sum(-1, keepdims=True)


@pytest.mark.parametrize("num_experts,k,temperature", [(1, 1, 1.0), (3, 1, 1.0), (3, 3, 2.0), (17, 2, 1.0),
                                                       (17, 3, 0.5), (6, None, 1.0), (17, None, 3.0)])
def test_arrow_router_matches_reference(num_experts, k, temperature):
  rng = np.random.default_rng(num_experts * 10 + (k or 0))
  x, vectors = normal(rng, 3, 13, 32), normal(rng, num_experts, 32, scale=32**-0.5)
  routing = jax.jit(Arrow(k, temperature))(jnp.asarray(x), jnp.asarray(vectors))
  ids, weights = arrow_reference(x.reshape(-1, 32), vectors, k, temperature)
  assert routing.weights.dtype == jnp.float32 and routing.weights.shape == (3, 13, ids.shape[-1])
  if k is None:
    assert routing.experts is None
  else:
    assert routing.experts.dtype == jnp.int32
    np.testing.assert_array_equal(routing.experts.reshape(ids.shape), ids)
  assert rel_err(routing.weights.reshape(weights.shape), weights) <= RTOL


def test_arrow_sign_blind_tie_picks_lower_index():
  """v_6 = -v_2: the scores tie exactly (negation is exact), and the lower index comes first."""
  rng = np.random.default_rng(3)
  vectors = normal(rng, 8, 16, scale=0.25)
  vectors[6] = -vectors[2]
  x = 4.0 * vectors[6] + normal(rng, 5, 16, scale=0.01)  # experts 2 and 6 score highest
  for k, want in [(1, [2]), (2, [2, 6])]:
    routing = Arrow(k)(jnp.asarray(x), jnp.asarray(vectors))
    np.testing.assert_array_equal(routing.experts, np.tile(want, (5, 1)))
    np.testing.assert_array_equal(arrow_reference(x, vectors, k, 1.0)[0], np.tile(want, (5, 1)))
  np.testing.assert_array_equal(routing.weights, 0.5)


@pytest.mark.parametrize("order,want", [((0, 1, 2, 3), [1, 2]), ((2, 0, 1, 3), [0, 2]), ((3, 0, 2, 1), [2, 3])])
def test_arrow_exact_score_tie_picks_lower_index(order, want):
  """Different prototypes with exactly equal scores |2| and |-2| (integers: exact in any summation order), one
  below them (1) and one at 0."""
  x = np.array([[2, -2, 1, 0], [4, -4, 2, 0]], np.float32)
  vectors = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], np.float32)[list(order)]
  for k in (1, 2):
    routing = Arrow(k)(jnp.asarray(x), jnp.asarray(vectors))
    np.testing.assert_array_equal(routing.experts, [want[:k]] * 2)
    np.testing.assert_array_equal(arrow_reference(x, vectors, k, 1.0)[0], [want[:k]] * 2)
  np.testing.assert_array_equal(routing.weights, 0.5)


@pytest.mark.parametrize("router", [Arrow(0), Arrow(4), Arrow(2, 0.0), Arrow(None, -1.0)])
def test_arrow_bad_settings(router):
  with pytest.raises(ValueError):
    router(jnp.ones((2, 8)), jnp.ones((3, 8)))


def test_arrow_is_gin_configurable():
  gin.clear_config()
  try:
    gin.parse_config("ExpertConfig.router = @Arrow()\nArrow.k = None\nArrow.temperature = 0.5")
    assert ExpertConfig().router == Arrow(None, 0.5)
  finally:
    gin.clear_config()


# --- one expert module ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, None])
@pytest.mark.parametrize("impl", routed.IMPLS)
def test_linear_with_arrow_experts(impl, k):
  """Linear with 5 experts whose router vectors are their Arrow prototypes == x W + sum_k w_k x A_k B_k / r."""
  num_experts, rank, d_in, d_out = 5, 4, 24, 20
  layer = Linear(d_out, ("embed", "mlp"), T5Config(dtype="float32"),
                 ExpertConfig(num_experts=num_experts, rank=rank, modules=".*", router=Arrow(k, 0.5), impl=impl))
  rng = np.random.default_rng(11)
  x = normal(rng, 3, 9, d_in)
  a, b = normal(rng, num_experts, d_in, rank, scale=d_in**-0.5), normal(rng, num_experts, rank, d_out)
  p = {"kernel": normal(rng, d_in, d_out, scale=d_in**-0.5), "lora_a": a, "lora_b": b,
       "router": arrow_prototypes(a, b)}
  shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.asarray(x)))
  assert {name: v.shape for name, v in traverse_util.flatten_dict(nn.unbox(shapes)["params"], sep="/").items()} == {
      name: v.shape for name, v in p.items()}
  y = jax.jit(layer.apply)({"params": jax.tree.map(jnp.asarray, p)}, jnp.asarray(x))

  x64 = x.reshape(-1, d_in).astype(np.float64)
  ids, weights = arrow_reference(x64, p["router"], k, 0.5)
  want = x64 @ p["kernel"].astype(np.float64) + reference.routed_lora(x64, a, b, ids, weights / rank)
  assert y.dtype == jnp.float32
  assert rel_err(y.reshape(want.shape), want) <= RTOL
  assert rel_err(x64 @ p["kernel"], want) > 1e-2  # the experts' contribution is large enough to be checked
  if k is not None:  # the routing is not trivial: tokens pick different experts
    assert len({tuple(row) for row in ids}) > 1


# --- router trees -------------------------------------------------------------------------------------------------


def test_arrow_routers_of_a_tree():
  """2 modules (different shapes, one in bf16 JAX arrays as a loaded checkpoint may be), 3 experts each."""
  rng = np.random.default_rng(12)
  query = {"kernel": normal(rng, 16, 8), "lora_a": normal(rng, 3, 16, 4), "lora_b": normal(rng, 3, 4, 8),
           "router": np.zeros((3, 16), np.float32)}
  wi = {"kernel": normal(rng, 16, 40), "lora_a": jnp.asarray(normal(rng, 3, 16, 4), jnp.bfloat16),
        "lora_b": jnp.asarray(normal(rng, 3, 4, 40), jnp.bfloat16)}
  tree = {"encoder": {"layers_0": {"attention": {"query": query}, "mlp": {"wi": wi}}}}
  routers = arrow_routers(tree)
  flat = traverse_util.flatten_dict(routers, sep="/")
  assert sorted(flat) == ["encoder/layers_0/attention/query/router", "encoder/layers_0/mlp/wi/router"]
  for path, module in (("encoder/layers_0/attention/query/router", query), ("encoder/layers_0/mlp/wi/router", wi)):
    got = flat[path]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, 16)
    a, b = np.asarray(module["lora_a"], np.float32), np.asarray(module["lora_b"], np.float32)
    np.testing.assert_array_equal(got, arrow_prototypes(a, b))
    check_prototypes(got, a, b, COS_TOL)
  merged = traverse_util.flatten_dict(ex.merge(tree, routers), sep="/")
  np.testing.assert_array_equal(merged["encoder/layers_0/mlp/wi/router"], flat["encoder/layers_0/mlp/wi/router"])
  np.testing.assert_array_equal(merged["encoder/layers_0/attention/query/kernel"], query["kernel"])
  with pytest.raises(ValueError):
    arrow_routers({"query": {"kernel": query["kernel"]}})
