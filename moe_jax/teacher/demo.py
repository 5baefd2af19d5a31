"""TeacherLM end to end on synthetic data, on CPU in minutes: `python -m moe_jax.teacher.demo --workdir DIR`.

The world: sixteen fruits of four colours and yes/no questions "Is a {fruit} {colour}?". A rationale states the fruit's
colour ("A lime is green, so the answer is no."), a fact the answer alone does not give: "Is a lime red? No." says
what a lime is not. The split makes that fact matter (`world`):
- the teacher learns from gold rationales on questions of its own two templates, about every fruit;
- the students' training set (two other templates) asks about half the fruits in all four colours, and about the
  other half ("held-out fruits") only in two wrong colours: every answer there is "no";
- the evaluation asks about each held-out fruit in its true colour (yes) and in its third wrong colour (no), so
  a student that knows only the answers has seen neither (chance is 50%), while one trained on the teacher's
  rationales has read each held-out fruit's colour twice for each of its training questions.
Steps, each the package's own code:
  1. a tiny byte-level teacher is trained to continue a question's cot prompt with its rationale (`train_student`,
     loss on the rationale);
  2. it enhances the students' training set (`enhance`, greedy); `comparison.md` counts its rationales that are
     word for word the gold ones;
  3. three students train from the same random start: on `cot_tail` (TeacherLM), on `base` (answers only) and,
     as a control, on `cot_tail` with the gold rationales (a perfect teacher);
  4. both are scored by option letters on the evaluation and training sets every epoch (`evaluate_students`), side
     by side in `comparison.md`.
"""

from __future__ import annotations

import argparse
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

COLOURS = {"banana": "yellow", "lemon": "yellow", "corn": "yellow", "mango": "yellow", "cherry": "red",
           "tomato": "red", "strawberry": "red", "radish": "red", "lime": "green", "pea": "green",
           "cucumber": "green", "kiwi": "green", "orange": "orange", "carrot": "orange", "pumpkin": "orange",
           "apricot": "orange"}
PALETTE = sorted(set(COLOURS.values()))
STUDENT_TEMPLATES = ("Is {x} {c}?", "Is the colour of {x} {c}?")
TEACHER_TEMPLATES = ("Would you call {x} {c}?", "Is {x} coloured {c}?")
# Twice tiny_causal.gin's width and one more layer: the teacher has to copy a fruit's name into its rationale.
DEMO_MODEL = ("CausalLMConfig.d_model = 64", "CausalLMConfig.num_layers = 3", "CausalLMConfig.d_ff = 128")


def question(template: str, fruit: str, colour: str) -> dict[str, Any]:
  """A StrategyQA-style row with its gold rationale."""
  same = COLOURS[fruit] == colour
  named = f"{'an' if fruit[0] in 'aeiou' else 'a'} {fruit}"
  return {"question": template.format(x=named, c=colour), "answer": same,
          "rationale": f" {named.capitalize()} is {COLOURS[fruit]}, so the answer is {'yes' if same else 'no'}."}


