"""Methods on experts: concatenation (API and CLI), Merged Experts, Average Activation vectors, retrieval routing.

Each is checked against an independent computation: the single expert's own model, float64 NumPy, or a NumPy
re-implementation of the module input. Random experts stand in for trained ones (no training needed here).
"""

import json
import os
import subprocess
import sys
import uuid

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import fs
from moe_jax.errors import ConfigError
from moe_jax.methods import average_activation as aa
from moe_jax.methods import concatenate as concat
from moe_jax.methods import oracle
from moe_jax.methods import pipeline
from moe_jax.methods.merged import merge_into_backbone
from moe_jax.methods.instances import InstanceIndex, prompt_mean_embedder
from moe_jax.models import ExpertConfig, Fixed, T5Config, Transformer, Uniform
from moe_jax.models import experts as ex
from moe_jax.plots import plot_routing
from moe_jax.training import checkpointing as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = T5Config(vocab_size=64, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_methods")
RANK = 4
LAYOUT = ExpertConfig(num_experts=1, rank=RANK, router=Uniform())
ENC = np.array([[5, 9, 3, 7, 1, 0], [4, 1, 0, 0, 0, 0], [8, 8, 2, 6, 9, 1]], np.int32)
DEC = np.array([[0, 3, 4, 1], [0, 7, 1, 0], [0, 2, 2, 5]], np.int32)
WEIGHTS = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)


@pytest.fixture(scope="module")
def backbone():
  tokens = np.ones((1, 1), np.int32)
  return nn.meta.unbox(Transformer(TINY).init(jax.random.PRNGKey(0), tokens, tokens))["params"]


