"""Routers, routed LoRA formulations and expert modules against float64 NumPy oracles (CPU, fp32)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moe_jax.models import reference, routed
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.lora import Linear
from moe_jax.models.routers import Fixed, Phatgoose, Routing, SigmoidGate, Uniform
from moe_jax.models.t5 import Transformer

jax.config.update("jax_enable_x64", False)

RTOL = 1e-5
EXPERT_LEAVES = ("lora_a", "lora_b", "router")
TINY = T5Config(vocab_size=96, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=1, num_decoder_layers=1,
                dtype="float32", name="tiny_test")


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
  return (scale * rng.standard_normal(shape)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("impl", "block"))
def routed_lora(x, a, b, routing, impl, block=None):
  return routed.routed_lora(x, a, b, routing, impl, block)


def lora_inputs(seed: int, lead: tuple[int, ...], num_experts: int, d_in: int = 24, rank: int = 4, d_out: int = 20):
  rng = np.random.default_rng(seed)
  return (rng, normal(rng, *lead, d_in), normal(rng, num_experts, d_in, rank, scale=d_in**-0.5),
          normal(rng, num_experts, rank, d_out))


def check_against_reference(x, a, b, experts, weights, impl, block=None):
  out = routed_lora(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b),
                    Routing(jnp.asarray(experts, jnp.int32), jnp.asarray(weights, jnp.float32)), impl, block)
  assert out.shape == x.shape[:-1] + (b.shape[-1],) and out.dtype == jnp.float32
  k = experts.shape[-1]
  ref = reference.routed_lora(x.reshape(-1, x.shape[-1]), a, b, experts.reshape(-1, k), weights.reshape(-1, k))
  assert rel_err(out.reshape(ref.shape), ref) <= RTOL


# --- routed LoRA formulations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", routed.IMPLS)
@pytest.mark.parametrize("num_experts", [1, 3, 17])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_routing(impl, num_experts, k):
  rng, x, a, b = lora_inputs(num_experts * 10 + k, (37,), num_experts)
  experts = rng.integers(0, num_experts, (37, k))
  check_against_reference(x, a, b, experts, rng.uniform(0.1, 1.0, (37, k)), impl)


@pytest.mark.parametrize("impl", routed.IMPLS)
def test_experts_without_tokens(impl):
  """Only experts 0 and 5 of 17 receive tokens: empty groups must produce no blocks and no stray rows."""
  rng, x, a, b = lora_inputs(1, (29,), 17)
  experts = rng.choice([0, 5], (29, 2))
  check_against_reference(x, a, b, experts, rng.uniform(0.1, 1.0, (29, 2)), impl)


@pytest.mark.parametrize("impl", routed.IMPLS)
def test_same_expert_twice(impl):
  """A token that picks one expert in two slots gets the sum of both slots' contributions."""
  rng, x, a, b = lora_inputs(2, (23,), 17)
  experts = rng.integers(0, 17, (23, 3))
  experts[:, 1] = experts[:, 0]
  experts[::4, 2] = experts[::4, 0]
  check_against_reference(x, a, b, experts, rng.uniform(0.1, 1.0, (23, 3)), impl)


@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("tokens", [1, 33, 67])  # 2, 66, 134 assignments: no multiple of 4 or 64
def test_sorted_block_sizes(block, tokens):
  rng, x, a, b = lora_inputs(tokens + block, (tokens,), 17)
  experts = rng.integers(0, 17, (tokens, 2))
  check_against_reference(x, a, b, experts, rng.uniform(0.1, 1.0, (tokens, 2)), "sorted", block)


@pytest.mark.parametrize("largest", [8, 12, 13, 24, 32, 33, 130])
def test_grid_capacity_branches(largest):
  """`grid` with its largest group filling each capacity (8, 12, 16 (with 13), 24, 32 here) and past the last (the
  `sorted` fallback). Expert 0 takes `largest` assignments (some tokens twice), 16 others share the rest."""
  tokens, k = 67, 2
  assert routed.grid_capacities(tokens, k, 17) == (8, 12, 16, 24, 32)
  rng, x, a, b = lora_inputs(largest, (tokens,), 17)
  experts = np.concatenate([np.zeros(largest, int), np.arange(tokens * k - largest) % 16 + 1])
  rng.shuffle(experts)
  assert np.bincount(experts).max() == largest
  check_against_reference(x, a, b, experts.reshape(tokens, k), rng.uniform(0.1, 1.0, (tokens, k)), "grid")


