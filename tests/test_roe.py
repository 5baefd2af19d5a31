"""Retrieval of Experts (ELM): the instance text, the vote and its tie-break, the top-k merge against a float64
average, the index kept per expert in the library (a grown library embeds only the new expert), and prompt experts
end to end on the tiny model: the experts each target retrieved are those the votes of its queries name, and the
oracle selection is the best single expert."""

import json

import flax
import gin
import jax
import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.methods import instances, pipeline
from moe_jax.methods.instances import InstanceIndex, instance_text
from moe_jax.models.config import ExpertConfig, T5Config
from tasks import synthetic

TINY = T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_roe")
EXPERTS = ["synthetic_reverse_t0", "synthetic_sort_t0", "synthetic_sort_t1"]
TARGETS = ["synthetic_sort_heldout_t0", "synthetic_reverse_heldout_t1"]


def test_instance_text_is_elms_format():
  example = {"inputs_pretokenized": "Is it good?", "answer_choices": ["yes", "no"]}
  assert instance_text(example) == "Answer Choices: yes, no, Instance: Is it good?"
  assert instance_text({"inputs_pretokenized": "Summarise: x"}) == "Instance: Summarise: x"
  assert instance_text(example, "{input} [{choices}]") == "Is it good? [yes, no]"


def test_vote_picks_the_majority_and_breaks_ties_by_closeness_then_index():
  e = np.eye(4, dtype=np.float32)
  index = InstanceIndex.from_embeddings([e[:1], e[1:2], e[2:4]])  # expert 2 holds two instances
  queries = np.array([e[2], e[3] + 0.1 * e[0], e[0], e[1] * 0.5 + e[0] * 0.1])
  chosen, votes = index.vote(queries, k=3)
  np.testing.assert_array_equal(votes, [1, 1, 2])
  # expert 0's vote is the closer one (cosine 1.0 against expert 1's ~0.98): it ranks above expert 1
  np.testing.assert_array_equal(chosen, [2, 0, 1])
  tied = InstanceIndex.from_embeddings([e[:1], e[1:2]])
  assert tied.vote(np.array([e[0], e[1]]), k=1)[0].tolist() == [0]  # equal votes and closeness: the lower index
  with pytest.raises(ConfigError, match="k=4 of 3"):
    index.vote(queries, k=4)


def test_crafted_index_routes_each_query_to_the_expert_holding_it():
  rng = np.random.default_rng(0)
  stored = [rng.normal(size=(5, 16)) for _ in range(4)]
  index = InstanceIndex.from_embeddings(stored)
  queries = np.stack([stored[3][2], stored[0][4], stored[2][0]]) * 3.0  # scale does not matter: cosine
  np.testing.assert_array_equal(index.nearest(queries)[0], [3, 0, 2])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cosine = unit(queries) @ unit(np.concatenate(stored)).T
  np.testing.assert_allclose(index.similarities(queries), cosine.reshape(3, 4, 5).max(-1), atol=1e-6)


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
  """ELM's setting on the tiny model: three prompt experts (no gates), two held-out targets, every RoE method."""
  run_dir = tmp_path_factory.mktemp("roe")
  gin.clear_config()
  gin.bind_parameter("train.batch_size", 8)
  gin.bind_parameter("roe_settings.instances", 6)
  gin.bind_parameter("roe_settings.queries", 5)
  gin.bind_parameter("roe_settings.merge_k", 2)
  try:
    pipeline.phatgoose_pipeline(
        run_dir=str(run_dir), expert_tasks=EXPERTS, eval_tasks=TARGETS, prompt_experts=True,
        pretrain_mixture="demo_pretrain", pretrain_steps=3, expert_steps=3, gate_steps=0,
        methods=["merged", "retrieval", "roe", "roe_merged", "best_expert"], max_eval_examples=8,
        retrieval_examples=8, eval_batch_size=8, model_config=TINY, experts=ExpertConfig(rank=4), top_k=1)
  finally:
    gin.clear_config()
  return run_dir


def test_prompt_experts_and_the_experts_each_target_retrieved(prompt_run):
  from moe_jax.data.pipeline import mixture_examples
  from moe_jax.library import ExpertLibrary

  library = ExpertLibrary(str(prompt_run / "library"), read_only=True)
  assert library.names() == sorted(EXPERTS) and library.info(EXPERTS[0]).tags == ("expert",)
  assert not (prompt_run / "gates").exists()  # gate_steps=0: ELM's experts have no gate
  selected = json.load(open(prompt_run / "selected_experts.json"))
  assert sorted(selected) == ["best_expert", "roe", "roe_merged"]
  assert all(len(selected["roe"][t]) == 1 and len(selected["roe_merged"][t]) == 2 for t in TARGETS)
  assert "## Experts selected per task" in open(prompt_run / "results.md").read()
  # The votes, recomputed in float64 from the stored index and the targets' first 5 instances (no labels).
  embed = instances.example_embedder(instances.instance_embedding(), TINY, None, synthetic.FEATURE_LENGTHS)
  stored = [library.get_auxiliary(name, "roe_index", _index_params(library, name))["embeddings"]
            for name in EXPERTS]
  assert all(len(s) == 6 for s in stored)
  unit = lambda x: np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True)
  owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(stored)])
  for target in TARGETS:
    queries = unit(embed(mixture_examples(target, "validation", synthetic.FEATURE_LENGTHS, 5)))
    votes = np.bincount(owner[np.argmax(queries @ unit(np.concatenate(stored)).T, axis=1)], minlength=3)
    assert votes[EXPERTS.index(selected["roe"][target][0])] == votes.max()
    assert selected["roe_merged"][target][0] == selected["roe"][target][0]


