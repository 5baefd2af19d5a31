"""CrossFit few-shot data (tasks/crossfit.py) on tiny files in the release formats: the split file, task ids, every
row read, clear errors; CrossFit's metrics on hand-worked examples; the few-shot transfer report (ARG) and its
resumable grid (moe_jax/evaluation/few_shot.py). seqio/TensorFlow are imported by the tests that need them only."""

import json
import os

import numpy as np
import pytest

import data_fixtures

from moe_jax.data import files
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.evaluation import few_shot

SEEDS = (13, 100)
K = {"kilt_nq": 32, "glue-mrpc": 16, "ag_news": 16}
SIZES = {"train": 4, "dev": 3, "test": 5}
SPLIT = {"all": sorted(K), "train": ["kilt_nq"], "dev": ["glue-mrpc"], "test": ["ag_news"]}  # "all" plays no part
IDS = {"kilt_nq": 0, "glue-mrpc": 1, "ag_news": 2}  # train + dev + test order
LENGTHS = {"inputs": 64, "targets": 16}


def rows(task, seed, split):
  """(input, outputs) rows of a run's split file: kilt_nq rows alternate between two answers and one."""
  out = []
  for i in range(SIZES[split]):
    if task == "kilt_nq":
      out.append((f"who wrote book {seed}-{split}-{i}?", [f"author {i}", f"alias {i}"] if i % 2 == 0 else
                  [f"author {i}"]))
    elif task == "glue-mrpc":
      out.append((f"sentence 1: a{i} {seed} [SEP] sentence 2: b{i} {split}", ["equivalent" if i % 2 else
                                                                             "not_equivalent"]))
    else:
      out.append((f"news {seed} {split} {i} (with a \r inside)", ["World" if i % 2 else "Sports"]))
  return out


def write_tsv(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.writelines(f"{line}\n" for line in lines)


def write_release(root):
  """`<root>/crossfit/`: random.json and `<task>/<task>_<k>_<seed>_<split>.tsv` for every task and seed."""
  directory = os.path.join(root, "crossfit")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "random.json"), "w") as f:
    json.dump(SPLIT, f)
  for task, k in K.items():
    for seed in SEEDS:
      for split in SIZES:
        write_tsv(os.path.join(directory, task, f"{task}_{k}_{seed}_{split}.tsv"),
                  ["\t".join([text, *outs]) for text, outs in rows(task, seed, split)])
  return directory