def test_auto_choice_on_cpu():
  """`auto` on this CPU: the C++ kernel (`ffi`, built here) for float32 inputs. Without float32 inputs (or without
  the kernel): dense for few experts or when the sorted layout is not much smaller than T*E; `grid` for a routed
  layer's batch (512 tokens, top-2 of 166); `sorted` for a decoding step's 8 tokens, where even the smallest grid
  (166 x 8 rows) would pad 9x more than `sorted` (144 rows)."""
  assert jax.default_backend() == "cpu"

  def choice(tokens, k, num_experts, float32=True):
    return routed._auto(tokens, k, num_experts, routed.sorted_block(tokens, k, num_experts), float32)

  assert choice(512, 2, 8) == choice(8, 2, 36) == choice(512, 2, 166) == choice(8, 2, 166) == "ffi"
  assert choice(512, 2, 8, False) == "dense" and choice(8, 2, 36, False) == "dense"
  assert choice(512, 2, 166, False) == "grid" and choice(256, 1, 166, False) == "grid"
  assert choice(8, 2, 166, False) == "sorted"


@pytest.mark.parametrize("impl", routed.IMPLS)
def test_base_is_added(impl):
  """`base` (the layer's own output) comes back plus the update: `ffi` adds into it in place, the others after."""
  rng, x, a, b = lora_inputs(8, (2, 13), 17)
  experts, weights = rng.integers(0, 17, (2, 13, 2)), rng.uniform(0.1, 1.0, (2, 13, 2))
  base = normal(rng, 2, 13, b.shape[-1])
  routing = Routing(jnp.asarray(experts, jnp.int32), jnp.asarray(weights, jnp.float32))
  out = jax.jit(lambda x, a, b, base: routed.routed_lora(x, a, b, routing, impl, base=base))(x, a, b, base)
  ref = base + reference.routed_lora(x.reshape(-1, 24), a, b, experts.reshape(-1, 2),
                                     weights.reshape(-1, 2)).reshape(base.shape)
  assert out.dtype == jnp.float32 and rel_err(out, ref) <= RTOL


@pytest.mark.parametrize("impl", routed.IMPLS)
def test_leading_batch_dims(impl):
  rng, x, a, b = lora_inputs(3, (3, 11), 17)
  experts = rng.integers(0, 17, (3, 11, 2))
  check_against_reference(x, a, b, experts, rng.uniform(0.1, 1.0, (3, 11, 2)), impl)


@pytest.mark.parametrize("impl", routed.IMPLS)
def test_all_experts_routing(impl):
  """`experts=None` (every expert, weights [..., E]) is the same function as listing every expert explicitly."""
  rng, x, a, b = lora_inputs(4, (2, 9), 5)
  weights = rng.uniform(0.1, 1.0, (2, 9, 5))
  out = routed_lora(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), Routing(None, jnp.asarray(weights, jnp.float32)),
                    impl)
  ref = reference.routed_lora(x.reshape(18, -1), a, b, np.tile(np.arange(5), (18, 1)), weights.reshape(18, 5))
  assert rel_err(out.reshape(ref.shape), ref) <= RTOL


def test_bad_impl():
  _, x, a, b = lora_inputs(5, (4,), 3)
  with pytest.raises(ValueError):
    routed.routed_lora(x, a, b, Routing(jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1))), "fast")


@pytest.mark.parametrize("case", ["random", "empty_experts", "repeated_expert"])
def test_gradients_match_dense(case):
  """d/dx, d/da, d/db (and d/d routing weights, which a trained router needs) of <routed_lora, cotangent>."""
  rng, x, a, b = lora_inputs(6, (2, 21), 17)
  experts = rng.integers(0, 17, (2, 21, 2))
  if case == "empty_experts":
    experts = rng.choice([0, 5], (2, 21, 2))
  elif case == "repeated_expert":
    experts[..., 1] = experts[..., 0]
  experts = jnp.asarray(experts, jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (2, 21, 2)), jnp.float32)
  cotangent = jnp.asarray(normal(rng, 2, 21, b.shape[-1]))

  def grads(impl):
    loss = lambda x, a, b, w: jnp.sum(routed.routed_lora(x, a, b, Routing(experts, w), impl) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), weights)

  want = grads("dense")
  for impl in ("sorted", "grid", "ffi", "ragged"):
    for name, got, ref in zip("xabw", grads(impl), want):
      assert rel_err(got, ref) <= RTOL, (impl, name)


