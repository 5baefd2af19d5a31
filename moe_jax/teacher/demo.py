"""TeacherLM end to end on synthetic data, on CPU in minutes: `python -m moe_jax.teacher.demo --workdir DIR`.

The world: twelve fruits of four colours, and yes/no questions "Is a {x} the same colour as a {y}?" (half yes,
half no). A rationale
names both colours ("A lemon is yellow and a lime is green, so the answer is no."): what a student cannot read off
the answer alone. Steps, each the package's own code:
  1. a tiny byte-level teacher is trained on (question, rationale) pairs (`train_student` on the cot prompt
     followed by its rationale);
  2. it enhances the student's training set (`enhance`, greedy);
  3. two students train from the same random start: on `cot_tail` (TeacherLM) and on `base` (answers only);
  4. both are scored by option letters on held-out pairs every epoch (`evaluate_students`), and
     `comparison.md` puts them side by side.
With tiny models and minutes of training the gap is noisy; the demo shows the pipeline, not the paper's result.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from typing import Any

import gin

from moe_jax import fs, gin_utils
from moe_jax.models.causal import CausalLMConfig
from moe_jax.teacher import enhance as en
from moe_jax.teacher import evaluate as ev
from moe_jax.teacher import formats
from moe_jax.teacher import student

COLOURS = {"banana": "yellow", "lemon": "yellow", "corn": "yellow", "cherry": "red", "tomato": "red",
           "strawberry": "red", "lime": "green", "pea": "green", "cucumber": "green", "orange": "orange",
           "carrot": "orange", "pumpkin": "orange"}


TEMPLATES = ("Is a {x} the same colour as a {y}?", "Do a {x} and a {y} have the same colour?")


def questions(seed: int = 0) -> list[dict[str, Any]]:
  """StrategyQA-style rows with their rationales over every ordered pair of distinct fruits and both templates,
  alternating yes and no (there are fewer same-colour pairs: the yes rows run out first), each kind shuffled by
  `seed`, so any prefix is balanced and a constant answer scores 50%."""
  rng = random.Random(seed)
  by_answer: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
  for template, (x, y) in itertools.product(TEMPLATES, itertools.permutations(sorted(COLOURS), 2)):
    same = COLOURS[x] == COLOURS[y]
    by_answer[same].append({"question": template.format(x=x, y=y), "answer": same,
                            "rationale": f" A {x} is {COLOURS[x]} and a {y} is {COLOURS[y]}, so the answer is "
                                         f"{'yes' if same else 'no'}."})
  for rows in by_answer.values():
    rng.shuffle(rows)
  return [row for pair in zip(by_answer[True], by_answer[False]) for row in pair]


def _prepared(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{**p, "rationale": r["rationale"]} for p, r in zip(formats.prepare_rows(rows, "strategyqa"), rows)]


def run_demo(workdir: str, teacher_rows: int = 32, student_rows: int = 32, eval_rows: int = 32,
             teacher_steps: int = 400, student_epochs: int = 3, student_steps: int = 100,
             max_new_tokens: int = 64) -> dict[str, dict[int, dict[str, float]]]:
  """Run the four steps in `workdir`; returns {student: {epoch: {eval set: accuracy}}}. Steps whose products
  exist are skipped (rerun resumes)."""
  gin.clear_config()
  gin_utils.configure(["models/tiny_causal.gin", "teacherlm_student.gin"], [
      "train.feature_lengths = {'inputs': 0, 'targets': 192}", "train.log_every = 50",
      "make_optimizer.learning_rate = 3e-3"])
  rows = _prepared(questions())
  teacher_set, train_set = rows[:teacher_rows], rows[teacher_rows:teacher_rows + student_rows]
  eval_set = rows[teacher_rows + student_rows:teacher_rows + student_rows + eval_rows]
  files = {name: fs.join(workdir, f"{name}.jsonl") for name in ("teacher_data", "train", "eval")}
  fs.write_text(files["teacher_data"], formats.to_jsonl(
      {**r, "cot_tail": formats.collapse_spaces(r["cot"] + r["rationale"])} for r in teacher_set))
  fs.write_text(files["train"], formats.to_jsonl({k: v for k, v in r.items() if k != "rationale"} for r in train_set))
  fs.write_text(files["eval"], formats.to_jsonl(eval_set))
  config_str = gin.config_str()
  config = CausalLMConfig()  # tiny_causal.gin's

  teacher_dir = fs.join(workdir, "teacher")
  student.train_student(files["teacher_data"], teacher_dir, epochs=1, batch_size=8, steps_per_epoch=teacher_steps,
                        task_name="teacherlm_demo_teacher", gin_config_str=config_str)
  enhanced = fs.join(workdir, "enhanced.jsonl")
  en.enhance(files["train"], enhanced, teacher=student.epoch_dir(teacher_dir, 1),
             model_config=config, batch_size=16, chunk_size=32,
             max_prompt_length=128, max_new_tokens=max_new_tokens, temperature=0.0)
  results = {}
  for name, field in (("cot_tail", "cot_tail"), ("answers_only", "base")):
    run = fs.join(workdir, f"student_{name}")
    student.train_student(enhanced, run, field=field, epochs=student_epochs, batch_size=8,
                          steps_per_epoch=student_steps, task_name=f"teacherlm_demo_{name}",
                          gin_config_str=config_str)
    results[name] = ev.evaluate_students(run, {"eval": files["eval"], "train": files["train"]}, model_config=config)
  lines = ["| student | " + " | ".join(f"epoch {e} eval / train" for e in results["cot_tail"]) + " |",
           "|---|" + "---|" * len(results["cot_tail"])]
  for name, by_epoch in results.items():
    lines.append(f"| {name} | " + " | ".join(f"{s['eval']:.1f} / {s['train']:.1f}" for s in by_epoch.values()) + " |")
  fs.write_text(fs.join(workdir, "comparison.md"), "Option-letter accuracy (%)\n\n" + "\n".join(lines) + "\n")
  return results


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/teacherlm_demo")
  args = parser.parse_args(argv)
  gin_utils.run_job(lambda: run_demo(args.workdir))
  print(fs.read_text(fs.join(args.workdir, "comparison.md")))


if __name__ == "__main__":
  main(sys.argv[1:])
