"""Evaluation: log-likelihoods, rank classification and greedy decoding against independent references; metrics
and result files on the synthetic tasks."""

import functools
import json
import os
import subprocess
import sys
import uuid

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from rouge_score import rouge_scorer
from t5.evaluation import metrics

from moe_jax import fs
from moe_jax.evaluation import (choice_log_likelihoods, evaluate_task, greedy_generate, pad_tokens, rank_classify,
                                write_results)
from moe_jax.models import ExpertConfig, Fixed, T5Config, Transformer

CFG = T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
               num_decoder_layers=1, dtype="float32")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EXPERTS = 8  # one per synthetic skill, for oracle routing


def _init(model):
  tokens = jnp.ones((1, 4), jnp.int32)
  init = jax.jit(functools.partial(model.init, routing_ids=jnp.zeros(1, jnp.int32)))
  return nn.unbox(init(jax.random.PRNGKey(0), tokens, tokens)["params"])


@pytest.fixture(scope="module")
def plain():
  model = Transformer(CFG)
  return model, _init(model)


@pytest.fixture(scope="module")
def routed():
  """Experts that matter (random lora_b), one per example through `Fixed()` and routing ids."""
  # Experts on the encoder's and decoder's last linear only: enough to see routing, quick to compile.
  model = Transformer(CFG, ExpertConfig(num_experts=NUM_EXPERTS, rank=2, modules=r".*/mlp/wo", router=Fixed()))
  flat = flax.traverse_util.flatten_dict(_init(model))
  keys = iter(jax.random.split(jax.random.PRNGKey(1), len(flat)))
  flat = {k: jax.random.normal(next(keys), v.shape) if k[-1] == "lora_b" else v for k, v in flat.items()}
  return model, flax.traverse_util.unflatten_dict(flat)


def _data(seed, n=10, max_choices=4):
  """Right-padded inputs [n, 24] ending in EOS; ragged answer choices (2-4 per example, 1-4 tokens, ending in EOS)."""
  rng = np.random.default_rng(seed)
  inputs = pad_tokens([np.append(rng.integers(3, 259, k), 1) for k in rng.integers(3, 20, n)], 24)
  choices = [[np.append(rng.integers(3, 259, k), 1) for k in rng.integers(0, 4, rng.integers(2, max_choices + 1))]
             for _ in range(n)]
  return inputs, choices


def test_log_likelihoods_match_numpy_log_softmax(routed):
  model, params = routed
  inputs, choices = _data(0)
  routing_ids = np.arange(len(inputs)) % NUM_EXPERTS
  scores, lengths = choice_log_likelihoods(model, params, inputs, choices, batch_size=4, routing_ids=routing_ids)
  apply = jax.jit(model.apply)
  for i, example_choices in enumerate(choices):
    assert np.isneginf(scores[i, len(example_choices):]).all() and (lengths[i, len(example_choices):] == 0).all()
    for j, target in enumerate(example_choices):
      decoder_inputs = np.concatenate([[0], target[:-1]])[None]
      logits = np.asarray(apply({"params": params}, inputs[i:i + 1], decoder_inputs,
                                routing_ids=routing_ids[i:i + 1]), np.float64)[0]
      shifted = logits - logits.max(-1, keepdims=True)
      log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
      expected = log_softmax[np.arange(len(target)), target].sum()
      np.testing.assert_allclose(scores[i, j], expected, rtol=2e-5)
      assert lengths[i, j] == len(target)
  # Padded [N, C, Lt] choices give the same scores as ragged ones.
  padded = np.stack([pad_tokens(c + [np.zeros(0, np.int32)] * (4 - len(c)), 8) for c in choices])
  again, _ = choice_log_likelihoods(model, params, inputs, padded, batch_size=3, routing_ids=routing_ids)
  np.testing.assert_allclose(again, scores, rtol=1e-5)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_rank_classification_matches_t5(plain, length_normalize):
  model, params = plain
  for seed, max_choices in ((1, 4), (2, 2)):  # variable choices per example; exactly two per example
    inputs, choices = _data(seed, n=24, max_choices=max_choices)
    scores, lengths = choice_log_likelihoods(model, params, inputs, choices, batch_size=8)
    predicted = rank_classify(scores, lengths, length_normalize)
    rng = np.random.default_rng(seed)
    for _ in range(5):  # several answer keys, so agreement on accuracy pins down the predicted indices
      correct = [rng.integers(len(c)) for c in choices]
      targets = [((i, j), j == correct[i], 1.0, int(lengths[i, j])) for i, c in enumerate(choices)
                 for j in range(len(c))]
      flat = [float(scores[i, j]) for i, c in enumerate(choices) for j in range(len(c))]
      num_classes = max_choices if all(len(c) == max_choices for c in choices) else None
      reference = metrics.rank_classification(targets, flat, num_classes=num_classes,
                                              normalize_by_target_length=length_normalize)
      assert reference["accuracy"] == pytest.approx(100 * np.mean(predicted == np.array(correct)))