# --- routers ------------------------------------------------------------------------------------------------------


def phatgoose_reference(x: np.ndarray, vectors: np.ndarray, k: int):
  """The float64 oracle's ids, and its weights with the 1e-6 renormalisation epsilon divided back out.

  The reference's top/(sum(top) + 1e-6) differs from an exact softmax over the kept scores by 1e-6/sum(top), which
  exceeds 1e-5 relative when the kept probability mass is below 0.1 (k=1 among many experts).
  """
  experts, weights = reference.phatgoose_routing(x.reshape(-1, x.shape[-1]), vectors, k)
  weights = weights / weights.sum(-1, keepdims=True)
  return experts.reshape(x.shape[:-1] + (k,)), weights.reshape(x.shape[:-1] + (k,))


@pytest.mark.parametrize("num_experts,k", [(1, 1), (3, 1), (3, 3), (17, 1), (17, 2), (17, 3)])
def test_phatgoose_matches_reference(num_experts, k):
  rng = np.random.default_rng(num_experts * 10 + k)
  x, vectors = normal(rng, 3, 13, 32, scale=2.0) + 0.5, normal(rng, num_experts, 32)
  routing = jax.jit(Phatgoose(k))(jnp.asarray(x), jnp.asarray(vectors))
  experts, weights = phatgoose_reference(x, vectors, k)
  assert routing.experts.dtype == jnp.int32 and routing.weights.dtype == jnp.float32
  np.testing.assert_array_equal(routing.experts, experts)
  assert rel_err(routing.weights, weights) <= RTOL


def test_phatgoose_identical_vectors_pick_lower_index():
  rng = np.random.default_rng(7)
  vectors = normal(rng, 9, 32)
  vectors[7] = vectors[3]
  x = vectors[3] + normal(rng, 6, 32, scale=0.1)  # experts 3 and 7 score highest, exactly tied
  for k, want in [(1, [3]), (2, [3, 7])]:
    routing = Phatgoose(k)(jnp.asarray(x), jnp.asarray(vectors))
    experts, _ = phatgoose_reference(x, vectors, k)
    np.testing.assert_array_equal(routing.experts, np.tile(want, (6, 1)))
    np.testing.assert_array_equal(experts, np.tile(want, (6, 1)))
  np.testing.assert_allclose(routing.weights, 0.5, rtol=RTOL)


@pytest.mark.parametrize("order,want", [((0, 1, 2, 3), [1, 2]), ((2, 0, 1, 3), [0, 2]), ((3, 0, 2, 1), [2, 3])])
def test_phatgoose_exact_score_tie_picks_lower_index(order, want):
  """Different vectors with exactly equal scores. With eps=0 the standardised x and tied vectors are exactly +-1,
  so both tied scores are exactly 0 whatever the summation order or FMA use; vectors 0 and 3 score below 0."""
  x = np.array([[1, -1, 1, -1], [2, -2, 2, -2]], np.float32)
  vectors = np.array([[-1, 1, -1, 1], [1, 1, -1, -1], [1, -1, -1, 1], [-1, 1, 0, 0]], np.float32)[list(order)]
  for k in (1, 2):
    routing = Phatgoose(k, eps=0.0)(jnp.asarray(x), jnp.asarray(vectors))
    experts, _ = reference.phatgoose_routing(x, vectors, k, eps=0.0)
    np.testing.assert_array_equal(routing.experts, [want[:k]] * 2)
    np.testing.assert_array_equal(experts, [want[:k]] * 2)
  np.testing.assert_array_equal(routing.weights, 0.5)


@pytest.mark.parametrize("k", [0, 4])
def test_phatgoose_bad_k(k):
  with pytest.raises(ValueError):
    Phatgoose(k)(jnp.ones((2, 8)), jnp.ones((3, 8)))


