"""Task-level MoE (moe_jax.models.taskmoe): copies vs plain T5, average routing, the straight-through gradient,
tau schedules, random routes, grouped hard-route compute, and initialisation from a pretrained T5."""

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.models import T5Config, Transformer
from moe_jax.models import taskmoe as tm
from moe_jax.models.attention import RelativePositionBias
from moe_jax.models.t5 import EncoderLayer, RMSNorm

TINY = T5Config(vocab_size=50, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=3,
                dtype="float32")
LAYERS = TINY.num_encoder_layers + TINY.num_decoder_layers
MOE = tm.TaskMoEConfig(num_copies=3, task_dim=8, num_tasks=3)
KEY = jax.random.PRNGKey


def _batch(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, TINY.vocab_size, (batch, 7))
  enc[0, 5:] = 0  # padding
  dec = rng.integers(1, TINY.vocab_size, (batch, 5))
  return jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32), jnp.arange(batch, dtype=jnp.int32) % 3


def _init(moe):
  enc, dec, tasks = _batch()
  init = lambda: tm.TaskMoE(TINY, moe).init({"params": KEY(0), "routing": KEY(1)}, enc, dec, True, tasks)
  return nn.meta.unbox(jax.jit(init)()["params"])


@pytest.fixture(scope="module")
def gumbel_params():
  """Every routing reads these (unused router parameters are ignored), so the model is initialised once."""
  return _init(MOE)


@pytest.fixture(scope="module")
def pretrained():
  enc, dec, _ = _batch()
  return nn.meta.unbox(jax.jit(Transformer(TINY).init)(KEY(4), enc, dec)["params"])


@pytest.fixture(scope="module")
def plain_t5():
  return jax.jit(lambda p, enc, dec: Transformer(TINY).apply({"params": p}, enc, dec))


def _compose(params, choice):
  """A plain T5 tree whose layer l is copy choice[l] (encoder layers first)."""
  def pick(path, leaf):
    if not tm._is_layer(path):
      return leaf
    index = int(path[1].split("_")[1]) + (TINY.num_encoder_layers if path[0] == "decoder" else 0)
    return leaf[choice[index]]

  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: pick(k, v) for k, v in flat.items() if k[0] != "router"})


def test_config_validation():
  with pytest.raises(ConfigError):
    tm.TaskMoEConfig(routing="top2")
  with pytest.raises(ConfigError):
    tm.TaskMoEConfig(num_copies=0)
  with pytest.raises(ConfigError):
    tm.TaskMoEConfig(group_size=0)


def test_copies_are_stacked_on_the_expert_axis():
  enc, dec, tasks = _batch()
  boxed = jax.eval_shape(lambda: tm.TaskMoE(TINY, MOE).init(KEY(0), enc, dec, True, tasks))["params"]
  flat = flax.traverse_util.flatten_dict(boxed, sep="/")
  t5 = flax.traverse_util.flatten_dict(jax.eval_shape(lambda: Transformer(TINY).init(KEY(0), enc, dec))["params"],
                                       sep="/")
  for name, leaf in flat.items():
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, name
    if name.startswith("router/"):
      continue
    if "/layers_" in name:
      assert leaf.names == ("expert",) + t5[name].names and leaf.value.shape == (3,) + t5[name].value.shape, name
    else:
      assert leaf.value.shape == t5[name].value.shape, name
  assert set(flat) - set(t5) == {f"router/{n}/{d}/{w}" for n in tm.TaskRouter(MOE, 2, 3).layer_names
                                 for d in ("hidden", "out") for w in ("kernel", "bias")} | {"router/task_embedding"}
  assert flat["router/task_embedding"].value.shape == (3, 8)
  assert flat["router/encoder_layers_0/out/kernel"].value.shape == (64, 3)