def _index_params(library, name):
  """The settings key the RoE index was stored under (the library's record of it)."""
  entries = [e for e in library.auxiliary_entries(name) if e["method"] == "roe_index"]
  assert len(entries) == 1
  return entries[0]["params"]


def test_best_expert_is_the_best_single_expert(prompt_run):
  """The oracle selection equals the best of each expert evaluated alone by `evaluate` over the library."""
  from moe_jax.evaluation import runner

  table = json.load(open(prompt_run / "results.json"))["tasks"]
  selected = json.load(open(prompt_run / "selected_experts.json"))["best_expert"]
  for target in TARGETS:
    alone = {name: runner.evaluate(
        output_dir=str(prompt_run / "alone" / name), tasks=[target], model_config=TINY, experts=ExpertConfig(rank=4),
        init_from=str(prompt_run / "backbone"), library=str(prompt_run / "library"), library_experts=[name],
        feature_lengths=synthetic.FEATURE_LENGTHS, max_examples=8, batch_size=8)[target]["accuracy"]
             for name in EXPERTS}
    assert table["best_expert"][target] == pytest.approx(max(alone.values()))
    assert alone[selected[target][0]] == max(alone.values())


def test_top_k_merge_is_the_parameter_average(prompt_run):
  """roe_merged's model for a target is backbone + one LoRA whose A and B are the float64 means of the chosen
  experts' A and B."""
  from moe_jax.library import ExpertLibrary
  from moe_jax.training import loop
  from moe_jax.training import partitioning as part
  from moe_jax.models import Transformer

  library = ExpertLibrary(str(prompt_run / "library"), read_only=True)
  chosen = json.load(open(prompt_run / "selected_experts.json"))["roe_merged"][TARGETS[0]]
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(str(prompt_run / "backbone"), TINY, part.logical_shardings(
      part.abstract_params(Transformer(TINY)), mesh, rules), seed=0)
  moe_tree, _ = library.stack(EXPERTS)
  gin.clear_config()
  gin.bind_parameter("roe_settings.instances", 6)
  gin.bind_parameter("roe_settings.queries", 5)
  gin.bind_parameter("roe_settings.merge_k", 2)
  try:
    with part.activate(mesh, rules):
      built = pipeline.build_methods(["roe_merged"], TINY, backbone.params, moe_tree, EXPERTS, 1,
                                     ExpertConfig(rank=4), 8, 8, synthetic.FEATURE_LENGTHS, mesh, rules,
                                     expert_library=library, max_eval_examples=8)
      params = built["roe_merged"].params_for(TARGETS[0])
  finally:
    gin.clear_config()
  assert built["roe_merged"].selected[TARGETS[0]] == chosen
  flat = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  experts = [flax.traverse_util.flatten_dict(library.get(n).weights) for n in chosen]
  factors = [key for key in experts[0] if key[-1] in ("lora_a", "lora_b")]
  assert factors
  for key in factors:
    expected = np.mean([np.asarray(e[key], np.float64) for e in experts], axis=0)
    np.testing.assert_allclose(flat[key], expected, rtol=0, atol=1e-7)


def test_the_index_grows_without_re_embedding(tmp_path):
  """An expert library keeps each expert's index entry: a second expert's index embeds only that expert."""
  from moe_jax.library import ExpertLibrary
  from moe_jax.library.expert import ExpertInfo, make_expert

  library = ExpertLibrary(str(tmp_path / "lib"))
  tree = lambda value: {"encoder": {"layers_0": {"mlp": {"wi": {
      "lora_a": np.full((1, 4, 2), value, np.float32), "lora_b": np.ones((1, 2, 4), np.float32),
      "router": np.zeros((1, 4), np.float32)}}}}}
  for value, name in enumerate(("a", "b")):
    library.add(make_expert(ExpertInfo(name=name, tasks=[name]), tree(value)))
  calls = []
  compute = lambda name: (calls.append(name), {"embeddings": np.full((3, 2), len(calls), np.float32)})[1]
  first = library.auxiliary("a", "roe_index", {"k": 1}, lambda: compute("a"))
  library.add(make_expert(ExpertInfo(name="c", tasks=["c"]), tree(2)))
  again = [library.auxiliary(n, "roe_index", {"k": 1}, lambda n=n: compute(n))["embeddings"] for n in ("a", "c")]
  assert calls == ["a", "c"]
  np.testing.assert_array_equal(again[0], first["embeddings"])
