"""P3, FLAN and BIG-bench tasks on tiny files in the releases' schemas: registration, preprocessing, the feature
converter, evaluation end to end on a tiny model, and errors that name the dataset, file and row."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqio

import data_fixtures as fx
import tasks  # noqa: F401
from moe_jax.data import files, pipeline
from moe_jax.evaluation import evaluate_task
from moe_jax.models import T5Config, Transformer
from tasks import bigbench, flan, p3

LENGTHS = {"inputs": 64, "targets": 16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 12  # fixture examples per config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A data root with P3, BIG-bench and a split FLAN release; the data root points at it for the module."""
  path = str(tmp_path_factory.mktemp("data"))
  fx.write_p3(path, N)
  fx.write_bigbench(path)
  release = os.path.join(path, "release")
  fx.write_rows(os.path.join(release, "flan_zsopt", "part-0.parquet"), fx.flan_release_rows()[:100])
  fx.write_rows(os.path.join(release, "niv2_zsopt", "part-0.jsonl"), fx.flan_release_rows()[100:])
  categories = os.path.join(path, "niv2_categories.json")
  with open(categories, "w") as f:
    json.dump({"task001_quoref_question_generation": "Question Generation"}, f)
  flan.split_release(release, path, categories)
  with fx.data_root(path):
    yield path


def _names(mixture):
  return [t.name for t in pipeline.get_provider(mixture).tasks]


def test_p3_tasks_and_mixtures(root):
  assert _names("p3_ag_news") == ["p3_ag_news_classify", "p3_ag_news_which_section"]
  assert _names("p3_duorc") == ["p3_duorc_ParaphraseRC_answer", "p3_duorc_SelfRC_answer"]  # both subsets
  assert _names("t0_rte") == ["p3_super_glue_rte_GPT_3_style_score_eval"]  # evaluation: original-task templates only
  assert _names("t0_heldout") == ["p3_super_glue_rte_GPT_3_style_score_eval"]
  assert set(_names("p3_t0_heldin")) == set(_names("p3_ag_news") + _names("p3_duorc"))  # the pool datasets present
  assert len(p3.P3_POOL) == 36 and len(p3.T0_HELDOUT) == 11
  assert p3.EXPERT_TASKS[0] == "p3_ag_news" and p3.EXPERT_TASKS[17] == "p3_duorc"


def test_p3_score_eval_groups_choices_into_examples(root):
  grouped = pipeline.eval_examples("p3_super_glue_rte_GPT_3_style_score_eval", "validation", LENGTHS)
  plain = pipeline.eval_examples("p3_super_glue_rte_GPT_3_style", "validation", LENGTHS)
  assert len(grouped) == len(plain) == N
  for g, p in zip(grouped, plain):
    assert g["inputs_pretokenized"] == p["inputs_pretokenized"]
    assert g["answer_choices"] == ["even", "odd"] and g["correct_choices"] == [p["targets_pretokenized"]]
    np.testing.assert_array_equal(g["inputs"], p["inputs"])


def test_p3_training_batches_through_the_feature_converter(root):
  batch = next(pipeline.train_batches("p3_t0_heldin", LENGTHS, 8, seed=3))
  assert {k: v.shape for k, v in batch.items()} == {k: (8, LENGTHS[f]) for k, f in (
      ("encoder_input_tokens", "inputs"), ("decoder_input_tokens", "targets"), ("decoder_target_tokens", "targets"),
      ("decoder_loss_weights", "targets"))}
  vocab = seqio.get_mixture_or_task("p3_ag_news_classify").output_features["inputs"].vocabulary
  texts = [vocab.decode([t for t in row if t > 1]) for row in batch["encoder_input_tokens"]]
  templates = ("Classify: number ", "Section of number ", "Answer about number ", "Paraphrase answer number ")
  assert all(t.startswith(templates) for t in texts), texts
  targets = {vocab.decode([t for t in row if t > 1]) for row in batch["decoder_target_tokens"]}
  assert targets <= {"even", "odd"}