def random_expert(seed, config=TINY, layout=LAYOUT):
  """A one-expert tree with random A, B and router (fresh B and router are zero, which would hide mistakes)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(ex.init_experts(config, layout, jax.random.PRNGKey(seed)))
  flat = {k: (np.asarray(v) if k[-1] == "lora_a" else rng.normal(0, 0.3, v.shape).astype(np.float32))
          for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


def save(path, tree, task, config=TINY):
  ckpt.save_experts(path, tree, ckpt.expert_metadata(tree, config, task, stage="gate"))
  return str(path)


def logits(config, layout, params, **kwargs):
  return np.asarray(Transformer(config, layout).apply({"params": params}, ENC, DEC, **kwargs))


def test_concatenated_moe_routed_to_one_expert_equals_that_expert(backbone, tmp_path):
  first, second = random_expert(1), random_expert(2)
  files = [save(tmp_path / "a.safetensors", first, "task_a"), save(tmp_path / "b.safetensors", second, "task_b")]
  out = concat.concatenate(files, str(tmp_path / "moe.safetensors"))
  moe, metadata = ckpt.load_experts(out, TINY)
  assert metadata["num_experts"] == 2 and metadata["rank"] == RANK
  assert [e["task"] for e in metadata["experts"]] == ["task_a", "task_b"]
  assert metadata["experts"][1]["source"] == os.path.abspath(files[1]) and metadata["experts"][1]["stage"] == "gate"
  alone = logits(TINY, LAYOUT, ex.merge(backbone, second))
  two = ExpertConfig(num_experts=2, rank=RANK, router=Fixed(expert=1))
  np.testing.assert_allclose(logits(TINY, two, ex.merge(backbone, moe)), alone, atol=1e-5, rtol=1e-5)
  per_example = ExpertConfig(num_experts=2, rank=RANK, router=Fixed())
  np.testing.assert_allclose(logits(TINY, per_example, ex.merge(backbone, moe), routing_ids=np.ones(3, np.int32)),
                             alone, atol=1e-5, rtol=1e-5)


def test_append_keeps_existing_experts_and_refuses_mismatches(tmp_path):
  files = [save(tmp_path / f"{t}.safetensors", random_expert(i), t) for i, t in enumerate(["a", "b", "c"])]
  moe = concat.concatenate(files[:2], str(tmp_path / "moe.safetensors"))
  before = flax.traverse_util.flatten_dict(ckpt.load_experts(moe)[0])
  concat.concatenate([files[2]], moe, append_to=moe)  # in place: the write is atomic
  after, metadata = ckpt.load_experts(moe)
  after = flax.traverse_util.flatten_dict(after)
  assert [e["task"] for e in metadata["experts"]] == ["a", "b", "c"] and metadata["num_experts"] == 3
  for key, value in before.items():
    np.testing.assert_array_equal(after[key][:2], value)
    assert after[key].dtype == value.dtype
  third = flax.traverse_util.flatten_dict(ckpt.load_experts(files[2])[0])
  for key, value in third.items():
    np.testing.assert_array_equal(after[key][2:], value)
  with pytest.raises(ValueError, match="task 'a' of .*a.safetensors is already expert 0"):
    concat.concatenate([files[0]], str(tmp_path / "dup.safetensors"), append_to=moe)
  assert not os.path.exists(tmp_path / "dup.safetensors")
  other_rank = save(tmp_path / "r2.safetensors", random_expert(5, layout=ExpertConfig(num_experts=1, rank=2)), "d")
  with pytest.raises(ValueError, match=r"r2.safetensors differs from .*a.safetensors in rank: 2 vs 4"):
    concat.concatenate([files[0], other_rank], str(tmp_path / "bad.safetensors"))
  attention_only = ExpertConfig(num_experts=1, rank=RANK, modules=r".*attention/(query|key|value|out)")
  fewer = save(tmp_path / "fewer.safetensors", random_expert(6, layout=attention_only), "e")
  with pytest.raises(ValueError, match=r"fewer.safetensors differs .* in modules: extra \[\] vs missing"):
    concat.concatenate([files[0], fewer], str(tmp_path / "bad.safetensors"))


def test_cli_names_the_odd_file_in_one_line(tmp_path):
  good = save(tmp_path / "good.safetensors", random_expert(1), "a")
  other = T5Config(**{**TINY.__dict__, "d_ff": 48, "name": "other"})
  odd = save(tmp_path / "odd.safetensors", random_expert(2, config=other), "b", config=other)
  command = [sys.executable, "-m", "moe_jax.concatenate", "--gin_file=gin/concatenate.gin",
             f"--gin.concatenate.expert_files={[good, odd]!r}", f"--gin.concatenate.output={str(tmp_path / 'm')!r}"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "odd.safetensors differs" in lines[0]
  assert "fingerprint" in lines[0] and not os.path.exists(tmp_path / "m")


def test_merged_single_expert_equals_the_expert_model(backbone):
  expert = random_expert(3)
  merged = merge_into_backbone(ex.merge(backbone, expert), expert)  # expert leaves of the input are dropped
  assert not ex.split(merged)[1]
  np.testing.assert_allclose(logits(TINY, None, merged), logits(TINY, LAYOUT, ex.merge(backbone, expert)),
                             atol=1e-5, rtol=1e-5)
  a = expert["encoder"]["layers_0"]["attention"]["query"]
  w = np.asarray(backbone["encoder"]["layers_0"]["attention"]["query"]["kernel"], np.float64)
  reference = w + a["lora_a"][0].astype(np.float64) @ a["lora_b"][0].astype(np.float64) / RANK
  np.testing.assert_allclose(merged["encoder"]["layers_0"]["attention"]["query"]["kernel"], reference, atol=1e-6)


def test_merged_weighted_experts_match_numpy(backbone):
  trees = [random_expert(4), random_expert(5)]
  stacked = ex.stack(trees, ["x", "y"])
  weights = [0.25, 1.5]
  merged = merge_into_backbone(backbone, stacked, weights)
  uniform = merge_into_backbone(backbone, stacked)
  for merged_tree, w in ((merged, weights), (uniform, [0.5, 0.5])):
    module = ("decoder", "layers_0", "mlp", "wo")
    kernel = np.asarray(flax.traverse_util.flatten_dict(backbone)[module + ("kernel",)], np.float64)
    for tree, wi in zip(trees, w):
      flat = flax.traverse_util.flatten_dict(tree)
      kernel = kernel + wi * flat[module + ("lora_a",)][0].astype(np.float64) @ flat[module + ("lora_b",)][0] / RANK
    np.testing.assert_allclose(flax.traverse_util.flatten_dict(merged_tree)[module + ("kernel",)], kernel, atol=1e-6)
  with pytest.raises(ValueError, match="3 weights for 2 experts"):
    merge_into_backbone(backbone, stacked, [1.0, 1.0, 1.0])


def _rms_norm(x, scale, eps=TINY.layer_norm_epsilon):
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_average_activation_is_the_masked_mean_module_input(backbone):
  expert = random_expert(7)
  batches = [{"encoder_input_tokens": ENC[:2], "decoder_input_tokens": DEC[:2], "decoder_loss_weights": WEIGHTS[:2]},
             {"encoder_input_tokens": ENC[2:], "decoder_input_tokens": DEC[2:], "decoder_loss_weights": WEIGHTS[2:]},
             {"encoder_input_tokens": ENC, "decoder_input_tokens": DEC, "decoder_loss_weights": WEIGHTS}]
  routers = flax.traverse_util.flatten_dict(aa.average_activations(TINY, backbone, expert, batches, max_examples=3))
  assert set(routers) == {k[:-1] + ("router",) for k in flax.traverse_util.flatten_dict(expert) if k[-1] == "lora_a"}
  embedding = np.asarray(backbone["token_embedder"]["embedding"], np.float64)
  # First encoder layer's query/key/value read RMSNorm(embedded tokens): mean over real encoder tokens of all 3.
  encoder_in = _rms_norm(embedding[ENC], backbone["encoder"]["layers_0"]["pre_attention_layer_norm"]["scale"])
  mask = ENC > 0
  expected = encoder_in[mask].mean(axis=0)
  for name in ("query", "key", "value"):
    got = routers[("encoder", "layers_0", "attention", name, "router")]
    assert got.shape == (1, TINY.d_model)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
  # First decoder layer's self-attention reads RMSNorm(embedded decoder inputs): mean over positions with loss weight.
  decoder_in = _rms_norm(embedding[DEC],
                         backbone["decoder"]["layers_0"]["pre_self_attention_layer_norm"]["scale"])
  np.testing.assert_allclose(routers[("decoder", "layers_0", "self_attention", "query", "router")][0],
                             decoder_in[WEIGHTS > 0].mean(axis=0), atol=1e-5)
  # Cross-attention key/value read the encoder output (expert active): mean over real encoder tokens too.
  encoded = np.asarray(Transformer(TINY, LAYOUT).apply({"params": ex.merge(backbone, expert)}, ENC,
                                                       method=Transformer.encode), np.float64)
  np.testing.assert_allclose(routers[("decoder", "layers_0", "encoder_decoder_attention", "key", "router")][0],
                             encoded[mask].mean(axis=0), atol=1e-5)
  # max_examples: only the first example of the batches counts.
  first = flax.traverse_util.flatten_dict(aa.average_activations(TINY, backbone, expert, batches, max_examples=1))
  np.testing.assert_allclose(first[("encoder", "layers_0", "attention", "query", "router")][0],
                             encoder_in[0][mask[0]].mean(axis=0), atol=1e-5)
  assert aa.reads_encoder_positions("decoder/layers_0/encoder_decoder_attention/key")
  assert not aa.reads_encoder_positions("decoder/layers_0/encoder_decoder_attention/query")


def test_average_activation_routers_stack_per_expert(backbone):
  trees = [random_expert(8), random_expert(9)]
  moe = ex.stack(trees, ["x", "y"])
  data = [[{"encoder_input_tokens": ENC[:2], "decoder_input_tokens": DEC[:2], "decoder_loss_weights": WEIGHTS[:2]}],
          [{"encoder_input_tokens": ENC[1:], "decoder_input_tokens": DEC[1:], "decoder_loss_weights": WEIGHTS[1:]}]]
  stacked = aa.average_activation_routers(TINY, backbone, moe, data)
  key = ("decoder", "layers_0", "mlp", "wo", "router")
  for i, tree in enumerate(trees):
    alone = flax.traverse_util.flatten_dict(aa.average_activations(TINY, backbone, tree, data[i]))
    np.testing.assert_array_equal(flax.traverse_util.flatten_dict(stacked)[key][i], alone[key][0])
  routed = flax.traverse_util.flatten_dict(ex.merge(moe, stacked))
  assert routed[key].shape == (2, TINY.d_ff)


def test_retrieval_picks_the_expert_holding_the_example(backbone):
  rng = np.random.default_rng(0)
  per_expert = [rng.integers(2, TINY.vocab_size, (5, 6)).astype(np.int32) for _ in range(3)]
  per_expert[1][:, 4:] = 0  # padding must not matter to the embedding
  embed = prompt_mean_embedder(TINY, backbone)
  index = InstanceIndex.from_embeddings([embed(p[:4]) for p in per_expert])
  assert index.embeddings.shape == (12, TINY.d_model) and list(index.expert_ids) == [0] * 4 + [1] * 4 + [2] * 4
  queries = np.concatenate([per_expert[2][1:2], per_expert[0][3:4], per_expert[1][0:1]])
  np.testing.assert_array_equal(index.nearest(embed(queries))[0], [2, 0, 1])
  # Embedding: the masked mean of the encoder output; similarities: max cosine per expert, in float64 NumPy.
  states = np.asarray(Transformer(TINY).apply({"params": backbone}, queries, method=Transformer.encode), np.float64)
  mask = (queries > 0)[..., None]
  query_emb = (states * mask).sum(1) / mask.sum(1)
  np.testing.assert_allclose(embed(queries), query_emb, atol=1e-5)
  stored = np.concatenate([embed(p[:4]) for p in per_expert]).astype(np.float64)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cosine = unit(query_emb) @ unit(stored).T
  np.testing.assert_allclose(index.similarities(query_emb), cosine.reshape(3, 3, 4).max(axis=2), atol=1e-5)
  assert np.allclose(np.diag(index.similarities(query_emb)[:, [2, 0, 1]]), 1.0, atol=1e-5)


def test_pipeline_results_and_plot_go_through_fs():
  """results.md/json and routing.png land on a URL run_dir (memory:// standing in for gs://)."""
  run_dir = f"memory://pipeline-{uuid.uuid4().hex}"
  table = {"phatgoose": {"synthetic_sort": 50.0, "synthetic_sort_heldout": 25.0}}
  path = pipeline.write_table(table, ["synthetic_sort", "synthetic_sort_heldout"], run_dir)
  assert path == fs.join(run_dir, "results.md") and "| phatgoose | 50.0 | 25.0 |" in fs.read_text(path)
  assert json.loads(fs.read_text(fs.join(run_dir, "results.json")))["tasks"] == table
  shares = {"encoder/layers_0/attention/query": np.array([[1.0, 1.0], [2.0, 0.0]])}
  png = plot_routing(shares, ["synthetic_sort", "synthetic_sort_heldout"], ["sort", "reverse"],
                     fs.join(run_dir, "routing.png"))
  assert fs.read_bytes(png).startswith(b"\x89PNG\r\n\x1a\n") and fs.listdir(run_dir) == sorted(
      ["results.json", "results.md", "routing.png"])


def test_pipeline_user_errors_are_user_errors():
  """Settings that cannot work are ConfigErrors (one line from the CLI, no traceback)."""
  run_dir = f"memory://pipeline-{uuid.uuid4().hex}"
  with pytest.raises(ConfigError, match=r"unknown method\(s\) \['nope'\]"):
    pipeline.phatgoose_pipeline(run_dir=run_dir, methods=["phatgoose", "nope"])
  with pytest.raises(ConfigError, match="pretrain_steps=0 needs init_from"):
    pipeline.phatgoose_pipeline(run_dir=run_dir)
  with pytest.raises(ConfigError, match="needs pretrain_mixture"):
    pipeline.phatgoose_pipeline(run_dir=run_dir, pretrain_steps=2)
  with pytest.raises(ConfigError, match="'synthetic_copy' has no expert of its own"):
    oracle.oracle_expert("synthetic_copy", [["synthetic_sort"]])
  # An expert trained on several tasks (a Model-Based Clustering cluster) is the oracle of each, and of their
  # held-out templates.
  assert oracle.oracle_expert("synthetic_copy_heldout", [["synthetic_sort"], ["synthetic_add", "synthetic_copy"]]) == 1


def test_seed_tables_hold_the_mean_and_spread():
  """Two runs' results.json by hand: results.md holds each score's mean, then its sample standard deviation; the mean
  columns' spread is that of the runs' own means."""
  run_dir = f"memory://seeds-{uuid.uuid4().hex}"
  tasks = ["demo_case", "demo_case_heldout", "demo_smaller_heldout"]
  runs = [{"oracle": {"demo_case": 90.0, "demo_case_heldout": 60.0, "demo_smaller_heldout": float("nan")},
           "phatgoose": {"demo_case": 50.0, "demo_case_heldout": 40.0, "demo_smaller_heldout": 30.0}},
          {"oracle": {"demo_case": 100.0, "demo_case_heldout": 70.0, "demo_smaller_heldout": float("nan")},
           "phatgoose": {"demo_case": 54.0, "demo_case_heldout": 40.0, "demo_smaller_heldout": 50.0}}]
  dirs = []
  for i, table in enumerate(runs):
    dirs.append(fs.join(run_dir, f"seed_{i}"))
    pipeline.write_table(table, tasks, dirs[-1], ["demo_case"])
  path = pipeline.write_seed_tables(run_dir, dirs, ["demo_case"])
  text = fs.read_text(path)
  mean, spread = text.split("## Spread over 2 seeds")
  assert "| oracle | 95.0 | 65.0 | n/a | **95.0** | **65.0** | n/a | n/a |" in mean
  assert "| phatgoose | 52.0 | 40.0 | 40.0 | **52.0** | **40.0** | **40.0** | **44.0** |" in mean
  # sd of (50, 54) = 2.83; of (30, 50) = 14.14; of the means (40, 48) = 5.66
  assert "| phatgoose | 2.8 | 0.0 | 14.1 | **2.8** | **0.0** | **14.1** | **5.7** |" in spread
  assert json.loads(fs.read_text(fs.join(run_dir, "results.json")))["tasks"]["phatgoose"]["demo_case"] == 52.0
