"""BIG-bench Hard (22 tasks) and BIG-bench Lite (17 tasks) as zero-shot seqio evaluation tasks, as in PHATGOOSE.

Release layouts under the data root:
  bigbench/<task>/{train,validation}.{parquet,jsonl}  tasksource/bigbench rows: `inputs`, `targets` (list),
                                                      `multiple_choice_targets`, `multiple_choice_scores`
  bigbench/<task>/<version>/                          the same rows as TFDS `bigbench/<task>` prepared with the
                                                      data root as TFDS data_dir (read when no row files exist)
  bbh/<task>.{json,jsonl}                             lukaemon/bbh (BBH release) rows: `input`, `target`
Every task has one split, `validation`: all labelled rows of the release (tasksource's train + validation, as
PHATGOOSE evaluated them; the BBH file's test rows), in file order. The prompt is the input plus "\\nAnswer:".
Multiple-choice tasks are rank-classified over their choices (any choice with score 1 is correct); generative
ones are decoded greedily and scored by exact match against any reference, or ROUGE for conlang_translation.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf
from t5.evaluation import metrics

from moe_jax.data import files
from tasks import common

HOW_TO_GET = "python -m moe_jax.data prepare bigbench --out <data root>"
SUFFIX = "\nAnswer:"


@dataclasses.dataclass(frozen=True)
class BBTask:
  name: str
  mode: str = "rank"  # rank | exact | rouge
  bbh_choices: tuple[str, ...] | None = None  # set: read the BBH-release file, rank over these choices


BBH = (
    BBTask("boolean_expressions", bbh_choices=("True", "False")), BBTask("causal_judgment"),
    BBTask("date_understanding"), BBTask("disambiguation_qa"), BBTask("formal_fallacies_syllogisms_negation"),
    BBTask("geometric_shapes"), BBTask("hyperbaton"), BBTask("logical_deduction"), BBTask("movie_recommendation"),
    BBTask("multistep_arithmetic_two", "exact", bbh_choices=()), BBTask("navigate"),
    BBTask("object_counting", "exact"), BBTask("penguins_in_a_table"), BBTask("reasoning_about_colored_objects"),
    BBTask("ruin_names"), BBTask("salient_translation_error_detection"), BBTask("snarks"),
    BBTask("sports_understanding"), BBTask("temporal_sequences"), BBTask("tracking_shuffled_objects"),
    BBTask("web_of_lies", bbh_choices=("Yes", "No")), BBTask("word_sorting", "exact"),
)
BBLITE = (
    BBTask("bbq_lite_json"), BBTask("conceptual_combinations"), BBTask("conlang_translation", "rouge"),
    BBTask("formal_fallacies_syllogisms_negation"), BBTask("hindu_knowledge"), BBTask("known_unknowns"),
    BBTask("linguistics_puzzles", "exact"), BBTask("logic_grid_puzzle"), BBTask("logical_deduction"),
    BBTask("novel_concepts"), BBTask("operators", "exact"), BBTask("play_dialog_same_or_different"),
    BBTask("repeat_copy_logic", "exact"), BBTask("strange_stories"), BBTask("strategyqa"),
    BBTask("vitaminc_fact_verification"), BBTask("winowhy"),
)
SUITES = {"bbh": BBH, "bblite": BBLITE}


def _release_files(task: BBTask) -> tuple[str, list[str]]:
  root = files.require_root(f"BIG-bench {task.name}", HOW_TO_GET)
  if task.bbh_choices is not None:
    directory = files.join(root, "bbh")
    return directory, [files.join(directory, n) for n in files.listdir(directory)
                       if n.rsplit(".", 1)[0] == task.name and n.endswith((".json", ".jsonl"))]
  directory = files.join(root, "bigbench", task.name)
  return directory, [p for split in ("train", "validation") for p in files.split_files(directory, split, files.ROW_FORMATS)]


def _example(task: BBTask, path: str, row: int, raw: Any) -> dict[str, Any]:
  """One release row as inputs/targets (+ answer_choices/correct_choices or references)."""
  if task.bbh_choices is not None:
    files.check_fields(path, row, raw, ("input", "target"))
    prompt, refs = raw["input"] + SUFFIX, [str(raw["target"])]
    choices = list(task.bbh_choices)
    correct = [c for c in choices if c == refs[0]]
  else:
    files.check_fields(path, row, raw, ("inputs", "targets") + (
        ("multiple_choice_targets", "multiple_choice_scores") if task.mode == "rank" else ()))
    prompt, refs = raw["inputs"] + SUFFIX, [str(t) for t in raw["targets"]]
    choices = list(raw.get("multiple_choice_targets") or [])
    correct = [c for c, s in zip(choices, raw.get("multiple_choice_scores") or []) if s == 1]
  if not refs or not any(refs):
    raise files.MalformedRowError(path, row, "empty targets")
  if task.mode != "rank":
    return {"inputs": prompt, "targets": max(refs, key=len), "references": refs}
  if not choices:
    raise files.MalformedRowError(path, row, "empty multiple_choice_targets (answer choices)")
  if not correct:
    raise files.MalformedRowError(path, row, f"no answer choice is marked correct (choices {choices})")
  return {"inputs": prompt, "targets": correct[0], "answer_choices": choices, "correct_choices": correct}


def _tfds_rows(directory: str) -> list[tuple[str, int, dict[str, Any]]]:
  """(where, row, raw row) of a TFDS-prepared task's train and validation splits, or [] if there is none."""
  versions = [v for v in files.listdir(directory) if files.isdir(files.join(directory, v)) and v[:1].isdigit()]
  if not versions:
    return []
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(files.join(directory, max(versions)))
  rows = []
  for split in ("train", "validation"):
    if split in builder.info.splits:
      where = f"{builder.data_dir} ({split})"
      for row, raw in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
        rows.append((where, row, {k: _plain(v) for k, v in raw.items()}))
  return rows


def _plain(value: Any) -> Any:
  """A TFDS NumPy value as the row files hold it: str for bytes, lists for arrays."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()]
  return value


def load(task: BBTask) -> list[dict[str, Any]]:
  """Every labelled row of `task` as an evaluation example, checked."""
  directory, paths = _release_files(task)
  rows = [(path, row, raw) for path in paths for row, raw in enumerate(files.read_rows(path))]
  if not paths and task.bbh_choices is None:
    rows = _tfds_rows(directory)
  if not rows:
    raise files.DataNotFoundError(f"BIG-bench {task.name}", directory, HOW_TO_GET)
  return [_example(task, path, row, raw) for path, row, raw in rows]


def _dataset(task: BBTask, split: str) -> tf.data.Dataset:
  del split  # one split
  columns: dict[str, list[Any]] = defaultdict(list)
  for example in load(task):
    for key, value in example.items():
      columns[key].append(value)
  return tf.data.Dataset.from_tensor_slices(
      {k: tf.ragged.constant(v) if isinstance(v[0], list) else v for k, v in columns.items()})


def register() -> None:
  for suite, suite_tasks in SUITES.items():
    for task in suite_tasks:
      source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None, t=task: _dataset(t, split),
                                        splits=("validation",))
      metric = {"rank": metrics.rank_classification, "exact": common.exact_match_any,
                "rouge": common.rouge_first}[task.mode]
      common.add_task(f"{suite}_{task.name}", source, [metric], common.references)
    common.add_mixture(suite, [f"{suite}_{t.name}" for t in suite_tasks])


register()
gin.constant("BBH_TASKS", tuple(f"bbh_{t.name}" for t in BBH))
gin.constant("BBLITE_TASKS", tuple(f"bblite_{t.name}" for t in BBLITE))