def test_p3_row_files_read_like_the_release(root):
  """A `datasets`-style parquet/JSON-lines copy of a config gives the same examples as the TFRecord release."""
  template = "{text} True or False?"
  fx.write_rows(os.path.join(root, "p3", "data", "rowfile_copy", "validation.parquet"), fx.p3_rows(template, N))
  fx.write_rows(os.path.join(root, "p3", "data", "rowfile_copy_score_eval", "validation.jsonl"),
                fx.p3_score_rows(template, N))
  p3.register()
  for copy, release in (("p3_rowfile_copy", "p3_super_glue_rte_GPT_3_style"),
                        ("p3_rowfile_copy_score_eval", "p3_super_glue_rte_GPT_3_style_score_eval")):
    a, b = (pipeline.eval_examples(name, "validation", LENGTHS) for name in (copy, release))
    assert len(a) == len(b) == N
    for x, y in zip(a, b):
      assert {k: v for k, v in x.items() if "tokens" not in k and k not in ("inputs", "targets")} == \
             {k: v for k, v in y.items() if "tokens" not in k and k not in ("inputs", "targets")}
      np.testing.assert_array_equal(x["inputs"], y["inputs"])


def _p3_config(root, config, split, rows, features):
  fx.write_p3_config(root, config, split, rows, features)
  p3.register()


def test_p3_malformed_rows_name_file_and_row(root):
  rows = fx.p3_rows("Q {text}", 5)
  del rows[3]["targets_pretokenized"]
  _p3_config(root, "broken_rows", "train", rows, fx.P3_FEATURES)
  with pytest.raises(files.MalformedRowError, match=r"broken_rows/train\.tfrecord-00000-of-00001, row 3: missing "
                     r"field 'targets_pretokenized'"):
    next(pipeline.train_batches("p3_broken_rows", LENGTHS, 2))
  rows = fx.p3_rows("Q {text}", 5)
  rows[2]["answer_choices"] = []
  _p3_config(root, "no_choices", "validation", rows, {**fx.P3_FEATURES, **fx.P3_CHOICES})
  with pytest.raises(files.MalformedRowError, match=r"no_choices/validation\.tfrecord.*, row 2: empty "
                     r"answer_choices"):
    pipeline.eval_examples("p3_no_choices", "validation")
  rows = fx.p3_score_rows("Q {text}", 3)
  rows[2]["is_correct"] = rows[3]["is_correct"] = 0  # example 1 has no correct choice
  _p3_config(root, "none_correct_score_eval", "validation", rows, {**fx.P3_FEATURES, **fx.P3_SCORE})
  with pytest.raises(files.MalformedRowError, match=r"row 2: no answer choice of example 1 is marked is_correct"):
    pipeline.eval_examples("p3_none_correct_score_eval", "validation")


def test_missing_data_names_dataset_path_and_command(root, monkeypatch):
  with pytest.raises(files.DataNotFoundError, match=r"P3 ag_news_classify \(test\).*ag_news_classify.*prepare p3"):
    pipeline.eval_examples("p3_ag_news_classify", "test")
  with pytest.raises(files.DataNotFoundError, match=r"flan_glue_cola.*flan/flan_glue_cola.*prepare flan"):
    pipeline.eval_examples("flan_glue_cola", "validation")
  with pytest.raises(files.DataNotFoundError, match=r"BIG-bench snarks.*bigbench/snarks.*prepare bigbench"):
    pipeline.eval_examples("bbh_snarks", "validation")
  with pytest.raises(files.DataNotFoundError, match=r"P3 member\(s\) \['p3_amazon_polarity'.*prepare p3"):
    pipeline.get_provider("flan_pool")
  with pytest.raises(files.DataNotFoundError, match=r"P3 hellaswag \(configs hellaswag_\*\).*p3/data.*prepare p3"):
    pipeline.get_provider("t0_hellaswag")
  monkeypatch.delenv(files.ENV_VAR)
  with pytest.raises(files.DataNotFoundError, match=r"DATA_DIR"):
    pipeline.eval_examples("flan_glue_sst2", "validation")


