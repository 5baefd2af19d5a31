"""ELM's target tasks (Continual-T0 release files) and seen tasks (P3 cut to 300 held-out rows): registration,
reading, preprocessing, scoring with the tasks' metric fns, and errors that name the missing file or the bad row."""

import json
import os

import numpy as np
import pytest
import seqio

import data_fixtures as fx
from moe_jax.data import files, pipeline
from moe_jax.evaluation import evaluate_task
from tasks import continual_t0 as ct0

LENGTHS = {"inputs": 256, "targets": 64}
N_WIKI = ct0.ELM_EVAL_SIZE + 5
SARI_SOURCE = "About 95 species are currently accepted ."
SARI_REFS = ["About 95 species are currently known .", "About 95 species are now accepted .",
             "95 species are now accepted ."]


def write_release(root, dataset, prompt, split, src, tgt, src_info=None):
  """One Continual-T0 release file: a JSON object of columns."""
  directory = os.path.join(root, "continual_t0", dataset)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{prompt}.{split}.json"), "w") as f:
    json.dump({"src": src, "tgt": tgt, "src_info": src_info or [{} for _ in src]}, f)


def wiki_rows(n):
  sentences = [f"The municipality number {i} is situated in the north ." for i in range(n)]
  return ([f"Make this text simpler: \"{s}\"" for s in sentences], [f"Town {i} is in the north ." for i in range(n)],
          [{"normal_sentence": s, "simple_sentence": f"Town {i} is in the north ."} for i, s in enumerate(sentences)])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A data root with a few Continual-T0 release files and P3 pool configs; the data root points at it."""
  path = str(tmp_path_factory.mktemp("data"))
  write_release(path, "wiki_auto", "simplification_1", "test", *wiki_rows(N_WIKI))
  write_release(path, "asset", "simplification_1", "validation", [f"Simplify this text: \"{SARI_SOURCE}\""],
                [SARI_REFS], [{"original": SARI_SOURCE, "simplifications": SARI_REFS}])
  write_release(path, "gigaword", "constrain_start+make_a_title", "test",
                ["Make a title for this article, starting with \"the\": the cat sat on a mat all day .",
                 "Make a title for this article, starting with \"dogs\": dogs bark at the postman ."],
                ["the cat sat on a mat", "dogs bark"])
  features = {**fx.P3_FEATURES, **fx.P3_CHOICES}
  fx.write_p3_config(path, "ag_news_classify", "validation", fx.p3_rows("Classify: {text}", N_WIKI), features)
  fx.write_p3_config(path, "ag_news_which_section", "test", fx.p3_rows("Section of {text}?", 7), features)
  fx.write_p3_config(path, "duorc_SelfRC_answer", "train", fx.p3_rows("Answer about {text}", 3), features)
  fx.write_p3_config(path, "app_reviews_convert_to_rating", "train", fx.p3_rows("Rate {text}", 3), features)
  with fx.data_root(path):
    yield path


def _known_generations(monkeypatch, texts):
  """evaluate_task's greedy decoding: the byte tokens of hand-chosen strings in place of a model's."""
  def fake(model, params, inputs, max_length, routing_ids=None, batch_size=32):
    vocab = seqio.ByteVocabulary()
    return np.stack([np.pad(vocab.encode(t) + [1], (0, max_length - len(vocab.encode(t)) - 1)) for t in texts])

  monkeypatch.setattr("moe_jax.evaluation.evaluate.greedy_generate", fake)


def test_target_tasks_and_mixture_registered():
  """ELM's 16 (dataset, prompt) evaluations; simplification adds SARI to BLEU and ROUGE."""
  assert len(ct0.TARGET_TASKS) == len(set(ct0.TARGET_TASKS)) == 16
  assert sorted(t.name for t in seqio.get_mixture_or_task("elm_target").tasks) == sorted(ct0.TARGET_TASKS)
  assert {"ct0_wiki_auto_simplification_2", "ct0_asset_simplification_1", "ct0_esnli_explain_why",
          "ct0_gigaword_constrain_end_write_its_sentence", "ct0_twitter_top20_tweet_as_about",
          "ct0_covid_qa_deepset_covid_cloze_book_qa"} <= set(ct0.TARGET_TASKS)
  for name, extra in (("ct0_asset_simplification_1", ["sari_metric"]), ("ct0_haiku_do_nothing", [])):
    task = seqio.get_mixture_or_task(name)
    assert [f.__name__ for f in task.predict_metric_fns] == ["bleu_metric", "rouge_metric"] + extra
    assert list(task.splits) == ["validation"]


def test_target_rows_read_and_preprocessed(root):
  """The split is the file's first 300 rows, in order: inputs are the prompted `src`, targets the first reference,
  `references` all of them; the text is tokenized with the run's vocabulary."""
  src, tgt, _ = wiki_rows(N_WIKI)
  examples = pipeline.eval_examples("ct0_wiki_auto_simplification_1", "validation", LENGTHS)
  assert len(examples) == ct0.ELM_EVAL_SIZE
  assert [e["inputs_pretokenized"] for e in examples] == src[:ct0.ELM_EVAL_SIZE]
  assert [e["targets_pretokenized"] for e in examples] == tgt[:ct0.ELM_EVAL_SIZE]
  assert examples[7]["references"] == [tgt[7]]
  vocab = seqio.get_mixture_or_task("ct0_wiki_auto_simplification_1").output_features["inputs"].vocabulary
  assert vocab.decode(examples[7]["inputs"][:-1].tolist()) == src[7] and examples[7]["inputs"][-1] == 1
  asset = pipeline.eval_examples("ct0_asset_simplification_1", "validation", LENGTHS)
  assert asset[0]["targets_pretokenized"] == SARI_REFS[0] and asset[0]["references"] == SARI_REFS


