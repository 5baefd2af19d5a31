"""The PHATGOOSE pipeline end to end on the tiny model: every stage, every method, results.md and routing.png."""

import json
import os

import gin
import jax
import numpy as np

from moe_jax.data.pipeline import eval_examples
from moe_jax.evaluation.scoring import pad_tokens
from moe_jax.methods import pipeline
from moe_jax.models import Transformer
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import loop
from moe_jax.training import partitioning as part
from tasks import synthetic

TINY = T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_pipeline")


def _run_pipeline(run_dir, **kwargs):
  gin.clear_config()
  gin.bind_parameter("train.batch_size", 8)
  try:
    return pipeline.phatgoose_pipeline(
        run_dir=str(run_dir), expert_tasks=["synthetic_reverse", "synthetic_sort"],
        eval_tasks=["synthetic_sort", "synthetic_reverse_heldout"], pretrain_mixture="demo_pretrain",
        pretrain_steps=3, multitask_steps=3, expert_steps=3, gate_steps=2,
        max_eval_examples=8, activation_examples=8, retrieval_examples=8, eval_batch_size=8, model_config=TINY,
        experts=ExpertConfig(rank=4), top_k=1, **kwargs)
  finally:
    gin.clear_config()


def test_every_method_runs_end_to_end(tmp_path):
  results = _run_pipeline(tmp_path)
  assert results == os.path.join(tmp_path, "results.md")
  table = json.load(open(tmp_path / "results.json"))["tasks"]
  assert sorted(table) == sorted(pipeline.METHODS)
  # the demo's stages: a pretrained backbone, a separate multitask model, experts and gates from the backbone
  assert all((tmp_path / d).is_dir()
             for d in ("backbone", "multitask", "experts/synthetic_sort", "gates/synthetic_sort"))
  for scores in table.values():
    assert sorted(scores) == ["synthetic_reverse_heldout", "synthetic_sort"]
    assert all(0.0 <= v <= 100.0 for v in scores.values())
  text = open(tmp_path / "results.md").read()
  assert "| phatgoose |" in text and "mean held-out" in text and "Routers compared on the held-in tasks" in text
  # routing diagnostics of every method that routes, per token or per example; none for the oracle
  routers = ["phatgoose", "average_activation", "arrow", "retrieval"]
  assert all(f"## {m} routing diagnostics" in text for m in routers) and "## oracle routing" not in text
  assert sorted(json.load(open(tmp_path / "routing_diagnostics.json"))) == sorted(routers)
  assert os.path.getsize(tmp_path / "routing.png") > 10_000
  assert all((tmp_path / f"routing_{m}.png").is_file() for m in routers[1:])
  assert (tmp_path / "routing_diagnostics_arrow.png").is_file()
  _uniform_equals_merged(str(tmp_path))
  _gate_weights_read_no_labels(str(tmp_path))
  _experts_live_in_the_library(tmp_path)