def test_flan_pool_composition_and_order():
  assert len(flan.FLAN_POOL) == len(set(flan.FLAN_POOL)) == 166
  assert flan.FLAN_POOL[:36] == p3.EXPERT_TASKS
  kinds = [name.split("_")[0] for name in flan.FLAN_POOL]
  assert kinds.count("flan") == 36 + 8 and kinds.count("niv2") == 75 and kinds.count("dialog") == 4
  assert kinds.count("p3") == 36 + 7
  assert flan.FLAN_POOL[36] == "flan_ai2_arc_arc_easy" and flan.FLAN_POOL[-1] == "flan_wmt14_translate_fr_en"


def test_flan_release_split_zero_shot_by_member(root):
  rows = fx.flan_release_rows()
  expected = {}
  for name, task in (("flan_glue_sst2", "glue/sst2:2.0.0"), ("niv2_question_generation",
                                                             "task001_quoref_question_generation")):
    expected[name] = sorted(r["inputs"] for r in rows if r["_task_name"] == task and r["_template_type"] == "zs_opt")
    found = [e["inputs_pretokenized"] for split in flan.SPLITS for e in pipeline.eval_examples(name, split)]
    assert sorted(found) == expected[name]  # few-shot rows dropped, nothing lost between the splits
  validation = pipeline.eval_examples("flan_bool_q", "validation")
  train = pipeline.eval_examples("flan_bool_q", "train")
  assert not {e["inputs_pretokenized"] for e in validation} & {e["inputs_pretokenized"] for e in train}
  batch = next(pipeline.train_batches("flan_bool_q", LENGTHS, 4))
  assert batch["encoder_input_tokens"].shape == (4, LENGTHS["inputs"])


def test_flan_malformed_row_names_file_and_row(root):
  path = fx.write_rows(os.path.join(root, "flan", "flan_glue_cola", "train.jsonl"),
                       [{"inputs": "a", "targets": "b"}, {"inputs": "c"}])
  with pytest.raises(ValueError, match=rf"{path}, row 1: missing field\(s\) \['targets'\]"):
    next(pipeline.train_batches("flan_glue_cola", LENGTHS, 2))


def test_bigbench_examples(root):
  rank = pipeline.eval_examples("bbh_causal_judgment", "validation", LENGTHS)
  assert len(rank) == 6 and all(e["inputs_pretokenized"].endswith("\nAnswer:") for e in rank)
  assert [e["correct_choices"] for e in rank] == [["yes"], ["no"]] * 3
  generate = pipeline.eval_examples("bbh_word_sorting", "validation", LENGTHS)
  assert generate[1]["references"] == ["1 2 3"] and "answer_choices" not in generate[1]
  bbh_file = pipeline.eval_examples("bbh_web_of_lies", "validation", LENGTHS)
  assert [e["answer_choices"] for e in bbh_file] == [["Yes", "No"]] * 6
  assert _names("bbh") == [f"bbh_{t.name}" for t in bigbench.BBH] and len(bigbench.BBH) == 22
  assert len(bigbench.BBLITE) == 17