def world(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
  """The teacher's, the students' training and the evaluation rows (see the module docstring): per colour, two
  fruits (drawn by `seed`) are held out, each with one wrong colour kept for the evaluation."""
  rng = random.Random(seed)
  held_out: dict[str, str] = {}
  for colour in PALETTE:
    fruits = sorted(f for f, c in COLOURS.items() if c == colour)
    for fruit in rng.sample(fruits, len(fruits) // 2):
      held_out[fruit] = rng.choice([c for c in PALETTE if c != colour])
  rows: dict[str, list[dict[str, Any]]] = {"teacher": [], "train": [], "eval": []}
  for fruit in sorted(COLOURS):
    for colour in PALETTE:
      rows["teacher"] += [question(t, fruit, colour) for t in TEACHER_TEMPLATES]
      split = "train" if fruit not in held_out else (
          "eval" if colour in (COLOURS[fruit], held_out[fruit]) else "train")
      rows[split] += [question(t, fruit, colour) for t in STUDENT_TEMPLATES]
  for split in rows.values():
    rng.shuffle(split)
  return rows


def _prepared(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{**p, "rationale": r["rationale"]} for p, r in zip(formats.prepare_rows(rows, "strategyqa"), rows)]


def run_demo(workdir: str, teacher_passes: int = 25, student_epochs: int = 3, student_passes: int = 15,
             max_new_tokens: int = 48, learning_rate: float = 3e-3, seed: int = 0,
             model: tuple[str, ...] = DEMO_MODEL) -> dict[str, dict[int, dict[str, float]]]:
  """Run the four steps in `workdir`; returns {student: {epoch: {eval set: accuracy}}}. Steps whose products
  exist are skipped (rerun resumes). `*_passes`: passes over the data per epoch; `model`: gin bindings over
  tiny_causal.gin's `CausalLMConfig` (teacher and students)."""
  gin.clear_config()
  gin_utils.configure(["models/tiny_causal.gin", "teacherlm_student.gin"], [
      "train.feature_lengths = {'inputs': 112, 'targets': 160}", "train.log_every = 50",
      f"make_optimizer.learning_rate = {learning_rate}", *model])
  rows = {name: _prepared(split) for name, split in world(seed).items()}
  teacher_set, train_set, eval_set = rows["teacher"], rows["train"], rows["eval"]
  files = {name: fs.join(workdir, f"{name}.jsonl") for name in ("teacher_data", "train", "eval")}
  fs.write_text(files["teacher_data"], formats.to_jsonl(  # the teacher learns to continue the prompt: loss there only
      {**r, "all": r["cot"] + r["rationale"], "cot": r["rationale"]} for r in teacher_set))
  fs.write_text(files["train"], formats.to_jsonl({k: v for k, v in r.items() if k != "rationale"} for r in train_set))
  gold = fs.join(workdir, "train_gold.jsonl")  # the control: what a perfect teacher would have written
  fs.write_text(gold, formats.to_jsonl({**r, "cot_tail": formats.collapse_spaces(r["cot"] + r["rationale"])}
                                       for r in train_set))
  fs.write_text(files["eval"], formats.to_jsonl(eval_set))
  config_str = gin.config_str()
  config = CausalLMConfig()  # tiny_causal.gin's

  teacher_dir = fs.join(workdir, "teacher")
  student.train_student(files["teacher_data"], teacher_dir, field="all", loss_on="rationale", epochs=1, batch_size=8,
                        passes_per_epoch=teacher_passes, task_name="teacherlm_demo_teacher", gin_config_str=config_str)
  enhanced = fs.join(workdir, "enhanced.jsonl")
  en.enhance(files["train"], enhanced, teacher=student.epoch_dir(teacher_dir, 1),
             model_config=config, batch_size=16, chunk_size=32,
             max_prompt_length=112, max_new_tokens=max_new_tokens, temperature=0.0)
  rationales = [row["cot"] for row in formats.read_rows(enhanced)]
  right = sum(got == r["rationale"] for got, r in zip(rationales, train_set))
  results = {}
  for name, data, field in (("cot_tail", enhanced, "cot_tail"), ("answers_only", enhanced, "base"),
                            ("gold_rationales", gold, "cot_tail")):
    run = fs.join(workdir, f"student_{name}")
    student.train_student(data, run, field=field, epochs=student_epochs, batch_size=8,
                          passes_per_epoch=student_passes, task_name=f"teacherlm_demo_{name}",
                          gin_config_str=config_str)
    results[name] = ev.evaluate_students(run, {"eval": files["eval"], "train": files["train"]}, model_config=config)
  lines = ["| student | " + " | ".join(f"epoch {e} eval / train" for e in results["cot_tail"]) + " |",
           "|---|" + "---|" * len(results["cot_tail"])]
  for name, by_epoch in results.items():
    lines.append(f"| {name} | " + " | ".join(f"{s['eval']:.1f} / {s['train']:.1f}" for s in by_epoch.values()) + " |")
  fs.write_text(fs.join(workdir, "comparison.md"),
                f"The teacher's rationale is word for word the gold one for {right} of {len(train_set)} training rows."
                "\n\nOption-letter accuracy (%); on eval, chance and the best a student without the colours can do: "
                "50\n\n" + "\n".join(lines) + "\n")
  return results


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/teacherlm_demo")
  args = parser.parse_args(argv)
  gin_utils.run_job(lambda: run_demo(args.workdir))
  print(fs.read_text(fs.join(args.workdir, "comparison.md")))


if __name__ == "__main__":
  main(sys.argv[1:])
