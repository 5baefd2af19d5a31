"""TeacherLM's student and evaluation steps, through the synthetic demo at its smallest: a teacher trained on
rationales enhances a training set, two students train for two epochs each, and every epoch is scored."""

from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest

from moe_jax.data import pipeline
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


def test_student_epochs_are_exact_passes_and_resume_at_their_batch():
  """5 rows in batches of 2: each epoch is 3 batches holding every row once plus one filler without loss weight,
  each epoch in its own order; a resumed stream (start_batch) continues the same batches."""
  texts = ["alpha", "bravo", "charlie", "delta", "echo"]
  student.register_task("teacherlm_test_exact", [("", t) for t in texts], batch_size=2, passes=3, seed=5)
  lengths = {"inputs": 0, "targets": 16}
  stream = pipeline.train_batches("teacherlm_test_exact", lengths, 2, decoder_only=True)
  batches = [next(stream) for _ in range(9)]

  def rows(batch):
    out = []
    for tokens, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
      if weights.sum() == 0:
        assert not tokens.any()
        out.append(None)
      else:  # byte ids (offset 3) up to the EOS (1)
        out.append(bytes(int(t) - 3 for t in tokens[weights > 0] if t > 1).decode())
    return out

  epochs = [sum((rows(b) for b in batches[3 * e:3 * e + 3]), []) for e in range(3)]
  for order in epochs:
    assert sorted(r for r in order if r) == texts and order.count(None) == 1
  assert len({tuple(order) for order in epochs}) == 3  # a fresh permutation each pass
  resumed = pipeline.train_batches("teacherlm_test_exact", lengths, 2, start_batch=4, decoder_only=True)
  for batch in batches[4:]:
    np.testing.assert_array_equal(next(resumed)["decoder_target_tokens"], batch["decoder_target_tokens"])


def test_demo_world_hides_the_held_out_fruits_colours_from_the_answers():
  rows = demo.world(seed=0)
  assert {k: len(v) for k, v in rows.items()} == {"teacher": 128, "train": 96, "eval": 32}
  about = lambda row: next(f for f in demo.COLOURS if row["question"].endswith(f"{f} " + row["question"].split()[-1]))
  held_out = {about(row) for row in rows["eval"]}
  assert len(held_out) == 8 and {demo.COLOURS[f] for f in held_out} == set(demo.PALETTE)
  for fruit in held_out:
    train = [r for r in rows["train"] if about(r) == fruit]
    evaluation = [r for r in rows["eval"] if about(r) == fruit]
    assert len(train) == 4 and not any(r["answer"] for r in train)  # two wrong colours, two templates
    assert sorted(r["answer"] for r in evaluation) == [False, False, True, True]
    assert not {r["question"] for r in train} & {r["question"] for r in evaluation}
    assert all(f"is {demo.COLOURS[fruit]}," in r["rationale"] for r in train)  # the fact only rationales give
  assert not {r["question"] for r in rows["teacher"]} & {r["question"] for r in rows["train"] + rows["eval"]}


def test_demo_trains_teacher_and_students_and_scores_every_epoch(tmp_path):
  work = str(tmp_path / "demo")
  results = demo.run_demo(work, teacher_passes=1, student_epochs=2, student_passes=1, max_new_tokens=12, model=())
  assert set(results) == {"cot_tail", "answers_only", "gold_rationales"}
  for name, by_epoch in results.items():
    assert sorted(by_epoch) == [1, 2]
    run = os.path.join(work, f"student_{name}")
    assert ev.epochs_of(run) == {e: os.path.join(run, f"epoch_{e}") for e in (1, 2)}
    for epoch in (1, 2):
      assert 0.0 <= by_epoch[epoch]["eval"] <= 100.0
      with open(os.path.join(run, "eval", f"epoch_{epoch}.md")) as f:
        assert f"| eval | 32 | {by_epoch[epoch]['eval']:.2f} |" in f.read()
    with open(os.path.join(run, "eval", "accuracy.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(run, "epochs.json")) as f:
      assert json.load(f)["steps_per_epoch"] == 12  # one exact pass of 96 rows in batches of 8
  with open(os.path.join(work, "enhanced.jsonl")) as f:
    enhanced = [json.loads(line) for line in f]
  assert len(enhanced) == 96 and all(row["all"].startswith(row["base"]) for row in enhanced)
  assert "gold_rationales" in open(os.path.join(work, "comparison.md")).read()
