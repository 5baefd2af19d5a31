"""TeacherLM's student and evaluation steps, through the synthetic demo at its smallest: a teacher trained on
rationales enhances a training set, two students train for two epochs each, and every epoch is scored."""

from __future__ import annotations

import json
import os

import gin
import pytest

from moe_jax.errors import ConfigError
from moe_jax.teacher import demo
from moe_jax.teacher import evaluate as ev
from moe_jax.teacher import student


@pytest.fixture(autouse=True)
def _fresh_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_training_pairs():
  rows = [{"all": "Q: x A: The answer is (A). Let's think. because", "cot": " because", "cot_tail": "c t"},
          {"all": None, "cot": None, "cot_tail": None, "enhance_error": "prompt too long"}]
  assert student.training_pairs(rows, "cot_tail", "all") == [("", "c t")]
  assert student.training_pairs(rows, "cot_tail", "rationale") == [("Q: x A: The answer is (A). Let's think.",
                                                                    " because")]
  with pytest.raises(ConfigError, match="loss_on"):
    student.training_pairs(rows, "cot_tail", "answers")


def test_demo_trains_teacher_and_students_and_scores_every_epoch(tmp_path):
  work = str(tmp_path / "demo")
  results = demo.run_demo(work, teacher_rows=16, student_rows=16, eval_rows=16, teacher_steps=6, student_epochs=2,
                          student_steps=3, max_new_tokens=12)
  assert set(results) == {"cot_tail", "answers_only"}
  for name, by_epoch in results.items():
    assert sorted(by_epoch) == [1, 2]
    run = os.path.join(work, f"student_{name}")
    assert ev.epochs_of(run) == {e: os.path.join(run, f"epoch_{e}") for e in (1, 2)}
    for epoch in (1, 2):
      assert 0.0 <= by_epoch[epoch]["eval"] <= 100.0
      with open(os.path.join(run, "eval", f"epoch_{epoch}.md")) as f:
        assert f"| eval | 16 | {by_epoch[epoch]['eval']:.2f} |" in f.read()
    with open(os.path.join(run, "eval", "accuracy.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(run, "epochs.json")) as f:
      assert json.load(f)["steps_per_epoch"] == 3
  with open(os.path.join(work, "enhanced.jsonl")) as f:
    enhanced = [json.loads(line) for line in f]
  assert len(enhanced) == 16 and all(row["all"].startswith(row["base"]) for row in enhanced)
  assert "answers_only" in open(os.path.join(work, "comparison.md")).read()