def test_one_hot_route_equals_plain_t5_with_that_copy(gumbel_params, plain_t5):
  """(a) Route everything to copy j, dense (forced routes) and grouped (argmax of a router biased to j)."""
  enc, dec, tasks = _batch()
  model = tm.TaskMoE(TINY, MOE)
  forced = jax.jit(lambda p, r: model.apply({"params": p}, enc, dec, True, tasks, routes=r))
  argmax = jax.jit(lambda p: model.apply({"params": p}, enc, dec, True, tasks, mutable=["intermediates"]))
  for j in range(3):
    ref = plain_t5(tm.extract_copy(gumbel_params, j), enc, dec)
    one_hot = jnp.zeros((4, LAYERS, 3)).at[..., j].set(1.0)
    np.testing.assert_allclose(forced(gumbel_params, one_hot), ref, rtol=1e-5, atol=1e-5)
    biased = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[j].add(1e3) if jax.tree_util.keystr(path).endswith("['out']['bias']") else x,
        gumbel_params)
    logits, inter = argmax(biased)
    np.testing.assert_array_equal(inter["intermediates"]["routes"][0], one_hot)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_grouped_random_routes_equal_per_example_plain_t5(gumbel_params, plain_t5):
  """(a) Grouped compute on mixed per-example, per-layer routes: row b equals the plain T5 assembled from the
  copies its routes pick, and the dense run of the same routes, gradients included; G = 1 too."""
  moe = dataclasses.replace(MOE, routing="random_instance")
  enc, dec, _ = _batch(batch=5)
  targets = jnp.roll(dec, 1, axis=1)

  def run(moe, p):
    logits, inter = tm.TaskMoE(TINY, moe).apply({"params": p}, enc, dec, False, rngs={"routing": KEY(7)},
                                                mutable=["intermediates"])
    xent = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    return xent, (logits, inter["intermediates"]["routes"][0])

  gradient = lambda moe: jax.jit(jax.value_and_grad(lambda p: run(moe, p), has_aux=True))(gumbel_params)
  (_, (logits, routes)), grads = gradient(moe)
  (_, (dense_logits, dense_routes)), dense_grads = gradient(dataclasses.replace(moe, grouped_hard_routes=False))
  np.testing.assert_array_equal(routes, dense_routes)
  np.testing.assert_allclose(logits, dense_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  single_rows = jax.jit(lambda p: run(dataclasses.replace(moe, group_size=1), p)[1][0])(gumbel_params)
  np.testing.assert_allclose(single_rows, logits, rtol=1e-5, atol=1e-5)
  choice = np.argmax(np.asarray(routes), axis=-1)
  assert len({tuple(c) for c in choice}) > 1
  for b in range(5):
    ref = plain_t5(_compose(gumbel_params, choice[b]), enc[b:b + 1], dec[b:b + 1])
    np.testing.assert_allclose(logits[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_group_plan_places_every_example_in_a_block_of_its_copy():
  rng = np.random.default_rng(3)
  for batch, copies, group in [(7, 3, 3), (8, 3, 1), (6, 2, 6)]:
    choice = rng.integers(0, copies, batch)
    plan = tm.group_plan(jnp.asarray(choice), copies, group)
    blocks = plan.block_copy.shape[0]
    assert blocks == -(-batch // group) + copies - 1
    slot = np.asarray(plan.slot)
    assert len(set(slot)) == batch
    np.testing.assert_array_equal(np.asarray(plan.block_copy)[slot // group], choice)
    np.testing.assert_array_equal(np.asarray(plan.source)[slot], np.arange(batch))


def test_average_routing_is_the_mean_of_the_copies_layer_outputs(gumbel_params):
  """(b) The average-routed encoder against one composed by hand from t5's modules, layer by layer."""
  moe = dataclasses.replace(MOE, routing="average")
  enc, _, _ = _batch()
  params = gumbel_params
  ours = jax.jit(lambda p: tm.TaskMoE(TINY, moe).apply({"params": p}, enc, method="encode"))(params)

  def reference(p):
    p = {**p["encoder"], "embedding": p["token_embedder"]["embedding"]}
    bias = RelativePositionBias(TINY.num_heads, TINY.relative_attention_num_buckets,
                                TINY.relative_attention_max_distance, True).apply({"params": p["relpos_bias"]}, 7, 7)
    x = p["embedding"][enc]
    for i in range(TINY.num_encoder_layers):
      outs = [EncoderLayer(TINY).apply({"params": jax.tree.map(lambda a: a[j], p[f"layers_{i}"])}, x, bias,
                                       enc > 0, True) for j in range(3)]
      x = sum(outs) / 3
    return RMSNorm(TINY).apply({"params": p["encoder_norm"]}, x)

  np.testing.assert_allclose(ours, jax.jit(reference)(params), rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_is_that_of_the_soft_surrogate(gumbel_params):
  """(c) ST-Gumbel: forward one-hot; the gradient w.r.t. routers and task embeddings is that of the surrogate
  whose routes are hard0 + probs(theta) - probs(theta0) (same Gumbel noise: equal values and first derivatives at
  theta0), checked by a central finite difference of the surrogate along a random direction."""
  enc, dec, tasks = _batch()
  model = tm.TaskMoE(TINY, MOE)
  targets = jnp.roll(dec, 1, axis=1)
  rngs, step = {"routing": KEY(5)}, 100

  def xent(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  def st_loss(p):
    logits, inter = model.apply({"params": p}, enc, dec, False, tasks, step=step, rngs=rngs,
                                mutable=["intermediates"])
    return xent(logits), inter["intermediates"]["routes"][0]

  def probs(p):
    _, inter = model.apply({"params": p}, tasks, 4, False, step, method="routes", rngs=rngs,
                           mutable=["intermediates"])
    return inter["intermediates"]["router"]["route_probs"][0]

  (loss0, hard0), st_grads = jax.jit(jax.value_and_grad(st_loss, has_aux=True))(gumbel_params)
  np.testing.assert_array_equal(hard0, jax.nn.one_hot(jnp.argmax(hard0, -1), 3))
  probs0 = probs(gumbel_params)
  np.testing.assert_array_equal(jnp.argmax(probs0, -1), jnp.argmax(hard0, -1))

  def surrogate(router):
    p = {**gumbel_params, "router": router}
    return xent(model.apply({"params": p}, enc, dec, False, tasks, routes=hard0 + probs(p) - probs0))

  surrogate = jax.jit(surrogate)
  router0 = gumbel_params["router"]
  np.testing.assert_allclose(surrogate(router0), loss0, rtol=1e-6)
  for name, grad in st_grads["router"].items():
    assert np.abs(jax.tree.leaves(grad)[0]).max() > 0, name
  leaves, treedef = jax.tree.flatten(router0)
  keys = jax.random.split(KEY(9), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  norm = jnp.sqrt(sum(jnp.sum(d ** 2) for d in jax.tree.leaves(direction)))
  direction = jax.tree.map(lambda d: d / norm, direction)
  h = 1e-2
  shifted = lambda s: surrogate(jax.tree.map(lambda x, d: x + s * h * d, router0, direction))
  finite = (shifted(1.0) - shifted(-1.0)) / (2 * h)
  analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(st_grads["router"]), jax.tree.leaves(direction)))
  assert abs(float(analytic)) > 1e-3
  np.testing.assert_allclose(finite, analytic, rtol=5e-3)


def test_temperature_schedules():
  """(d) tau = max(2 exp(-3e-4 step), 0.1) and max(300 exp(-1e-4 step), 1); no step = the floor."""
  for step, want in [(0, 2.0), (1000, 2 * np.exp(-0.3)), (5000, 2 * np.exp(-1.5)), (10_000, 0.1), (10 ** 6, 0.1)]:
    np.testing.assert_allclose(tm.gumbel_temperature(step), want, rtol=1e-6)
  for step, want in [(0, 300.0), (1000, 300 * np.exp(-0.1)), (10_000, 300 * np.exp(-1.0)), (60_000, 1.0)]:
    np.testing.assert_allclose(tm.softmax_temperature(step), want, rtol=1e-6)
  assert float(tm.gumbel_temperature(None)) == pytest.approx(0.1) and float(tm.softmax_temperature(None)) == 1.0
  np.testing.assert_allclose(jax.jit(tm.gumbel_temperature)(jnp.int32(1000)), 2 * np.exp(-0.3), rtol=1e-6)


def test_random_routes():
  """(e) Task-level random routes: one fixed route per task, whatever the rng; instance-level: per example and
  per rng."""
  tasks = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
  table = tm.random_task_table(dataclasses.replace(MOE, routing="random_task"), LAYERS)
  for trainable in (False, True):
    moe = dataclasses.replace(MOE, routing="random_task", train_random_task_routes=trainable)
    params = {"router": tm.init_router(moe, TINY.num_encoder_layers, TINY.num_decoder_layers, KEY(0))}
    routes = lambda key: tm.TaskMoE(TINY, moe).apply({"params": params}, tasks, 6, False, method="routes",
                                                     rngs={"routing": key})
    np.testing.assert_array_equal(routes(KEY(0)), routes(KEY(1)))
    np.testing.assert_array_equal(routes(KEY(0)), table[np.asarray(tasks)])
    assert ("task_routes" in params["router"]) == trainable
  assert not np.array_equal(table[0], table[1]) or not np.array_equal(table[1], table[2])
  np.testing.assert_array_equal(table.sum(-1), 1.0)

  moe = dataclasses.replace(MOE, routing="random_instance")
  routes = lambda key: np.asarray(tm.TaskMoE(TINY, moe).apply({}, None, 16, True, method="routes",
                                                              rngs={"routing": key}))
  first, again, other = routes(KEY(0)), routes(KEY(0)), routes(KEY(1))
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first.sum(-1), 1.0)
  assert not np.array_equal(first, other)
  assert len({row.tobytes() for row in first}) > 1
  with pytest.raises(ValueError, match="rngs"):
    tm.TaskMoE(TINY, moe).apply({}, None, 2, True, method="routes")


def test_trainable_random_task_routes_get_gradients(gumbel_params):
  moe = dataclasses.replace(MOE, routing="random_task", train_random_task_routes=True)
  enc, dec, tasks = _batch()
  params = {**gumbel_params, "router": tm.init_router(moe, TINY.num_encoder_layers, TINY.num_decoder_layers, KEY(0))}
  grads = jax.jit(jax.grad(lambda p: jnp.mean(tm.TaskMoE(TINY, moe).apply({"params": p}, enc, dec, False,
                                                                          tasks) ** 2)))(params)
  assert np.abs(grads["router"]["task_routes"][np.asarray(tasks)]).max() > 0


@pytest.mark.parametrize("routing,deterministic", [("gumbel", True), ("gumbel", False), ("softmax", False),
                                                   ("average", True), ("random_instance", False),
                                                   ("random_task", True)])
def test_expand_pretrained_at_zero_noise_is_the_pretrained_t5(pretrained, plain_t5, routing, deterministic):
  """(f) Identical copies: any mixture of them is the plain T5, grouped (hard routes without a gradient) or dense,
  sampled in training or deterministic at evaluation."""
  enc, dec, tasks = _batch()
  moe = dataclasses.replace(MOE, routing=routing, noise_std=0.0)
  params = tm.expand_pretrained(pretrained, moe, KEY(5))
  shapes = jax.eval_shape(lambda: tm.TaskMoE(TINY, moe).init({"params": KEY(0), "routing": KEY(1)}, enc, dec,
                                                             True, tasks))
  assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(shapes["params"]))
  logits = jax.jit(lambda p: tm.TaskMoE(TINY, moe).apply({"params": p}, enc, dec, deterministic, tasks, step=50,
                                                         rngs={"routing": KEY(6)}))(params)
  np.testing.assert_allclose(logits, plain_t5(pretrained, enc, dec), rtol=1e-5, atol=1e-5)


def test_expand_pretrained_noise_and_task_embeddings(pretrained, tmp_path):
  t5 = pretrained
  table = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  params = tm.expand_pretrained(t5, MOE, KEY(5), task_embeddings=table)
  np.testing.assert_array_equal(params["router"]["task_embedding"], table)
  kernel = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert not np.array_equal(kernel[0], kernel[1])
  np.testing.assert_allclose(kernel, np.broadcast_to(t5["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"],
                                                     kernel.shape), rtol=0, atol=1e-7)
  np.testing.assert_array_equal(params["token_embedder"]["embedding"], t5["token_embedder"]["embedding"])
  np.testing.assert_array_equal(tm.extract_copy(tm.expand_pretrained(t5, dataclasses.replace(MOE, noise_std=0.0),
                                                                     KEY(5)), 2)["decoder"]["layers_1"]["mlp"]
                                ["wo"]["kernel"], t5["decoder"]["layers_1"]["mlp"]["wo"]["kernel"])
  path = tmp_path / "task_vecs.npy"
  np.save(path, table)
  from_file = tm.init_router(dataclasses.replace(MOE, task_embedding_file=str(path)), 2, 3, KEY(0))
  np.testing.assert_array_equal(from_file["task_embedding"], table)
  with pytest.raises(ConfigError):
    tm.expand_pretrained(t5, MOE, KEY(5), task_embeddings=table[:2])


def test_training_gumbel_needs_a_step_and_eval_is_deterministic(gumbel_params):
  enc, dec, tasks = _batch()
  model = tm.TaskMoE(TINY, MOE)
  with pytest.raises(ValueError, match="step"):
    model.apply({"params": gumbel_params}, tasks, 4, False, method="routes", rngs={"routing": KEY(0)})
  evaluate = lambda moe, key: tm.TaskMoE(TINY, moe).apply({"params": gumbel_params}, tasks, 4, True,
                                                          method="routes", rngs={"routing": key})
  np.testing.assert_array_equal(evaluate(MOE, KEY(0)), evaluate(MOE, KEY(1)))
  sampled = dataclasses.replace(MOE, gumbel_at_eval=True)
  draws = {np.asarray(evaluate(sampled, KEY(k))).tobytes() for k in range(4)}
  assert len(draws) > 1