def test_sigmoid_gate():
  rng = np.random.default_rng(8)
  x, vectors = normal(rng, 2, 7, 16), normal(rng, 5, 16)
  routing = SigmoidGate()(jnp.asarray(x), jnp.asarray(vectors))
  assert routing.experts is None
  want = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ vectors.astype(np.float64).T)))
  assert routing.weights.shape == (2, 7, 5) and rel_err(routing.weights, want) <= RTOL


def test_uniform():
  x = jnp.asarray(normal(np.random.default_rng(9), 2, 7, 16))
  routing = Uniform()(x, jnp.ones((6, 16)))
  assert routing.experts is None
  np.testing.assert_array_equal(routing.weights, np.full((2, 7, 6), 1 / 6, np.float32))


def test_fixed():
  x = jnp.asarray(normal(np.random.default_rng(10), 3, 5, 16))
  vectors = jnp.ones((4, 16))
  routing = Fixed(expert=2)(x, vectors)
  np.testing.assert_array_equal(routing.experts, np.full((3, 5, 1), 2))
  np.testing.assert_array_equal(routing.weights, np.ones((3, 5, 1)))
  routing = Fixed(expert=2)(x, vectors, jnp.array([3, 0, 1]))  # routing ids take precedence over `expert`
  np.testing.assert_array_equal(routing.experts, np.broadcast_to(np.array([3, 0, 1])[:, None, None], (3, 5, 1)))
  np.testing.assert_array_equal(routing.weights, np.ones((3, 5, 1)))
  for bad in (Fixed(), Fixed(expert=4), Fixed(expert=-1)):
    with pytest.raises(ValueError):
      bad(x, vectors)


# --- one expert module ----------------------------------------------------------------------------------------------