def test_greedy_generate_matches_naive_loop(routed):
  model, params = routed
  inputs, _ = _data(3, n=12)
  routing_ids = np.arange(len(inputs)) % NUM_EXPERTS
  max_length = 6
  # A random model never says EOS: give EOS the output column of a token often chosen third, so some
  # sequences stop early and others run to max_length.
  first = greedy_generate(model, params, inputs, max_length, routing_ids, batch_size=5)
  kernel = np.array(params["decoder"]["logits_dense"]["kernel"])
  token = np.bincount(first[:, 2]).argmax()
  kernel[:, 1], kernel[:, token] = kernel[:, token], 0.9 * kernel[:, token]
  params = flax.core.copy(params, {"decoder": {**params["decoder"], "logits_dense": {"kernel": kernel}}})
  got = greedy_generate(model, params, inputs, max_length, routing_ids, batch_size=5)

  apply = jax.jit(model.apply)
  prefix = np.zeros((len(inputs), 1), np.int32)  # the reference: the whole growing prefix, no padding, no loop
  expected = np.zeros((len(inputs), max_length), np.int32)
  done = np.zeros(len(inputs), bool)
  for step in range(max_length):
    logits = apply({"params": params}, inputs, prefix, routing_ids=routing_ids)
    token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)
    expected[:, step] = np.where(done, 0, token)
    done |= token == 1
    prefix = np.concatenate([prefix, token[:, None]], axis=1)
  np.testing.assert_array_equal(got, expected)
  stopped = (got == 1).any(axis=1)
  assert stopped.any() and not stopped.all()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_results(tmp_path, where):
  """On a local folder and on a URL (memory:// stands in for gs://): the files go through moe_jax.fs."""
  out = str(tmp_path) if where == "local" else f"memory://results-{uuid.uuid4().hex}"
  results = {"b_task": {"accuracy": 50.0, "exact_match": 10.0}, "a_task": {"accuracy": np.float32(25.0)}}
  predictions = {"a_task": [{"input": "x", "target": "y", "prediction": "ÿ", "scores": [-1.5, -2.0]}]}
  write_results(results, out, predictions)
  saved = json.loads(fs.read_text(fs.join(out, "results.json")))
  assert saved["mean"] == {"accuracy": 37.5, "exact_match": 10.0} and saved["tasks"]["a_task"]["accuracy"] == 25.0
  table = fs.read_text(fs.join(out, "results.md")).splitlines()
  assert table[0] == "| task | accuracy | exact_match |"
  assert table[2] == "| a_task | 25.00 |  |" and table[-1] == "| **mean** (2 tasks) | 37.50 | 10.00 |"
  lines = fs.read_text(fs.join(out, "predictions", "a_task.jsonl")).splitlines()
  assert [json.loads(line) for line in lines] == predictions["a_task"]
  assert fs.listdir(out) == ["predictions", "results.json", "results.md"]  # no tmp files