def test_generation_scored_by_bleu_and_rouge(root, monkeypatch):
  """gigaword: prediction 1 "the cat sat on the mat" against "the cat sat on a mat" (BLEU n-gram matches 5/6, 3/5,
  2/4, 1/3; ROUGE-1 5/6 stemmed words, the counted once), prediction 2 exact. Corpus BLEU: matches (5+2)/(6+2),
  (3+1)/(5+1), 2/4, 1/3 (prediction 2 has no 3-grams), lengths 8 and 8."""
  _known_generations(monkeypatch, ["the cat sat on the mat", "dogs bark"])
  result = evaluate_task(None, None, "ct0_gigaword_constrain_start_make_a_title", "validation", batch_size=2,
                         feature_lengths=LENGTHS)
  assert result["mode"] == "generate"
  metrics = result["metrics"]
  assert metrics["bleu"] == pytest.approx(100 * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25)
  assert metrics["rouge1"] == pytest.approx(100 * (5 / 6 + 1) / 2)
  assert set(metrics) == {"bleu", "rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_simplification_scored_by_sari_against_the_raw_source(root, monkeypatch):
  """ASSET row: the SARI paper's example, source from `src_info["original"]` (not the prompt): 26.9536, the value
  tensor2tensor and `evaluate` publish (`source` is one of the fields evaluation passes through)."""
  assert "source" in pipeline.EXTRA_FIELDS
  _known_generations(monkeypatch, ["About 95 you now get in ."])
  result = evaluate_task(None, None, "ct0_asset_simplification_1", "validation", batch_size=1,
                         feature_lengths=LENGTHS)
  assert result["metrics"]["sari"] == pytest.approx(26.953601953601954)
  assert set(result["metrics"]) == {"bleu", "sari", "rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_missing_file_is_one_line_naming_it(root):
  """The error is one line naming the file and how to get it (gin appends where it was called from, below it)."""
  with pytest.raises(files.DataNotFoundError) as error:
    pipeline.eval_examples("ct0_haiku_do_nothing", "validation", LENGTHS)
  with pytest.raises(files.DataNotFoundError) as direct:
    ct0.load(ct0.TARGETS[ct0.TARGET_TASKS.index("ct0_haiku_do_nothing")])
  message = str(direct.value)
  assert "\n" not in message and str(error.value).splitlines()[0] == message
  assert os.path.join(root, "continual_t0", "haiku", "do_nothing.test.json") in message
  assert "Continual-T0" in message and "T0_continual_learning" in message


def test_malformed_rows_name_file_and_row(root):
  write_release(root, "eli5", "generate_a_question_1", "test_asks", ["Q1", "Q2", "Q3"], ["a", [], "c"])
  with pytest.raises(files.MalformedRowError, match=r"generate_a_question_1\.test_asks\.json, row 1: tgt is not"):
    pipeline.eval_examples("ct0_eli5_generate_a_question_1", "validation", LENGTHS)
  write_release(root, "wiki_auto", "simplification_2", "test", ["x"], ["y"], [{"simple_sentence": "y"}])
  with pytest.raises(files.MalformedRowError, match=r"row 0: src_info has no 'normal_sentence'"):
    pipeline.eval_examples("ct0_wiki_auto_simplification_2", "validation", LENGTHS)
  write_release(root, "eSNLI", "explain_why", "test", ["x", "y"], ["z"])
  with pytest.raises(files.MalformedRowError, match=r"explain_why\.test\.json, row 0: columns of different lengths"):
    pipeline.eval_examples("ct0_esnli_explain_why", "validation", LENGTHS)


def test_seen_tasks_are_p3_templates_cut_to_300_held_out_rows(root):
  """Every pool template but app_reviews' (no held-out split in P3); validation rows, else test rows, in order."""
  members = sorted(t.name for t in pipeline.get_provider("elm_seen").tasks)
  assert members == ["elm_seen_ag_news_classify", "elm_seen_ag_news_which_section", "elm_seen_duorc_SelfRC_answer"]
  seen = pipeline.eval_examples("elm_seen_ag_news_classify", "validation", LENGTHS)
  full = pipeline.eval_examples("p3_ag_news_classify", "validation", LENGTHS)
  assert len(full) == N_WIKI and len(seen) == ct0.ELM_EVAL_SIZE
  assert [e["inputs_pretokenized"] for e in seen] == [e["inputs_pretokenized"] for e in full[:ct0.ELM_EVAL_SIZE]]
  assert seen[0]["answer_choices"] == ["even", "odd"]
  from_test = pipeline.eval_examples("elm_seen_ag_news_which_section", "validation", LENGTHS)
  assert [e["inputs_pretokenized"] for e in from_test] == [f"Section of number {i}?" for i in range(7)]
  task = pipeline.get_provider("elm_seen_ag_news_classify")
  assert [f.__name__ for f in task.score_metric_fns] == ["rank_classification"]
  assert {f.__name__ for f in task.predict_metric_fns} == {"exact_match_any", "bleu_metric", "rouge_metric"}
  with pytest.raises(files.DataNotFoundError, match=r"duorc_SelfRC_answer \(validation or test split"):
    pipeline.eval_examples("elm_seen_duorc_SelfRC_answer", "validation", LENGTHS)