def random_params(module: nn.Module, *args, seed: int, **kwargs):
  """Fresh normal parameters of the shapes `module.init` would make, lora_b and router vectors included (both are
  zeros at init). Filled from NumPy: compiling flax's initializers for a whole model costs seconds on CPU."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(shapes))
  for path, leaf in flat.items():
    if path[-1] == "scale":
      flat[path] = 1.0 + normal(rng, *leaf.shape, scale=0.1)
    else:
      fan_in = {"kernel": leaf.shape[0], "lora_a": leaf.shape[1], "lora_b": leaf.shape[1]}.get(path[-1], 1)
      flat[path] = normal(rng, *leaf.shape, scale=fan_in**-0.5)
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


@pytest.mark.parametrize("impl", routed.IMPLS)
def test_linear_with_phatgoose_experts(impl):
  num_experts, rank, k = 5, 4, 2
  experts = ExpertConfig(num_experts=num_experts, rank=rank, modules=".*", router=Phatgoose(k), impl=impl)
  layer = Linear(20, ("embed", "mlp"), T5Config(dtype="float32"), experts)
  x = normal(np.random.default_rng(11), 3, 9, 24)
  params = random_params(layer, jnp.asarray(x), seed=12)
  y = jax.jit(layer.apply)(params, jnp.asarray(x))

  p = {name: np.asarray(v, np.float64) for name, v in params["params"].items()}
  x64 = x.reshape(-1, 24).astype(np.float64)
  ids, probs = phatgoose_reference(x64, p["router"], k)
  want = x64 @ p["kernel"]
  for t in range(x64.shape[0]):
    for e, w in zip(ids[t], probs[t]):
      want[t] += w * (x64[t] @ p["lora_a"][e] @ p["lora_b"][e]) / rank
  assert y.dtype == jnp.float32
  assert rel_err(y.reshape(want.shape), want) <= RTOL
  assert rel_err(x64 @ p["kernel"], want) > 1e-2  # the experts' contribution is large enough to be checked


# --- the whole model --------------------------------------------------------------------------------------------------


def model_inputs(seed: int):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(1, TINY.vocab_size, (2, 7)), jnp.int32),
          jnp.asarray(rng.integers(1, TINY.vocab_size, (2, 5)), jnp.int32))


def map_expert_leaves(params, fn):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: fn(v) if p[-1] in EXPERT_LEAVES else v for p, v in flat.items()})


def without_experts(params):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] not in EXPERT_LEAVES})


def logits(experts: ExpertConfig | None, params, enc, dec, routing_ids=None):
  return jax.jit(Transformer(TINY, experts).apply)(params, enc, dec, routing_ids=routing_ids)


def test_fixed_routing_equals_single_expert():
  enc, dec = model_inputs(13)
  routed_cfg = ExpertConfig(num_experts=4, rank=4, router=Fixed(expert=2))
  params = random_params(Transformer(TINY, routed_cfg), enc, dec, seed=14)
  got = logits(routed_cfg, params, enc, dec)
  single = lambda e: logits(ExpertConfig(num_experts=1, rank=4), map_expert_leaves(params, lambda v: v[e:e + 1]),
                            enc, dec)
  want = single(2)
  assert rel_err(got, want) <= RTOL
  assert rel_err(logits(None, without_experts(params), enc, dec), want) > 1e-3  # the expert changes the logits
  # Per-example routing ids: each example sees its own expert.
  got = logits(ExpertConfig(num_experts=4, rank=4, router=Fixed()), params, enc, dec, jnp.array([2, 0]))
  assert rel_err(got[0], want[0]) <= RTOL and rel_err(got[1], single(0)[1]) <= RTOL


def test_zero_lora_b_equals_backbone():
  enc, dec = model_inputs(15)
  cfg = ExpertConfig(num_experts=3, rank=4, router=Phatgoose(2))
  params = random_params(Transformer(TINY, cfg), enc, dec, seed=16)
  flat = traverse_util.flatten_dict(params)
  params = traverse_util.unflatten_dict({p: jnp.zeros_like(v) if p[-1] == "lora_b" else v for p, v in flat.items()})
  np.testing.assert_allclose(logits(cfg, params, enc, dec), logits(None, without_experts(params), enc, dec),
                             rtol=1e-6, atol=1e-6)


def count_expert_modules(cfg: T5Config) -> list[str]:
  tokens = jnp.ones((1, 4), jnp.int32)
  model = Transformer(cfg, ExpertConfig(num_experts=2))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
  return ["/".join(p[:-1]) for p in traverse_util.flatten_dict(nn.unbox(shapes)["params"]) if p[-1] == "lora_a"]


def test_phatgoose_module_count_t5_xl():
  cfg = T5Config(d_model=2048, num_heads=32, d_kv=64, d_ff=5120, num_encoder_layers=24, num_decoder_layers=24,
                 vocab_size=32128)
  assert len(count_expert_modules(cfg)) == 432  # 24 * (4 + 3) encoder + 24 * (4 + 4 + 3) decoder


def test_phatgoose_module_count_relu():
  cfg = T5Config(vocab_size=32, d_model=16, num_heads=2, d_kv=8, d_ff=24, num_encoder_layers=2, num_decoder_layers=3,
                 feed_forward="relu")
  modules = count_expert_modules(cfg)
  assert len(modules) == 2 * (4 + 2) + 3 * (4 + 4 + 2)
  assert sum(m.endswith("/mlp/wi") for m in modules) == 5 and not any("wi_" in m for m in modules)


def test_default_module_regex_matches_a_standalone_layer():
  """The PHATGOOSE regex also matches modules of a layer used on its own (paths like `attention/query`)."""
  from moe_jax.models.lora import has_experts
  cfg = ExpertConfig()
  for path in ("attention/query", "mlp/wi_0", "encoder/layers_3/attention/out", "decoder/layers_0/mlp/wo",
               "decoder/layers_1/encoder_decoder_attention/key"):
    assert has_experts(cfg, path), path
  for path in ("decoder/logits_dense", "encoder/relpos_bias", "my_attention/query", "mlp/wi_0/extra"):
    assert not has_experts(cfg, path), path


@pytest.mark.parametrize("tokens,k,experts,expected", [(256, 2, 166, 8), (16384, 2, 166, 64), (4096, 1, 36, 64),
                                                        (40, 2, 8, 16), (1, 1, 166, 8)])
def test_sorted_block_follows_mean_group_size(tokens, k, experts, expected):
  assert routed.sorted_block(tokens, k, experts) == expected