def test_bigbench_from_a_tfds_prepared_copy(root):
  """A task prepared by TFDS (`bigbench/<task>/<version>/` under the data root) reads like the row files."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  rows = [{"idx": i, "inputs": f"Go {i} steps. Back?", "targets": ["Yes" if i % 2 else "No"],
           "multiple_choice_targets": ["Yes", "No"], "multiple_choice_scores": [i % 2, 1 - i % 2]} for i in range(4)]
  text = tfds.features.Text()

  class Bigbench(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="navigate")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "idx": tf.int32, "inputs": text, "targets": tfds.features.Sequence(text),
          "multiple_choice_targets": tfds.features.Sequence(text),
          "multiple_choice_scores": tfds.features.Sequence(tf.int32)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(rows[:1]), "validation": self._generate_examples(rows[1:])}

    def _generate_examples(self, part):
      yield from ((r["idx"], r) for r in part)

  Bigbench(data_dir=root).download_and_prepare()
  examples = pipeline.eval_examples("bbh_navigate", "validation", LENGTHS)
  assert sorted(e["inputs_pretokenized"] for e in examples) == sorted(r["inputs"] + "\nAnswer:" for r in rows)
  assert all(e["correct_choices"] == [e["targets_pretokenized"]] for e in examples)
  assert sorted(e["targets_pretokenized"] for e in examples) == ["No", "No", "Yes", "Yes"]


def test_bigbench_malformed_row(root):
  path = fx.write_rows(os.path.join(root, "bigbench", "snarks", "validation.jsonl"), [
      {"inputs": "x", "targets": ["a"], "multiple_choice_targets": ["a", "b"], "multiple_choice_scores": [1, 0]},
      {"inputs": "y", "targets": ["a"], "multiple_choice_targets": [], "multiple_choice_scores": []}])
  with pytest.raises(files.MalformedRowError, match=rf"{path}, row 1: empty multiple_choice_targets"):
    pipeline.eval_examples("bbh_snarks", "validation")


@pytest.fixture(scope="module")
def tiny():
  config = T5Config(vocab_size=264, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                    num_decoder_layers=1, dtype="float32")
  model = Transformer(config)
  tokens = jnp.ones((1, 4), jnp.int32)
  return model, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)["params"])


def _known_scores(monkeypatch, sums, lengths):
  """evaluate_task's scores: hand-chosen summed log-likelihoods and token counts per (example, choice) in place of
  the model's (ragged lists, padded here as `choice_log_likelihoods` pads: -inf and 0 for a missing choice)."""
  width = max(len(row) for row in sums)
  scores = np.full((len(sums), width), -np.inf, np.float32)
  counts = np.zeros((len(sums), width), np.int32)
  for i, (s, n) in enumerate(zip(sums, lengths)):
    scores[i, :len(s)], counts[i, :len(n)] = s, n

  def fake(model, params, inputs, choices, **kwargs):
    assert [len(c) for c in choices] == [len(s) for s in sums]  # the fixture's examples and choices, in order
    return scores, counts

  monkeypatch.setattr("moe_jax.evaluation.evaluate.choice_log_likelihoods", fake)


def _several_correct(root):
  """A BIG-bench task and a P3 score-eval config whose examples have several correct choices."""
  fx.write_rows(os.path.join(root, "bigbench", "date_understanding", "validation.jsonl"), [
      {"inputs": "q0", "targets": ["a"], "multiple_choice_targets": ["a", "b", "c"], "multiple_choice_scores": [1, 1, 0]},
      {"inputs": "q1", "targets": ["c"], "multiple_choice_targets": ["a", "b", "c"], "multiple_choice_scores": [0, 0, 1]},
      {"inputs": "q2", "targets": ["y"], "multiple_choice_targets": ["x", "y", "z", "w"],
       "multiple_choice_scores": [0, 1, 0, 1]},
      {"inputs": "q3", "targets": ["p"], "multiple_choice_targets": ["p", "q"], "multiple_choice_scores": [1, 0]}])
  correct = ({"even", "both"}, {"odd"}, {"odd", "both"})
  rows = [{"inputs_pretokenized": f"Number {i}?", "targets_pretokenized": choice,
           "answer_choices": ["even", "odd", "both"], "idx": [i, j], "is_correct": int(choice in right),
           "weight": 1.0} for i, right in enumerate(correct) for j, choice in enumerate(["even", "odd", "both"])]
  _p3_config(root, "several_correct_score_eval", "validation", rows, {**fx.P3_FEATURES, **fx.P3_CHOICES,
                                                                      **fx.P3_SCORE})


