"""The task-level MoE through the repo's machinery (moe_jax/taskmoe, the TaskMoE hooks of the loop, optimizer,
interface and data pipeline): training stages, the stage-2 reset, task ids from the data to the model, task
embeddings against independent computations, routing plots and the demo job end to end (shrunk)."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks  # noqa: F401  (registers the synthetic tasks)
from moe_jax.data import pipeline
from moe_jax.models import experts as ex
from moe_jax.models import interface
from moe_jax.models import taskmoe as tm
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.taskmoe import analysis, embeddings, stages
from moe_jax.taskmoe import checkpoint as tckpt
from moe_jax.taskmoe import tasks as task_ids
from moe_jax.training import loop
from moe_jax.training import partitioning as part
from moe_jax.training.train_step import train_step_fn, weighted_cross_entropy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = T5Config(vocab_size=264, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_taskmoe_test")
LENGTHS = {"inputs": 48, "targets": 12}
TASKS = ("synthetic_reverse", "synthetic_uppercase")
MOE = tm.TaskMoEConfig(num_copies=2, task_dim=4, num_tasks=2, router_hidden=4, routing="gumbel")


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _train(model_dir, stage, steps, moe, **kwargs):
  return loop.train(model_dir=str(model_dir), mixture_or_task_name=task_ids.with_task_ids(TASKS, "taskmoe_test"),
                    stage=stage, model_config=TINY, feature_lengths=LENGTHS, batch_size=8, total_steps=steps,
                    save_every=100, log_every=1, taskmoe=moe, **kwargs)


_choice_scores = jax.jit(interface.choice_scores, static_argnums=0)


def _losses(model_dir):
  return [json.loads(line)["loss"] for line in open(os.path.join(model_dir, "metrics.jsonl"))]


@functools.lru_cache(maxsize=1)
def _backbone():
  """The random backbone (seed 42) that `init_from=None` stands for, loaded once."""
  mesh, rules = part.make_mesh(), part.axis_rules()
  return loop.load_backbone(None, TINY, part.logical_shardings(part.abstract_params(interface.build_model(TINY)),
                                                               mesh, rules), 42)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """Stage 1 (Gumbel) from a random backbone (`init_from=None`, seed 42), 8 steps at a high learning rate."""
  gin.clear_config()
  gin.bind_parameter("make_optimizer.learning_rate", 1e-2)
  gin.bind_parameter("make_optimizer.warmup_fraction", 0.0)
  gin.bind_parameter("taskmoe_learning_rates.router", 5e-2)
  model_dir = tmp_path_factory.mktemp("stage1")
  product = _train(model_dir, "taskmoe_stage1", 8, MOE)
  gin.clear_config()
  return model_dir, product


def test_stage1_trains_copies_and_routers_through_the_loop(stage1):
  model_dir, product = stage1
  assert product == os.path.join(str(model_dir), "taskmoe")
  losses = _losses(model_dir)
  assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])
  params, metadata = tckpt.load_taskmoe(product)
  assert metadata["stage"] == "taskmoe_stage1" and metadata["taskmoe"]["routing"] == "gumbel"
  assert metadata["task_ids"] == {"synthetic_reverse": 0, "synthetic_uppercase": 1,
                                  "synthetic_reverse_with_ids": 0, "synthetic_uppercase_with_ids": 1}
  start = tm.expand_pretrained(jax.device_get(_backbone().params), MOE, stages.expansion_key(42))
  moved = lambda part_name: any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[part_name]), jax.tree.leaves(start[part_name])))
  assert moved("router") and moved("encoder")  # routers, task embeddings and copies all trained
  assert params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"].shape[0] == MOE.num_copies


def test_stage2_keeps_routers_and_resets_copies(stage1, tmp_path):
  _, product = stage1
  backbone = _backbone()
  stage1_params, _ = tckpt.load_taskmoe(product)
  init = stages.build_stage2(product, backbone, str(tmp_path / "init"), noise_std=0.0)
  init_params, init_meta = tckpt.load_taskmoe(init)
  assert init_meta["taskmoe"]["routing"] == "softmax" and init_meta["taskmoe"]["noise_std"] == 0.0
  pretrained = jax.device_get(backbone.params)
  for copy in range(MOE.num_copies):  # every copy (and every shared weight) is the pretrained one again
    jax.tree.map(np.testing.assert_array_equal, tm.extract_copy(init_params, copy), pretrained)
  jax.tree.map(np.testing.assert_array_equal, init_params["router"], stage1_params["router"])
  moe2 = dataclasses.replace(MOE, routing="softmax")
  gin.bind_parameter("make_optimizer.learning_rate", 1e-2)
  gin.bind_parameter("make_optimizer.warmup_fraction", 0.0)
  trained, _ = tckpt.load_taskmoe(_train(tmp_path / "stage2", "taskmoe_stage2", 3, moe2, expert_from=init))
  jax.tree.map(np.testing.assert_array_equal, trained["router"], stage1_params["router"])  # frozen, bit for bit
  assert not np.array_equal(trained["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                            init_params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  with pytest.raises(Exception, match="expert_from"):
    _train(tmp_path / "no_init", "taskmoe_stage2", 1, moe2)


def test_task_ids_reach_the_model_in_training_and_scoring():
  moe = tm.TaskMoEConfig(num_copies=2, task_dim=4, num_tasks=2, router_hidden=4, routing="random_task",
                         route_seed=next(s for s in range(100) if len({tuple(r.argmax(-1)) for r in
                                                                        tm.random_task_table(
                                                                            tm.TaskMoEConfig(num_copies=2,
                                                                                             num_tasks=2,
                                                                                             route_seed=s),
                                                                            2)}) == 2))
  table = tm.random_task_table(moe, 2)
  batches = pipeline.train_batches(task_ids.with_task_ids(TASKS, "taskmoe_ids_test"), LENGTHS, 8, seed=3)
  batch = next(b for b in batches if len(set(b["task_ids"].tolist())) == 2)  # both tasks in one batch
  assert batch["task_ids"].shape == (8,) and set(batch["task_ids"].tolist()) == {0, 1}
  model = interface.build_model(TINY, moe)
  assert isinstance(model, tm.TaskMoE)
  pretrained = jax.device_get(_backbone().params)
  params = tm.expand_pretrained(pretrained, dataclasses.replace(moe, noise_std=0.3), jax.random.PRNGKey(0))
  ids = jnp.asarray(batch["task_ids"])
  _, state = jax.jit(lambda p, e, d, i: model.apply({"params": p}, e, d, task_ids=i, mutable=["intermediates"]))(
      params, batch["encoder_input_tokens"], batch["decoder_input_tokens"], ids)
  routes = np.asarray(state["intermediates"]["routes"][0])
  np.testing.assert_array_equal(routes, table[np.asarray(ids)])
  assert not np.array_equal(routes[np.asarray(ids) == 0][0], routes[np.asarray(ids) == 1][0])
  # The train step routes by the batch's task ids: its loss is the loss under the tasks' routes given explicitly.
  forced = jax.jit(lambda p, e, d, r: model.apply({"params": p}, e, d, routes=r))(
      params, batch["encoder_input_tokens"], batch["decoder_input_tokens"], jnp.asarray(table)[ids])
  loss_sum, weight_sum = weighted_cross_entropy(forced, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
  from moe_jax.training import optimizer as opt
  optimizer = opt.make_optimizer("taskmoe_stage1", params, total_steps=1)
  from moe_jax.training.train_step import TrainState
  _, metrics = jax.jit(train_step_fn(model, optimizer, "taskmoe_stage1"))(TrainState.create(params, optimizer),
                                                                            {k: jnp.asarray(v) for k, v in
                                                                             batch.items()})
  np.testing.assert_allclose(float(metrics["loss"]), float(loss_sum / weight_sum), rtol=1e-5)
  # Scoring: each example's task id routes it (evaluate_task's routing_ids_fn gives the task's id).
  assert task_ids.routing_ids_fn("synthetic_uppercase", [{}, {}]) == [1, 1]
  inputs, targets = batch["encoder_input_tokens"][:4], batch["decoder_target_tokens"][:4, None, :]
  scores, _ = _choice_scores(model, params, inputs, targets, ids[:4])
  for task in (0, 1):  # each example is scored under its own task's route
    rows = np.asarray(ids[:4]) == task
    under_task, _ = _choice_scores(model, params, inputs, targets, jnp.full((4,), task, jnp.int32))
    np.testing.assert_allclose(scores[rows], under_task[rows], rtol=1e-5)
    assert not np.allclose(scores[~rows], under_task[~rows])


def test_random_instance_routes_at_evaluation_are_per_example_and_deterministic():
  moe = tm.TaskMoEConfig(num_copies=3, task_dim=4, num_tasks=2, router_hidden=4, routing="random_instance")
  model = interface.build_model(TINY, moe)
  params = tm.expand_pretrained(jax.device_get(_backbone().params), dataclasses.replace(moe, noise_std=0.3),
                                jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  inputs = np.where(np.arange(10)[None] < rng.integers(3, 10, (6, 1)), rng.integers(2, 200, (6, 10)), 0)
  targets = rng.integers(2, 200, (6, 2, 4)).astype(np.int32)
  scores, _ = _choice_scores(model, params, inputs, targets, None)
  again, _ = _choice_scores(model, params, inputs, targets, None)
  np.testing.assert_array_equal(scores, again)  # deterministic
  order = np.array([3, 0, 5, 1, 4, 2])
  shuffled, _ = _choice_scores(model, params, inputs[order], targets[order], None)
  np.testing.assert_allclose(shuffled, scores[order], rtol=1e-5)  # an example's route is its own
  routes = interface.eval_routes(model, params, jnp.asarray(inputs), None)
  assert routes.shape == (6, 2, 3) and len({tuple(r.argmax(-1)) for r in np.asarray(routes)}) > 1


def test_text_embedding_is_the_mean_of_encoder_states():
  model = interface.build_model(TINY)
  params = jax.device_get(_backbone().params)
  rng = np.random.default_rng(1)
  lengths = np.array([3, 7, 5, 1, 6])
  inputs = np.where(np.arange(8)[None] < lengths[:, None], rng.integers(2, 250, (5, 8)), 0).astype(np.int32)
  got = embeddings.text_embedding(model, params, inputs, batch_size=2)  # batches of 2: padding rows, 3 batches
  states = np.asarray(model.apply({"params": params}, inputs, True, method="encode"), np.float64)
  expected = np.mean([states[i, :n].mean(axis=0) for i, n in enumerate(lengths)], axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_fisher_embedding_is_the_mean_squared_per_example_gradient(tmp_path):
  experts = ExpertConfig(num_experts=1, rank=2, modules=r".*(attention|self_attention)/(query|value)")
  model = interface.build_model(TINY, experts)
  backbone = jax.device_get(_backbone().params)
  adapter = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.PRNGKey(x.size), x.shape) * 0.3,
                                               np.float32), ex.init_experts(TINY, experts, jax.random.PRNGKey(1)))
  params = ex.merge(backbone, adapter)
  examples = [{"inputs": np.array([5 + i, 9, 17 + 2 * i, 1][: 2 + i % 3] + [1], np.int32),
               "targets": np.array([40 + i, 41, 1][: 1 + i % 3] + [1], np.int32)} for i in range(5)]
  arrays = embeddings.training_arrays(examples, {"inputs": 8, "targets": 5})
  got = embeddings.fisher_embedding(model, params, arrays, batch_size=2)
  flat = flax.traverse_util.flatten_dict(params)
  keys = sorted(k for k in flat if k[-1] in ("lora_a", "lora_b"))
  frozen = flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in keys})
  total = {k: np.zeros(flat[k].shape, np.float64) for k in keys}

  def loss(lora, row):  # one example's token-mean cross-entropy, written out
    logits = model.apply({"params": ex.merge(frozen, flax.traverse_util.unflatten_dict(lora))},
                         row["encoder_input_tokens"], row["decoder_input_tokens"])
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, row["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    weights = row["decoder_loss_weights"]
    return -jnp.sum(picked * weights) / jnp.sum(weights)

  grad = jax.jit(jax.grad(loss))
  for i in range(len(examples)):  # one example at a time, as a batch of one
    grads = grad({k: flat[k] for k in keys}, {k: jnp.asarray(v[i:i + 1]) for k, v in arrays.items()})
    for k in keys:
      total[k] += np.square(np.asarray(grads[k], np.float64))
  expected = np.concatenate([(total[k] / len(examples)).reshape(-1) for k in keys])
  assert got.shape == expected.shape and np.all(expected >= 0) and np.any(expected > 0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-12)
  reduced = embeddings.reduce_dimension(np.stack([got, expected * 2, got * 3 + 1]), 2)
  assert reduced.shape == (3, 2)
  task_ids.write_task_vecs(str(tmp_path), ["a", "b-c", "d"], reduced)
  names, vectors = task_ids.read_task_vecs(str(tmp_path))
  assert names == ["a", "b-c", "d"] and vectors.dtype == np.float32 and vectors.shape == (3, 2)
  assert json.load(open(tmp_path / "id2task.json")) == {"0": "a", "1": "b-c", "2": "d"}  # crossfit.task_ids reads it


def test_routing_plots_are_written(tmp_path):
  rng = np.random.default_rng(0)
  routes = {}
  for t in ("demo_a", "demo_b", "demo_c", "demo_d"):
    probs = rng.dirichlet(np.ones(3), size=4)
    routes[t] = {"routes": np.eye(3)[probs.argmax(-1)], "probabilities": probs}
  paths = analysis.write_routing_analysis(str(tmp_path), routes, ["enc0", "enc1", "dec0", "dec1"], "test")
  for key in ("heatmaps", "clusters"):
    assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  record = json.load(open(paths["routes"]))
  assert record["clustered_by"] == "probabilities" and len(record["tasks"]["demo_a"]["routes"]) == 4
  order = json.load(open(paths["clusters_json"]))["order"]
  assert sorted(order) == sorted(routes)
  same = analysis.cluster(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
  assert set(same["order"][:2]) == {0, 1} or set(same["order"][1:]) == {0, 1}  # identical routes are neighbours


def test_demo_job_runs_end_to_end(tmp_path):
  run_dir = tmp_path / "demo"
  flags = {"taskmoe_demo.run_dir": f"'{run_dir}'", "taskmoe_demo.pretrain_steps": 0,  # a random backbone
           "taskmoe_demo.stage1_steps": 2, "taskmoe_demo.stage2_steps": 2, "taskmoe_demo.dense_steps": 0,
           "taskmoe_demo.routings": "['gumbel']", "taskmoe_demo.max_eval_examples": 4,
           "taskmoe_demo.tasks": "['demo_sentiment', 'demo_case']", "train.batch_size": 4,
           "T5Config.num_encoder_layers": 1, "T5Config.num_decoder_layers": 1, "T5Config.d_model": 16,
           "T5Config.d_ff": 32, "T5Config.num_heads": 2, "T5Config.d_kv": 8}
  command = [sys.executable, "-m", "moe_jax.train", "--gin_file=gin/taskmoe_demo.gin",
             *[f"--gin.{k}={v}" for k, v in flags.items()]]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert result.returncode == 0, result.stderr[-3000:]
  table = open(run_dir / "results.md").read()
  for row in ("stage1 gumbel", "stage2 softmax (from stage1 gumbel)"):
    assert f"| {row} |" in table
  assert "| model | sentiment | case | **mean** |" in table
  for model in ("stage1_gumbel", "stage2_softmax_from_stage1_gumbel"):
    for plot in ("routing_heatmaps.png", "routing_clusters.png"):
      assert os.path.getsize(run_dir / "eval" / model / plot) > 1000
  names, vectors = task_ids.read_task_vecs(str(run_dir / "task_embeddings"))
  assert names == ["demo_sentiment", "demo_case"] and vectors.shape == (2, 16)