@pytest.fixture(scope="module")
def cf():
  from tasks import crossfit  # seqio and TensorFlow

  return crossfit


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A data root with the release; the data root points at it for the module (tests that break files use
  their own root)."""
  path = str(tmp_path_factory.mktemp("data"))
  write_release(path)
  with data_fixtures.data_root(path):
    yield path


def run_name(task, seed):
  return f"crossfit_{task.replace('-', '.')}_{K[task]}_{seed}"


# ---------------------------------------------------------------------------------------------- split and task ids

def test_split_file_and_task_ids(cf, root, tmp_path):
  directory = os.path.join(root, "crossfit")
  split = cf.load_task_split(os.path.join(directory, "random.json"))
  assert (split.train, split.dev, split.test) == (("kilt_nq",), ("glue-mrpc",), ("ag_news",))
  assert cf.task_ids(split, directory) == IDS
  twice = tmp_path / "twice.json"  # a task in two lists (CrossFit's train_non_nli_test_nli.json lists sick so)
  twice.write_text(json.dumps({"train": ["b", "a"], "dev": ["a", "c"], "test": []}))
  assert cf.task_ids(cf.load_task_split(str(twice)), str(tmp_path)) == {"b": 0, "a": 1, "c": 2}
  (tmp_path / "id2task.json").write_text(json.dumps({"0": "c", "1": "a", "2": "b", "3": "other"}))
  assert cf.task_ids(cf.load_task_split(str(twice)), str(tmp_path)) == {"c": 0, "a": 1, "b": 2, "other": 3}
  (tmp_path / "id2task.json").write_text(json.dumps({"0": "c"}))
  with pytest.raises(ConfigError, match=r"id2task.json has no id for 2 task\(s\).*\['b', 'a'\]"):
    cf.task_ids(cf.load_task_split(str(twice)), str(tmp_path))


@pytest.mark.parametrize("content, message", [
    (None, r"CrossFit task split .*split.json not found"),
    ({"train": ["a"], "dev": []}, r"split.json: task split lacks 'test' \(needs lists"),
    ({"train": "a", "dev": [], "test": []}, r"split.json: 'train' must be a list of task names"),
    ({"train": [], "dev": [], "test": []}, r"split.json: the task split lists no tasks"),
    ("{not json", r"split.json: not a JSON task split"),
])
def test_split_file_errors(cf, tmp_path, content, message):
  path = tmp_path / "split.json"
  if content is not None:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
  with pytest.raises((ConfigError, MissingFileError), match=message) as error:
    cf.load_task_split(str(path))
  assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------------------ rows

def test_tsv_rows_outputs_and_line_endings(cf, tmp_path):
  """Every field after the first is an output: a tab cannot be inside an input (CrossFit's builders replace tabs
  in fields by spaces), so 'b' below is an answer. CRLF line ends go; a lone \\r inside a field stays."""
  path = str(tmp_path / "t_32_13_train.tsv")
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("q1\tx\r\n a\tb\tc \nq3 \r here\tz")
  assert cf.read_tsv(path) == [("q1", ("x",)), ("a", ("b", "c")), ("q3 \r here", ("z",))]


@pytest.mark.parametrize("line, problem", [
    ("no tab here", "no tab: expected input<TAB>output"), ("", "blank line"), ("   ", "blank line"),
    ("question\t", "no tab"), ("\tanswer", "empty input"), ("question\ta\t\tb", "empty output"),
])
def test_malformed_row_names_file_and_line(cf, tmp_path, line, problem):
  path = str(tmp_path / "t_32_13_dev.tsv")
  write_tsv(path, ["q1\ta1", "q2\ta2", line, "q4\ta4"])
  with pytest.raises(files.MalformedRowError, match=rf"t_32_13_dev.tsv, row 2: line 3: {problem}"):
    cf.read_tsv(path)


def test_empty_and_non_utf8_files(cf, tmp_path):
  empty = tmp_path / "e.tsv"
  empty.write_text("")
  with pytest.raises(files.MalformedRowError, match="e.tsv, row 0: empty file"):
    cf.read_tsv(str(empty))
  latin = tmp_path / "l.tsv"
  latin.write_bytes("q\ta\nq\u00e9\tb\n".encode("latin-1"))
  with pytest.raises(files.MalformedRowError, match="l.tsv, row 1: line 2: not UTF-8"):
    cf.read_tsv(str(latin))


# ----------------------------------------------------------------------------------------------------- seqio tasks

def test_tasks_register_and_read_every_row(cf, root):
  from moe_jax.data import pipeline

  for mixture, task in (("crossfit_train", "kilt_nq"), ("crossfit_dev", "glue-mrpc"), ("crossfit_test", "ag_news")):
    assert sorted(pipeline.expand_tasks([mixture])) == sorted(run_name(task, s) for s in SEEDS)
  for task in K:
    for seed in SEEDS:
      name = run_name(task, seed)
      run = cf.run_of(name)
      assert (run.task, run.k, run.seed, run.task_id) == (task, K[task], seed, IDS[task])
      for split, file_split in (("train", "train"), ("dev", "dev"), ("validation", "dev"), ("test", "test")):
        got = pipeline.eval_examples(name, split, LENGTHS)
        expected = rows(task, seed, file_split)
        assert [e["inputs_pretokenized"] for e in got] == [f"[{task}] {text}" for text, _ in expected]
        assert [e["targets_pretokenized"] for e in got] == [outs[0] for _, outs in expected]
        assert [e["references"] for e in got] == [outs for _, outs in expected]
  vocab = pipeline.get_provider(run_name("kilt_nq", 13)).output_features["inputs"].vocabulary
  assert vocab.decode(got[0]["inputs"].tolist()) == got[0]["inputs_pretokenized"] and got[0]["inputs"][-1] == 1
  # A training stage's vocabulary check passes them: the scalar task id is not text in another vocabulary.
  from moe_jax.data import vocab as vocab_lib
  vocab_lib.check_tasks([run_name("kilt_nq", 13)], vocab_lib.binding(), 264, "tiny")


def test_task_ids_reach_the_mixed_examples(cf, root):
  import seqio
  from moe_jax.data import pipeline

  for mixture, task in (("crossfit_train", "kilt_nq"), ("crossfit_dev", "glue-mrpc"), ("crossfit_test", "ag_news")):
    provider = pipeline.get_provider(mixture)
    ds = provider.get_dataset(LENGTHS, split="train", shuffle=False, num_epochs=1)
    ids = [int(ex["task_ids"]) for ex in ds.as_numpy_iterator()]  # until one member runs out
    assert ids and set(ids) == {IDS[task]}
    assert isinstance(provider, seqio.Mixture)
  batch = next(pipeline.train_batches("crossfit_train", LENGTHS, batch_size=4, seed=1))
  assert batch["encoder_input_tokens"].shape == (4, LENGTHS["inputs"])


def test_registered_metrics_follow_crossfit(cf, root):
  from moe_jax.data import pipeline

  assert len(cf.METRIC_OF) == 160
  assert sorted(cf.METRIC_FNS) == sorted(set(cf.METRIC_OF.values()))
  expected = {"kilt_nq": cf.exact_match, "glue-mrpc": cf.accuracy, "ag_news": cf.classification_f1}
  for task, fn in expected.items():
    assert pipeline.get_provider(run_name(task, 13)).predict_metric_fns == [fn]


def test_missing_files_name_what_is_missing(cf, tmp_path, monkeypatch):
  from moe_jax.data import pipeline

  directory = write_release(str(tmp_path))
  monkeypatch.setenv(files.ENV_VAR, str(tmp_path))
  dev = os.path.join(directory, "glue-mrpc", "glue-mrpc_16_100_dev.tsv")
  os.remove(dev)
  with pytest.raises(MissingFileError, match=rf"CrossFit file {dev} not found"):
    pipeline.get_provider("crossfit_dev")
  os.rename(os.path.join(directory, "glue-mrpc"), os.path.join(directory, "elsewhere"))
  with pytest.raises(files.DataNotFoundError, match=r"'CrossFit glue-mrpc \(1 task\(s\) of .*random.json\)'"):
    pipeline.get_provider("crossfit_dev")


def test_malformed_row_surfaces_from_the_pipeline(cf, tmp_path, monkeypatch):
  from moe_jax.data import pipeline

  directory = write_release(str(tmp_path))
  monkeypatch.setenv(files.ENV_VAR, str(tmp_path))
  path = os.path.join(directory, "ag_news", "ag_news_16_13_test.tsv")
  with open(path, "a", encoding="utf-8") as f:
    f.write("a row without its label\n")
  with pytest.raises(files.MalformedRowError, match=rf"{path}, row 5: line 6: no tab"):
    pipeline.eval_examples(run_name("ag_news", 13), "test")


# --------------------------------------------------------------------------------------------------------- metrics

def test_metrics_on_hand_worked_examples(cf):
  # ACC: case is ignored, any reference counts: 2 of 3.
  got = cf.accuracy([["Positive"], ["neg", "negative"], ["x"]], ["positive", "negative", "y"])
  assert got == {"ACC": pytest.approx(200 / 3)}
  # Classification-F1 on the first reference: a: P 1/1, R 1/2 -> F1 2/3; b: P 2/3, R 2/2 -> F1 4/5; macro 11/15.
  got = cf.classification_f1([["a", "b"], ["a"], ["b"], ["b"]], ["a", "b", "b", "b"])
  assert got == {"Classification-F1": pytest.approx(100 * 11 / 15)}
  # EM after SQuAD normalisation: "The Cat!" ~ "cat", "Wolf." ~ "a wolf", "cats" != "cat": 2 of 3.
  got = cf.exact_match([["The Cat!"], ["dog", "a wolf"], ["cat"]], ["cat", "Wolf.", "cats"])
  assert got == {"EM": pytest.approx(200 / 3)}
  # QA-F1: "quick fox jumps" vs "quick brown fox" (articles dropped): 2 common, P = R = 2/3 -> 2/3; "gamma": 1.
  got = cf.qa_f1([["the quick brown fox"], ["alpha beta", "gamma"]], ["quick fox jumps", "gamma"])
  assert got == {"QA-F1": pytest.approx(100 * 5 / 6)}
  # Rouge-L: LCS("the cat sat on the mat", "the cat on mat") = 4: P 1, R 4/6 -> F 0.8 (the best reference); a
  # prediction of punctuation only scores 0.
  got = cf.rouge_l([["dog", "the cat sat on the mat"], ["anything"]], ["the cat on mat", "..."])
  assert got == {"Rouge-L": pytest.approx(40.0)}
  # Pearson of (1, 2, 3, 4) and (2, 1, 4, 3 <- "x" counts as 3): covariance sum 3, variance sums 5 and 5 -> 0.6.
  got = cf.pearson([["1"], ["2"], ["3"], ["4"]], ["2", "1", "4", "x"])
  assert got == {"Pearson-Correlation": pytest.approx(60.0)}
  # Matthews: TP 1, FN 1, TN 2, FP 0 -> (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3) = 1 / sqrt(3).
  got = cf.matthews([["acceptable"], ["acceptable"], ["unacceptable"], ["unacceptable"]],
                    ["acceptable", "unacceptable", "unacceptable", "nonsense"])
  assert got == {"Matthew-Correlation": pytest.approx(100 / np.sqrt(3))}
  with pytest.raises(ValueError, match="2 targets and 1 predictions"):
    cf.accuracy([["a"], ["b"]], ["a"])


# ------------------------------------------------------------------------------------------------ few-shot transfer

BASE = {("A", 13): 40.0, ("A", 21): 50.0, ("B", 13): 80.0, ("B", 21): 70.0, ("C", 13): 30.0, ("C", 21): 30.0}
NEW = {("A", 13): 48.0, ("A", 21): 60.0, ("B", 13): 70.0, ("B", 21): 65.0, ("C", 13): 31.0, ("C", 21): 32.0}


def test_transfer_report_float64_hand_worked():
  """A: base 45 ± 5, new 54 ± 6, gain 9/45 = 0.2; B: 75 ± 5, 67.5 ± 2.5, gain -7.5/75 = -0.1; C: 30 ± 0,
  31.5 ± 0.5, gain 1.5/30 = 0.05. ARG = (0.2 - 0.1 + 0.05) / 3 = 0.05."""
  report = few_shot.transfer_report(BASE, NEW)
  a = report["tasks"]["A"]
  assert (a["seeds"], a["base_mean"], a["base_std"], a["new_mean"], a["new_std"]) == ([13, 21], 45.0, 5.0, 54.0, 6.0)
  gains = {t: r["relative_gain"] for t, r in report["tasks"].items()}
  assert gains == pytest.approx({"A": 0.2, "B": -0.1, "C": 0.05}, abs=1e-15)
  assert report["tasks"]["C"]["base_std"] == 0.0 and report["tasks"]["C"]["new_std"] == 0.5
  assert report["num_tasks"] == 3 and type(report["arg"]) is float
  assert abs(report["arg"] - 0.05) < 1e-15  # float64; float32 arithmetic is off by ~1e-9
  table = few_shot.transfer_markdown(report)
  assert "| A | 2 | 45.00 ± 5.00 | 54.00 ± 6.00 | +20.00% |" in table
  assert "| B | 2 | 75.00 ± 5.00 | 67.50 ± 2.50 | -10.00% |" in table
  assert table.rstrip().endswith("| **ARG** (3 tasks) | | | | +5.00% |")


def test_transfer_report_refuses_unmatched_runs_and_zero_base():
  with pytest.raises(MismatchError, match=r"base only \[\('C', 21\)\]"):
    few_shot.transfer_report(BASE, {k: v for k, v in NEW.items() if k != ("C", 21)})
  with pytest.raises(ConfigError, match="task 'A': the base model's mean score is 0"):
    few_shot.transfer_report({**BASE, ("A", 13): 0.0, ("A", 21): 0.0}, NEW)


def test_few_shot_transfer_resumes_from_its_file(tmp_path):
  path = str(tmp_path / "runs" / "scores.json")
  calls = []

  def train_and_score(task, seed):
    if len(calls) == 3:
      raise KeyboardInterrupt  # the job dies during its fourth run
    if calls:  # every finished run is already on disk, whole
      assert set(few_shot.read_scores(path)) == set(calls)
    calls.append((task, seed))
    return NEW[(task, seed)]

  with pytest.raises(KeyboardInterrupt):
    few_shot.few_shot_transfer(train_and_score, ["A", "B", "C"], [13, 21], path)
  assert few_shot.read_scores(path) == {run: NEW[run] for run in calls}
  assert os.listdir(tmp_path / "runs") == ["scores.json"]  # no temporary files left
  done = list(calls)
  calls.clear()

  def resumed(task, seed):
    calls.append((task, seed))
    return NEW[(task, seed)]

  scores = few_shot.few_shot_transfer(resumed, ["A", "B", "C"], [13, 21], path)
  assert calls == [run for run in NEW if run not in done]  # only the runs not yet scored, in grid order
  assert scores == NEW and few_shot.read_scores(path) == NEW
  assert few_shot.few_shot_transfer(resumed, ["A"], [13], path) == {("A", 13): 48.0} and len(calls) == 3
  assert json.loads((tmp_path / "runs" / "scores.json").read_text())["A"] == {"13": 48.0, "21": 60.0}