def test_evaluation_imports_without_tensorflow():
  code = ("import sys, moe_jax.evaluation, moe_jax.data, moe_jax.data.vocab, moe_jax.models; "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio', 't5')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_evaluate_task_on_synthetic(plain, routed, tmp_path):
  """The model path end to end: records for every example, a prediction among its choices, routing ids reaching
  the experts. The metrics themselves are checked on known scores below."""
  from tasks import synthetic

  lengths = synthetic.FEATURE_LENGTHS
  model, params = plain
  rank = evaluate_task(model, params, "synthetic_sort_heldout", batch_size=4, feature_lengths=lengths,
                       max_examples=10)
  assert rank["mode"] == "rank" and set(rank["metrics"]) == {"accuracy"} and len(rank["predictions"]) == 10
  assert 0.0 <= rank["metrics"]["accuracy"] <= 100.0
  for p in rank["predictions"]:
    assert p["prediction"] == p["choices"][int(np.argmax(np.array(p["scores"]) / np.array(p["lengths"])))]

  gen = evaluate_task(model, params, "synthetic_sort_heldout", batch_size=4, feature_lengths=lengths,
                      mode="generate", max_examples=6)
  assert set(gen["metrics"]) == {"exact_match"} and len(gen["predictions"]) == 6

  model, params = routed
  routed_scores = [
      [p["scores"] for p in evaluate_task(model, params, "synthetic_add_heldout", batch_size=4,
                                          feature_lengths=lengths, max_examples=4, routing_ids_fn=fn)["predictions"]]
      for fn in (synthetic.oracle_routing_ids, lambda task, examples: [0] * len(examples))]
  assert not np.allclose(*routed_scores)  # the routing ids reach the experts

  write_results({"synthetic_sort_heldout": rank["metrics"]}, str(tmp_path),
                {"synthetic_sort_heldout": rank["predictions"]})
  record = json.loads((tmp_path / "predictions" / "synthetic_sort_heldout.jsonl").read_text().splitlines()[0])
  assert set(record) == {"input", "target", "prediction", "choices", "scores", "lengths"}


def test_synthetic_metrics_on_known_scores_and_predictions(monkeypatch):
  """evaluate_task's metric path on hand-chosen model outputs (the model is never called).

  Rank: 4 examples, 4 choices each (one correct). Example i gets log-likelihood -1 for choice c_i and -5 for the
  others, each choice counted as 1 token, with c_i = its correct choice for examples 0 and 2 and the first wrong
  choice for 1 and 3 -> 2 of 4 right = 50%.
  Generate: predictions = the target for examples 0, 1 and 3, the target with its last character dropped for 2
  -> 3 of 4 = 75% exact match.
  """
  from moe_jax.data.pipeline import eval_examples
  from tasks import synthetic

  lengths = synthetic.FEATURE_LENGTHS
  examples = eval_examples("synthetic_sort_heldout", "validation", lengths, 4)
  right = [e["answer_choices"].index(e["targets_pretokenized"]) for e in examples]
  wrong = [next(j for j in range(4) if j != r) for r in right]
  picked = [right[0], wrong[1], right[2], wrong[3]]
  scores = np.full((4, 4), -5.0, np.float32)
  scores[np.arange(4), picked] = -1.0
  monkeypatch.setattr("moe_jax.evaluation.evaluate.choice_log_likelihoods",
                      lambda *args, **kwargs: (scores, np.ones((4, 4), np.int32)))
  rank = evaluate_task(None, None, "synthetic_sort_heldout", feature_lengths=lengths, max_examples=4)
  assert rank["metrics"] == {"accuracy": pytest.approx(50.0)}
  assert [p["prediction"] for p in rank["predictions"]] == [e["answer_choices"][j] for e, j in zip(examples, picked)]

  texts = [e["targets_pretokenized"] for e in examples]
  texts[2] = texts[2][:-1]
  vocab = seqio.ByteVocabulary()
  monkeypatch.setattr("moe_jax.evaluation.evaluate.greedy_generate", lambda model, params, inputs, max_length, *a:
                      pad_tokens([np.array(vocab.encode(t) + [1]) for t in texts], max_length))
  gen = evaluate_task(None, None, "synthetic_sort_heldout", feature_lengths=lengths, mode="generate", max_examples=4)
  assert gen["metrics"] == {"exact_match": pytest.approx(75.0)}


def test_exact_match_metrics_on_hand_labelled_examples():
  from tasks import common, synthetic

  # synthetic: exact string equality, no stripping: "abc" = "abc" right, "de" vs "d" wrong, "f" vs "f " wrong,
  # "" = "" right -> 2 of 4 = 50%.
  assert synthetic.exact_match(["abc", "de", "f", ""], ["abc", "d", "f ", ""]) == {"exact_match": 50.0}
  # any reference, after stripping: " yes" in [yes, y] right, "no" in [nope] wrong, "2" in [two, 2 ] right
  # -> 2 of 3 = 66.67%.
  got = common.exact_match_any([["yes", "y"], ["nope"], ["two", "2 "]], [" yes", "no", "2"])
  assert got == {"exact_match": pytest.approx(200 / 3)}


def test_rouge_first_on_hand_labelled_examples():
  """rouge_first scores each prediction against its first reference only. Example: reference "the cat sat on the
  mat" (the second reference is ignored), prediction "the cat lay on a mat":
    ROUGE-1: 4 of 6 unigrams shared (the, cat, on, mat) each way -> F = 2/3; ROUGE-2: 1 of 5 bigrams (the cat) ->
    F = 1/5; ROUGE-Lsum: LCS the cat on mat = 4 of 6 -> F = 2/3.
  Two examples with these same scores (the second: reference "one two three four five six" ~ prediction
  "one two seven four eight six"... no: built so that every F is equal), so the bootstrap mean is exact."""
  from tasks import common

  refs = [["the cat sat on the mat", "a cat lay on a mat"], ["A dog ran to the park", "x"]]
  preds = ["the cat lay on a mat", "a dog sat to my park"]
  # Example 2, lower-cased: (a dog ran to the park) vs (a dog sat to my park): unigrams a, dog, to, park shared
  # -> 4/6; bigrams (a dog, dog ran, ran to, to the, the park) vs (a dog, dog sat, sat to, to my, my park):
  # a dog -> 1/5; LCS a dog to park = 4 -> 4/6. The same F scores as example 1.
  expected = {"rouge1": 200 / 3, "rouge2": 20.0, "rougeLsum": 200 / 3}
  assert common.rouge_first(refs, preds) == pytest.approx(expected)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])  # the package directly
  for (ref, _), pred in zip(refs, preds):
    scores = scorer.score(ref, pred)
    assert {k: 100 * v.fmeasure for k, v in scores.items()} == pytest.approx(expected)
