"""TeacherLM's benchmarks from the hub, offline: `datasets.load_dataset` is replaced by a fake that returns real
`datasets.Dataset`s with each hub dataset's own columns (so the prepare path is the real one), and evaluation's
MMLU accuracy is the seed's mean over subjects, checked by hand against a fake scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.errors import ConfigError, MissingFileError
from moe_jax.models.causal import CausalLMConfig
from moe_jax.teacher import __main__ as cli
from moe_jax.teacher import evaluate as ev
from moe_jax.teacher import formats, hub, text

datasets = pytest.importorskip("datasets")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(name="tiny_teacher", vocab_size=264, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            d_ff=64, dtype="float32")


def _mmlu_question(subject: str, number: int, pick: str, gold: str) -> dict:
  """An MMLU row as cais/mmlu has it; the question text tells the fake scorer which letter to prefer."""
  return {"question": f"{subject} {number} pick={pick}", "subject": subject, "choices": ["w", "x", "y", "z"],
          "answer": "ABCD".index(gold)}


# The hand-worked example: anatomy 3 of 4 right (75%), virology 0 of 1 (0%): the seed's mean over subjects is
# 37.5, the pooled fraction of rows 60.0.
MMLU_ROWS = [_mmlu_question("anatomy", 0, "A", "A"), _mmlu_question("anatomy", 1, "B", "B"),
             _mmlu_question("anatomy", 2, "C", "C"), _mmlu_question("anatomy", 3, "A", "D"),
             _mmlu_question("virology", 0, "A", "B")]
RAW = {
    "cais/mmlu": (MMLU_ROWS, datasets.Features({
        "question": datasets.Value("string"), "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])})),
    "amydeng2000/CREAK": ([  # label is a string in the hub copy
        {"ex_id": "dev_0", "sentence": "Claim pick=A.", "explanation": "e", "label": "true", "entity": "x"},
        {"ex_id": "dev_1", "sentence": "Claim pick=A again.", "explanation": "e", "label": "false", "entity": "y"}],
        None),
    "tasksource/ecqa": ([{"q_no": "1", "q_concept": "c", "q_text": "Where pick=C?", "q_op1": "a", "q_op2": "b",
                          "q_op3": "c", "q_op4": "d", "q_op5": "e", "q_ans": "c", "taskA_pos": "p",
                          "taskA_neg": "n", "taskB": "because"}], None),
    "wics/strategy-qa": ([{"qid": "q0", "term": "t", "description": "d", "question": "Can fish fly pick=B?",
                           "answer": False, "facts": ["f"], "decomposition": ["s"]}], None),
}


@pytest.fixture
def fake_hub(monkeypatch):
  """`datasets.load_dataset` answering from RAW, recording its calls."""
  calls = []

  def load_dataset(path, name=None, split=None, **kwargs):
    calls.append((path, name, split))
    rows, features = RAW[path]
    return datasets.Dataset.from_list(rows, features=features)

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  return calls


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_sources_name_known_formats():
  assert set(hub.HUB_SOURCES) == {"mmlu", "creak", "ecqa", "strategyqa"}
  assert all(src.kind in formats.kinds() for src in hub.HUB_SOURCES.values())
  assert hub.HUB_SOURCES["mmlu"] == ("cais/mmlu", "all", "test", "mmlu")
  assert hub.prepared_path("/data", "creak") == "/data/teacherlm/creak/validation.jsonl"
  with pytest.raises(ConfigError, match="expected one of"):
    hub.prepared_path("/data", "nope")


def test_download_lays_out_prepared_benchmarks(tmp_path, fake_hub, capsys):
  root = str(tmp_path / "data")
  cli.main(["download", "--benchmark", "mmlu", "creak", "ecqa", "strategyqa", "--data_root", root])
  assert fake_hub == [(s.hub_id, s.config, s.split) for s in hub.HUB_SOURCES.values()]
  assert sorted(os.listdir(os.path.join(root, "teacherlm"))) == ["creak", "ecqa", "mmlu", "strategyqa"]
  for benchmark, src in hub.HUB_SOURCES.items():  # one file each, no temporary left
    assert os.listdir(os.path.join(root, "teacherlm", benchmark)) == [f"{src.split}.jsonl"]
  out = capsys.readouterr().out
  assert "prepared 5 mmlu rows" in out and "eval_sets" in out

  mmlu = _read_jsonl(hub.prepared_path(root, "mmlu"))
  assert [r["subject"] for r in mmlu] == ["anatomy"] * 4 + ["virology"]
  assert [r["answer_index"] for r in mmlu] == [0, 1, 2, 3, 1]
  assert mmlu[0]["base"] == "Q: anatomy 0 pick=A (A) w (B) x (C) y (D) z A: The answer is (A)."
  creak = _read_jsonl(hub.prepared_path(root, "creak"))
  assert [r["answer_index"] for r in creak] == [0, 1] and "subject" not in creak[0]
  assert creak[0]["question"] == f"{formats.CREAK_QUESTION} Claim pick=A."
  ecqa = _read_jsonl(hub.prepared_path(root, "ecqa"))
  assert (ecqa[0]["options"], ecqa[0]["answer_index"]) == (["a", "b", "c", "d", "e"], 2)
  strategyqa = _read_jsonl(hub.prepared_path(root, "strategyqa"))
  assert (strategyqa[0]["options"], strategyqa[0]["answer_index"]) == (["Yes", "No"], 1)

  # --split another split, to its own file; and the offline recipe (save_to_disk + prepare) writes the same bytes
  cli.main(["download", "--benchmark", "mmlu", "--split", "validation", "--data_root", root])
  assert fake_hub[-1] == ("cais/mmlu", "all", "validation")
  copy = str(tmp_path / "mmlu_copy")
  datasets.Dataset.from_list(*RAW["cais/mmlu"]).save_to_disk(copy)
  offline = str(tmp_path / "offline.jsonl")
  cli.main(["prepare", "--dataset", copy, "--kind", "mmlu", "--out", offline])
  with open(offline, "rb") as a, open(hub.prepared_path(root, "mmlu", "validation"), "rb") as b:
    assert a.read() == b.read()


FAILING_HUB = """
import sys
import datasets
def load_dataset(*args, **kwargs):
  raise {error}