# task: (summed log-likelihoods, token counts, choice picked with / without length normalisation,
#        accuracy with / without it), worked out by hand.
RANK_CASES = {
    # correct: {a, b}, {c}, {y, w}, {p}.
    # ex0: per token -3/2 = -1.5, -4/4 = -1, -2.5/1 = -2.5 -> b (right); summed: c (-2.5 > -3 > -4) (wrong).
    # ex1: per token -1, -2, -2 -> a (wrong); summed: a (wrong).
    # ex2: -5, -0.5, -1, -4, one token each -> y (right) either way.
    # ex3: -2, -2: a tie goes to the first choice, p (right) either way.
    # Normalised: 3 of 4 right = 75%; summed: 2 of 4 = 50%.
    "bbh_date_understanding": ([[-3, -4, -2.5], [-1, -2, -6], [-5, -0.5, -1, -4], [-2, -2]],
                               [[2, 4, 1], [1, 1, 3], [1, 1, 1, 1], [1, 1]],
                               (["b", "a", "y", "p"], ["c", "a", "y", "p"]), (75.0, 50.0)),
    # correct: {even, both}, {odd}, {odd, both}.
    # ex0: per token -2/2 = -1, -1.5/1 = -1.5, -3/6 = -0.5 -> both (right); summed: odd (-1.5) (wrong).
    # ex1: -1, -3, -2, one token each -> even (wrong) either way.
    # ex2: -4, -1, -2, one token each -> odd (right) either way.
    # Normalised: 2 of 3 = 66.67%; summed: 1 of 3 = 33.33%.
    "p3_several_correct_score_eval": ([[-2, -1.5, -3], [-1, -3, -2], [-4, -1, -2]], [[2, 1, 6], [1, 1, 1], [1, 1, 1]],
                                      (["both", "even", "odd"], ["odd", "even", "odd"]), (200 / 3, 100 / 3)),
    # correct: the fixture's labels, yes / no alternating over its 6 rows (train rows 0-2, then validation 3-5).
    # choices [yes, no], one token each, so summed = per token: yes, yes, no, no, yes, yes -> right: rows 0, 3, 4
    # -> 3 of 6 = 50%.
    "bbh_causal_judgment": ([[-1, -2], [-1, -2], [-2, -1], [-2, -1], [-1, -2], [-1, -2]], [[1, 1]] * 6,
                            (["yes", "yes", "no", "no", "yes", "yes"],) * 2, (50.0, 50.0)),
}


@pytest.mark.parametrize("task", sorted(RANK_CASES))
@pytest.mark.parametrize("length_normalize", [True, False])
def test_rank_classification_accuracy_on_known_scores(root, monkeypatch, task, length_normalize):
  """Given hand-chosen per-choice scores, evaluate_task picks the choices and reports the accuracy worked out by
  hand (RANK_CASES), a prediction among several correct choices counting as right."""
  _several_correct(root)
  sums, lengths, picked, accuracy = RANK_CASES[task]
  _known_scores(monkeypatch, sums, lengths)
  if task == "bbh_causal_judgment":
    examples = pipeline.eval_examples(task, "validation", LENGTHS)
    assert [e["correct_choices"] for e in examples] == [["yes"], ["no"], ["yes"], ["no"], ["yes"], ["no"]]
  result = evaluate_task(None, None, task, "validation", batch_size=4, feature_lengths=LENGTHS,
                         length_normalize=length_normalize)
  assert result["mode"] == "rank"
  assert [r["prediction"] for r in result["predictions"]] == picked[0 if length_normalize else 1]
  assert result["metrics"]["accuracy"] == pytest.approx(accuracy[0 if length_normalize else 1])


def _known_generations(monkeypatch, texts):
  """evaluate_task's greedy decoding: the byte tokens of hand-chosen strings (EOS-terminated) in place of the
  model's."""
  def fake(model, params, inputs, max_length, routing_ids=None, batch_size=32):
    assert len(inputs) == len(texts)
    vocab = seqio.ByteVocabulary()
    return np.stack([np.pad(vocab.encode(t) + [1], (0, max_length - len(vocab.encode(t)) - 1)) for t in texts])

  monkeypatch.setattr("moe_jax.evaluation.evaluate.greedy_generate", fake)