def _experts_live_in_the_library(run_dir):
  """The gated experts went into the run's library with their backbone and settings, the methods' auxiliary data
  beside them; a rerun on that library trains no expert again and reads the auxiliary data back."""
  import shutil

  from moe_jax.library import ExpertLibrary

  library = ExpertLibrary(str(run_dir / "library"), read_only=True)
  assert library.names() == ["synthetic_reverse", "synthetic_sort"]
  gate, metadata = ckpt.load_experts(str(run_dir / "gates" / "synthetic_sort" / ckpt.EXPERT_FILE))
  expert = library.get("synthetic_sort")
  flat = lambda tree: {k: np.asarray(v) for k, v in __import__("flax").traverse_util.flatten_dict(tree).items()}
  assert all(np.array_equal(v, flat(gate)[k]) for k, v in flat(expert.weights).items())
  assert expert.info.backbone == metadata["backbone"] and expert.info.rank == 4
  assert expert.info.config["gate"]["total_steps"] == 2 and expert.info.config["expert"]["total_steps"] == 3
  aux = {e["method"] for e in library.auxiliary_entries("synthetic_sort")}
  assert aux == {"arrow_prototypes", "average_activation", "retrieval_embeddings", "roe_index"}
  before = json.load(open(run_dir / "results.json"))
  for folder in ("experts", "gates"):
    shutil.rmtree(run_dir / folder)
  os.remove(run_dir / "results.json")
  # The rerun adds Model-Based Clustering (one cluster) to the same table.
  _run_pipeline(run_dir, mbc_clusters=1, mbc_methods=["merged", "phatgoose", "oracle"])
  assert not (run_dir / "experts").exists() and not (run_dir / "gates").exists()  # nothing retrained
  after = json.load(open(run_dir / "results.json"))
  assert {m: after["tasks"][m] for m in before["tasks"]} == before["tasks"]
  assert sorted(after["tasks"]) == sorted([*before["tasks"], "mbc/merged", "mbc/phatgoose", "mbc/oracle"])
  # the one cluster's expert is trained on both tasks: its oracle scores the held-out template too
  assert not np.isnan(after["tasks"]["mbc/oracle"]["synthetic_reverse_heldout"])
  assert "| mbc/phatgoose |" in open(run_dir / "results.md").read()
  _evaluate_methods_over_the_library(run_dir, library, before)
  _model_based_clustering(run_dir, library, after)


def _evaluate_methods_over_the_library(run_dir, library, pipeline_results):
  """`python -m moe_jax.evaluate` with methods by name over the pipeline's library: the pipeline's scores."""
  from moe_jax.evaluation import runner

  methods = ["phatgoose", "arrow", "ties", "oracle"]
  table = runner.evaluate(output_dir=str(run_dir / "evaluate_methods"), tasks=["synthetic_sort",
                                                                             "synthetic_reverse_heldout"],
                          model_config=TINY, experts=ExpertConfig(rank=4), init_from=str(run_dir / "backbone"),
                          library=library.uri, methods=methods, top_k=1, feature_lengths=synthetic.FEATURE_LENGTHS,
                          max_examples=8, batch_size=8)
  assert {m: table[m] for m in methods} == {m: pipeline_results["tasks"][m] for m in methods}
  assert "| arrow |" in open(run_dir / "evaluate_methods" / "results.md").read()


def _model_based_clustering(run_dir, library, pipeline_results):
  """The pipeline's Model-Based Clustering (gin/mbc.gin's job): one cluster of both experts, one expert trained on
  the union of their tasks from their backbone, written as a new library; `evaluate.methods` on that library
  (experts of several tasks) gives the pipeline's mbc/ rows and counts both tasks as held-in."""
  from moe_jax.evaluation import runner
  from moe_jax.library import ExpertLibrary

  clustered = ExpertLibrary(str(run_dir / "mbc_library"), read_only=True)
  assert clustered.names() == ["mbc_cluster_0"]
  info = clustered.info("mbc_cluster_0")
  assert info.tasks == ("synthetic_reverse", "synthetic_sort") and "mbc" in info.tags
  assert info.parent == "synthetic_reverse,synthetic_sort"
  assert info.backbone["weights"] == library.info("synthetic_sort").backbone["weights"]
  methods = ["merged", "phatgoose", "oracle"]
  output = run_dir / "evaluate_mbc"
  table = runner.evaluate(output_dir=str(output), tasks=["synthetic_sort", "synthetic_reverse_heldout"],
                          model_config=TINY, experts=ExpertConfig(rank=4), init_from=str(run_dir / "backbone"),
                          library=clustered.uri, methods=methods, top_k=1, feature_lengths=synthetic.FEATURE_LENGTHS,
                          max_examples=8, batch_size=8)
  assert {m: table[m] for m in methods} == {m: pipeline_results["tasks"][f"mbc/{m}"] for m in methods}
  summary = json.load(open(output / "results.json"))["summary"]["oracle"]
  assert summary["mean held-in"] == table["oracle"]["synthetic_sort"]
  assert summary["mean held-out templates"] == table["oracle"]["synthetic_reverse_heldout"]