datasets.load_dataset = load_dataset
from moe_jax.teacher.__main__ import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("error, expected", [
    ("ConnectionError(\"Couldn't reach 'cais/mmlu' on the Hub (LocalEntryNotFoundError)\")",
     ["cannot load mmlu from the Hugging Face hub", "Couldn't reach 'cais/mmlu'", "save_to_disk(COPY)",
      "python -m moe_jax.teacher prepare --dataset COPY --kind mmlu --out {root}/teacherlm/mmlu/test.jsonl"]),
    ("ValueError('Unknown split \"test\". Should be one of [\"train\"].')", ["mmlu: datasets.load_dataset(",
                                                                            "Unknown split"]),
])
def test_unreachable_hub_is_one_line(tmp_path, error, expected):
  root = str(tmp_path / "data")
  run = subprocess.run([sys.executable, "-c", FAILING_HUB.format(error=error), "download", "--benchmark", "mmlu",
                        "--data_root", root], capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 1 and run.stderr.strip().count("\n") == 0, run.stderr
  for part in expected:
    assert part.format(root=root) in run.stderr
  assert not os.path.exists(root)  # nothing written


def test_unreachable_hub_error_class(monkeypatch, tmp_path):
  def unreachable(*args, **kwargs):
    raise ConnectionError("no network")
  monkeypatch.setattr(datasets, "load_dataset", unreachable)
  with pytest.raises(hub.HubUnreachableError) as info:
    hub.download("strategyqa", str(tmp_path))
  assert isinstance(info.value, MissingFileError) and "wics/strategy-qa" in str(info.value)


def test_subject_average_by_hand():
  hits = np.array([True, True, True, False, False])
  score = ev.set_score(hits, ["anatomy"] * 4 + ["virology"])
  assert score.accuracy == pytest.approx(37.5) and score.pooled == pytest.approx(60.0)
  assert score.subjects == {"anatomy": (4, 75.0), "virology": (1, 0.0)}
  assert ev.set_score(hits, None) == (60.0, 60.0, {})
  with pytest.raises(ConfigError, match="1 of 2 rows have no 'subject'"):
    ev.subjects_of([{"subject": "a"}, {}])


def _fake_scores(model, params, contexts, letters, batch_size=32, **kwargs):
  """A scorer without a model: epoch 1 prefers the letter each question names (`pick=X`), epoch 2 always A."""
  codec = text.byte_codec()
  scores = np.full((len(contexts), max(len(options) for options in letters)), -10.0)
  for i, context in enumerate(contexts):
    prompt = codec.decode(list(context))
    pick = prompt.split("pick=")[1][0] if model.endswith("epoch_1") else "A"
    scores[i, formats.LETTERS.index(pick)] = 0.0
  return scores


def test_evaluate_reads_the_data_root_and_averages_mmlu_over_subjects(tmp_path, fake_hub, monkeypatch):
  root = str(tmp_path / "data")
  for benchmark in ("mmlu", "creak"):
    hub.download(benchmark, root)
  model_dir = tmp_path / "student"
  for epoch in (1, 2):
    os.makedirs(model_dir / f"epoch_{epoch}" / "backbone")
  monkeypatch.setattr(ev, "load_lm", lambda path, config: (path, None, None, text.byte_codec()))
  monkeypatch.setattr(ev.option_letters, "option_letter_log_likelihoods", _fake_scores)
  explicit = str(tmp_path / "ecqa_mine.jsonl")
  formats.prepare(_write(tmp_path / "ecqa_raw.jsonl", RAW["tasksource/ecqa"][0]), "ecqa", explicit)

  results = ev.evaluate_students(str(model_dir), {"ecqa_mine": explicit}, model_config=CausalLMConfig(**TINY),
                                 eval_sets=["mmlu", "creak"], data_root=root)
  # epoch 1: mmlu anatomy 3/4, virology 0/1; creak right on row 0 only; ecqa right. Epoch 2 answers A always:
  # anatomy 1/4 (25%), virology 0/1 -> 12.5 (pooled 20.0); creak 1/2; ecqa (gold C) 0.
  assert results == {1: {"ecqa_mine": 100.0, "mmlu": 37.5, "creak": 50.0},
                     2: {"ecqa_mine": 0.0, "mmlu": 12.5, "creak": 50.0}}
  out = model_dir / "eval"
  saved = json.loads((out / "results.json").read_text())
  assert saved["accuracy"] == {str(e): s for e, s in results.items()}
  assert saved["examples"] == {"ecqa_mine": 1, "mmlu": 5, "creak": 2}
  assert saved["pooled"] == {"1": {"mmlu": 60.0}, "2": {"mmlu": 20.0}}
  assert saved["subjects"] == {"1": {"mmlu": {"anatomy": 75.0, "virology": 0.0}},
                               "2": {"mmlu": {"anatomy": 25.0, "virology": 0.0}}}
  assert saved["subject_examples"] == {"mmlu": {"anatomy": 4, "virology": 1}}
  table = (out / "epoch_1.md").read_text()
  assert "| mmlu | 5 | 37.50 |" in table and "| creak | 2 | 50.00 |" in table
  assert "## mmlu by subject" in table and "| anatomy | 4 | 75.00 |" in table and "pooled over rows: 60.00" in table
  assert "## creak" not in table
  assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write(path, rows):
  path.write_text(formats.to_jsonl(rows))
  return str(path)


def test_evaluate_names_the_download_for_a_missing_set(tmp_path, monkeypatch):
  root = str(tmp_path / "data")
  with pytest.raises(MissingFileError, match=r"eval set 'ecqa': .*teacherlm/ecqa/test.jsonl not found; write it "
                                             r"with `python -m moe_jax.teacher download --benchmark ecqa"):
    ev.evaluate_students(str(tmp_path / "student"), eval_sets=["ecqa"], data_root=root)
  with pytest.raises(MissingFileError, match="--split validation"):
    ev.evaluate_students(str(tmp_path / "student"), eval_sets=["mmlu:validation"], data_root=root)
  with pytest.raises(ConfigError, match="expected one of"):
    ev.evaluate_students(str(tmp_path / "student"), eval_sets=["nope"], data_root=root)
  monkeypatch.delenv("MOE_JAX_DATA_DIR", raising=False)
  with pytest.raises(ConfigError, match="data root"):
    ev.evaluate_students(str(tmp_path / "student"), eval_sets=["mmlu"])
  with pytest.raises(ConfigError, match="no eval set"):
    ev.evaluate_students(str(tmp_path / "student"))