def test_generation_exact_match_on_known_predictions(root, monkeypatch):
  """bbh_word_sorting's references are "i i+1 i+2" for rows i = 0..5. Predictions: row 0 right with spaces
  around it (stripped), 1 right, 2 short, 3 right, 4 empty, 5 wrong -> 3 of 6 = 50%."""
  _known_generations(monkeypatch, [" 0 1 2 ", "1 2 3", "2 3", "3 4 5", "", "5 6 8"])
  result = evaluate_task(None, None, "bbh_word_sorting", "validation", batch_size=4, feature_lengths=LENGTHS)
  assert result["mode"] == "generate"
  assert [r["prediction"] for r in result["predictions"]][:2] == [" 0 1 2 ", "1 2 3"]
  assert result["metrics"] == {"exact_match": pytest.approx(50.0)}


def test_generation_exact_match_any_reference(root, monkeypatch):
  """Several references per example (BIG-bench object_counting): a prediction matching any counts. References
  [3, three], [4, four], [5]; predictions "three" (right), "4" (right), "five" (wrong) -> 2 of 3 = 66.67%."""
  fx.write_rows(os.path.join(root, "bigbench", "object_counting", "validation.jsonl"), [
      {"inputs": f"Count {n}", "targets": refs} for n, refs in ((3, ["3", "three"]), (4, ["4", "four"]), (5, ["5"]))])
  _known_generations(monkeypatch, ["three", "4", "five"])
  result = evaluate_task(None, None, "bbh_object_counting", "validation", batch_size=4, feature_lengths=LENGTHS)
  assert result["metrics"] == {"exact_match": pytest.approx(200 / 3)}


def test_generation_rouge_against_the_first_reference(root, monkeypatch):
  """BIG-bench conlang_translation is scored by ROUGE against each example's first reference. Reference "the cat
  sat on the mat" (the second, "a cat lay on a mat", is ignored), prediction "the cat lay on a mat", worked out by
  hand (rouge_score's tokens: lower-cased words):
    ROUGE-1: 6 reference and 6 predicted unigrams, 4 shared (the, cat, on, mat) -> P = R = 4/6, F = 66.67.
    ROUGE-2: bigrams (the cat, cat sat, sat on, on the, the mat) vs (the cat, cat lay, lay on, on a, a mat): 1 shared
             -> P = R = 1/5, F = 20.
    ROUGE-Lsum: one sentence, longest common subsequence the cat on mat = 4 -> P = R = 4/6, F = 66.67.
  One example, so t5's bootstrap aggregation returns it exactly."""
  fx.write_rows(os.path.join(root, "bigbench", "conlang_translation", "validation.jsonl"), [
      {"inputs": "Translate: x", "targets": ["the cat sat on the mat", "a cat lay on a mat"]}])
  _known_generations(monkeypatch, ["the cat lay on a mat"])
  result = evaluate_task(None, None, "bblite_conlang_translation", "validation", batch_size=4,
                         feature_lengths={"inputs": 64, "targets": 32})
  assert result["metrics"] == pytest.approx({"rouge1": 200 / 3, "rouge2": 20.0, "rougeLsum": 200 / 3})


def test_rank_classification_end_to_end_on_a_model(root, tiny):
  """The scores evaluate_task ranks are the model's: a prediction is the choice of best per-token score, and
  the records keep every choice's score and token count (token counts = the choice's byte tokens + EOS)."""
  result = evaluate_task(*tiny, "bbh_web_of_lies", "validation", batch_size=4, feature_lengths=LENGTHS)
  assert len(result["predictions"]) == 6 and result["mode"] == "rank"
  for record in result["predictions"]:
    assert record["choices"] == ["Yes", "No"] and record["lengths"] == [4, 3]
    best = int(np.argmax(np.asarray(record["scores"]) / np.asarray(record["lengths"])))
    assert record["prediction"] == record["choices"][best]


def _gin_value(name):
  """A binding's value, with macros and constants resolved."""
  import gin

  value = gin.query_parameter(name)
  while isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value