def _gate_weights_read_no_labels(run_dir):
  """phatgoose_merged weighs the experts by the gates' routing over a task's inputs alone: the encoder-side
  modules' shares, which equal those of the teacher-forced count (the encoder never sees a target), and no
  decoder-side module; its model for a task is the update mean with those weights."""
  from moe_jax.methods import merging
  from moe_jax.methods.routing import routing_shares

  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(os.path.join(run_dir, "backbone"), TINY, part.logical_shardings(
      part.abstract_params(Transformer(TINY)), mesh, rules), seed=0)
  moe_tree, _ = ckpt.load_experts(os.path.join(run_dir, "moe.safetensors"), TINY)
  args = (["synthetic_sort"], "validation", synthetic.FEATURE_LENGTHS, 8)
  with part.activate(mesh, rules):
    built = pipeline.build_methods(["phatgoose", "phatgoose_merged"], TINY, backbone.params, moe_tree,
                                   ["synthetic_reverse", "synthetic_sort"], 1, ExpertConfig(rank=4), 8, 8,
                                   synthetic.FEATURE_LENGTHS, mesh, rules, max_eval_examples=8)
    gates = built["phatgoose"]
    full = routing_shares(gates.model, gates.params, *args)
    inputs = routing_shares(gates.model, gates.params, *args, inputs_only=True)
    assert inputs and sorted(inputs) == sorted(p for p in full if p.startswith("encoder/") or "/encoder_decoder" in p
                                               and p.split("/")[-1] in ("key", "value"))
    for path, value in inputs.items():
      np.testing.assert_allclose(value, full[path], rtol=0, atol=1e-12)
    merged = built["phatgoose_merged"].params_for("synthetic_sort")
    _, expected = merging.uniform_updates(TINY, backbone.params, moe_tree, merging.router_weights(inputs, 0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
                 merged, expected)


def _uniform_equals_merged(run_dir):
  """On the pipeline's own backbone and MoE file, in fp32: the mean of the experts' outputs (uniform routing) is the
  output of the mean update (merged experts), since LoRA is linear in its update. Two fp32 orders of summation
  differ by ~1e-6 of the logits; a dropped module, a wrong 1/r or a wrong mean moves them by far more."""
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(os.path.join(run_dir, "backbone"), TINY, part.logical_shardings(
      part.abstract_params(Transformer(TINY)), mesh, rules), seed=0)
  moe_tree, _ = ckpt.load_experts(os.path.join(run_dir, "moe.safetensors"), TINY)
  examples = eval_examples("synthetic_sort", "validation", synthetic.FEATURE_LENGTHS, max_examples=8)
  enc = pad_tokens([e["inputs"] for e in examples], synthetic.FEATURE_LENGTHS["inputs"])
  dec = pad_tokens([np.concatenate([[0], e["targets"][:-1]]) for e in examples], synthetic.FEATURE_LENGTHS["targets"])
  with part.activate(mesh, rules):
    built = pipeline.build_methods(["uniform", "merged", "multitask"], TINY, backbone.params, moe_tree,
                                   ["synthetic_reverse", "synthetic_sort"], 1, ExpertConfig(rank=4), 8, 8,
                                   synthetic.FEATURE_LENGTHS, mesh, rules)
    logits = {name: np.asarray(jax.jit(m.model.apply)({"params": m.params}, enc, dec), np.float64)
              for name, m in built.items()}
  scale = np.abs(logits["uniform"]).max()
  np.testing.assert_allclose(logits["merged"], logits["uniform"], rtol=0, atol=1e-5 * scale)
  # the experts change the model: the identity is not that of two copies of the backbone
  assert np.abs(logits["uniform"] - logits["multitask"]).max() > 1e-3 * scale


def test_demo_gin_runs_through_the_cli(tmp_path):
  """`python -m moe_jax.train --gin_file=gin/phatgoose.gin`, shrunk: the command as users run it, where gin is
  locked before the job starts (a configurable imported late would fail here, not in the in-process test)."""
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bindings = [f"phatgoose_pipeline.run_dir='{tmp_path}'", "phatgoose_pipeline.pretrain_steps=2",
              "phatgoose_pipeline.multitask_steps=2",
              "phatgoose_pipeline.expert_steps=2", "phatgoose_pipeline.gate_steps=1",
              "phatgoose_pipeline.expert_tasks=['synthetic_reverse', 'synthetic_sort']",
              "phatgoose_pipeline.eval_tasks=['synthetic_sort', 'synthetic_reverse_heldout']",
              "phatgoose_pipeline.max_eval_examples=8", "phatgoose_pipeline.activation_examples=8",
              "phatgoose_pipeline.retrieval_examples=8", "train.batch_size=8", "ExpertConfig.rank=2",
              "MBC_CLUSTERS=1", "phatgoose_pipeline.mbc_methods=['merged']", "roe_settings.instances=4",
              "T5Config.num_encoder_layers=1", "T5Config.num_decoder_layers=1"]
  done = subprocess.run([sys.executable, "-m", "moe_jax.train", "--gin_file=gin/phatgoose.gin",
                         *(f"--gin_bindings={b}" for b in bindings)], cwd=tmp_path, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "PYTHONPATH": repo})
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"done: {tmp_path / 'results.md'}" in done.stdout
  table = json.load(open(tmp_path / "results.json"))["tasks"]
  assert sorted(table) == sorted([*pipeline.METHODS, "mbc/merged"])  # gin/phatgoose.gin lists every method
  # the demo's stages: a pretrained backbone, a separate multitask model, experts and gates from the backbone
  assert all((tmp_path / d).is_dir()
             for d in ("backbone", "multitask", "experts/synthetic_sort", "gates/synthetic_sort"))


def test_every_method_runs_on_a_causal_lm(tmp_path):
  """The same pipeline through the model interface on a tiny Llama-family causal LM (gin/phatgoose_causal.gin's
  family): training stages, the library, every method, rank classification, greedy generation and routing."""
  from moe_jax.library import ExpertLibrary
  from moe_jax.models import CausalLMConfig

  config = CausalLMConfig(family="llama", vocab_size=264, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                          head_dim=16, d_ff=64, dtype="float32", name="tiny_causal_pipeline")
  gin.clear_config()
  gin.bind_parameter("train.batch_size", 8)
  try:
    pipeline.phatgoose_pipeline(
        run_dir=str(tmp_path), expert_tasks=["synthetic_reverse", "synthetic_sort"],
        eval_tasks=["synthetic_sort", "synthetic_reverse_heldout"], pretrain_mixture="demo_pretrain",
        pretrain_steps=3, multitask_steps=3, expert_steps=3, gate_steps=2, max_eval_examples=8,
        activation_examples=8, retrieval_examples=8, eval_batch_size=8, model_config=config,
        experts=ExpertConfig(rank=4), top_k=1)
  finally:
    gin.clear_config()
  table = json.load(open(tmp_path / "results.json"))["tasks"]
  assert sorted(table) == sorted(pipeline.METHODS)
  for scores in table.values():
    assert all(0.0 <= v <= 100.0 for v in scores.values())
  assert table["uniform"] == table["merged"]  # LoRA is linear on this family too
  info = ExpertLibrary(str(tmp_path / "library"), read_only=True).info("synthetic_sort")
  assert info.backbone["model"] == "tiny_causal_pipeline" and "layers_0/attention/query" in info.modules
  assert os.path.getsize(tmp_path / "routing.png") > 10_000