def test_data_gin_files_bind_the_root_and_the_lists(root):
  import gin

  from moe_jax import gin_utils

  for data_file, lists in (("data/t0_heldout_eval.gin", p3.HELDOUT_TASKS),
                           ("data/bbh_eval.gin", tuple(f"bbh_{t.name}" for t in bigbench.BBH))):
    gin.clear_config()
    gin_utils.configure(["evaluate.gin", data_file], [f"DATA_DIR = '{root}'"])
    assert files.data_root() == root
    assert tuple(_gin_value("evaluate.tasks")) == lists
  for data_file, pool in (("data/p3.gin", p3.EXPERT_TASKS), ("data/flan.gin", flan.FLAN_POOL)):
    gin.clear_config()
    gin_utils.configure([data_file], [])
    assert tuple(_gin_value("%EXPERT_TASKS")) == pool
  gin.clear_config()


def test_prepare_flan_cli(tmp_path):
  release = tmp_path / "release"
  fx.write_rows(str(release / "part.jsonl"), fx.flan_release_rows(10))
  run = lambda *args: subprocess.run([sys.executable, "-m", "moe_jax.data", "prepare", *args], cwd=REPO,
                                     capture_output=True, text=True, timeout=300)
  done = run("flan", "--source", str(release), "--out", str(tmp_path / "out"))
  assert done.returncode == 0, done.stderr
  assert "NIV2 rows had no known category" in done.stdout  # no category map given: said, not silently dropped
  assert sorted(os.listdir(tmp_path / "out" / "flan")) == ["dialog_qrecc", "flan_bool_q", "flan_glue_sst2"]
  bad = run("p3", "--source", str(release), "--out", str(tmp_path / "out"))
  assert bad.returncode == 2 and "apply to `prepare flan` only" in bad.stderr


def test_real_scale_configs_resolve():
  import gin

  import moe_jax.train  # noqa: F401  (registers `job`)
  from moe_jax import gin_utils

  for config_file, pool, evals in (("phatgoose_p3_t5xl.gin", p3.EXPERT_TASKS, p3.HELDOUT_TASKS),
                                   ("phatgoose_flan_t5xl.gin", flan.FLAN_POOL,
                                    tuple(f"bbh_{t.name}" for t in bigbench.BBH))):
    gin.clear_config()
    gin_utils.configure([config_file], ["BACKBONE = '/ckpt/t5-xl-lm-adapt'"])
    assert tuple(_gin_value("phatgoose_pipeline.expert_tasks")) == pool
    assert tuple(_gin_value("phatgoose_pipeline.eval_tasks")) == evals
    assert _gin_value("phatgoose_pipeline.init_from") == "/ckpt/t5-xl-lm-adapt"
    assert _gin_value("phatgoose_pipeline.multitask_steps") == 0
    assert _gin_value("T5Config.d_model") == 2048 and _gin_value("ExpertConfig.rank") == 16
    assert _gin_value("train_batches.pack") is True  # expert and gate batches are packed
  gin.clear_config()



def test_names_follow_the_data_root(root, pool_data, monkeypatch):
  """P3 names (and the FLAN pool that holds them) registered under one data root are registered again when the root
  changes: a mixture from the old root would name templates the new root lacks."""
  assert _names("p3_ag_news") == ["p3_ag_news_classify", "p3_ag_news_which_section"]
  monkeypatch.setenv(files.ENV_VAR, pool_data.root)
  assert _names("p3_ag_news") == ["p3_ag_news_fixture"]
  assert "p3_ag_news_classify" not in seqio.TaskRegistry.names()
  (example,) = pipeline.eval_examples("p3_ag_news_fixture", "train", max_examples=1)
  assert example["inputs_pretokenized"] in pool_data.texts
  assert "p3_ag_news_fixture" in _names(flan.POOL_MIXTURE)
  monkeypatch.setenv(files.ENV_VAR, root)  # back: this root lacks most pool members, so the pool is not served stale
  with pytest.raises(files.DataNotFoundError, match="of the FLAN pool"):
    pipeline.get_provider(flan.POOL_MIXTURE)
  assert _names("p3_ag_news") == ["p3_ag_news_classify", "p3_ag_news_which_section"]
