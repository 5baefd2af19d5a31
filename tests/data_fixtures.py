"""Tiny copies of the real releases, in their schemas, for the data tests and the input-pipeline benchmark.

P3: `p3/data/<config>/<split>.tfrecord-00000-of-00001` (tf.train.Example) with `info.<split>.json`, token-id fields
included as the release has them. FLAN: rows with `inputs`, `targets`, `_task_source`, `_task_name`,
`_template_type` in a release-style parquet. BIG-bench: tasksource-style rows and a lukaemon/BBH-style file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


@contextlib.contextmanager
def data_root(path: str):
  """The data root (`moe_jax.data.files.ENV_VAR`) set to `path` inside the block, the previous one restored after."""
  from moe_jax.data import files  # pylint: disable=g-import-not-at-top

  previous = os.environ.get(files.ENV_VAR)
  os.environ[files.ENV_VAR] = path
  try:
    yield path
  finally:
    if previous is None:
      del os.environ[files.ENV_VAR]
    else:
      os.environ[files.ENV_VAR] = previous

P3_FEATURES = {
    "inputs": {"dtype": "int32", "shape": [None]},
    "inputs_pretokenized": {"dtype": "string", "shape": []},
    "targets": {"dtype": "int32", "shape": [None]},
    "targets_pretokenized": {"dtype": "string", "shape": []},
}
P3_CHOICES = {"answer_choices": {"dtype": "string", "shape": [None]}}
P3_SCORE = {"idx": {"dtype": "int32", "shape": [2]}, "is_correct": {"dtype": "bool", "shape": []},
            "weight": {"dtype": "float32", "shape": []}}


def _feature(value: Any) -> Any:
  import tensorflow as tf

  values = value if isinstance(value, (list, tuple)) else [value]
  if not values or isinstance(values[0], str):  # an empty list is an empty answer_choices
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
  if values and isinstance(values[0], float):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def write_p3_config(root: str, config: str, split: str, rows: Sequence[Mapping[str, Any]],
                    features: Mapping[str, Any]) -> str:
  """One P3 config split: a TFRecord of `rows` (fields absent from a row are left out) and its info file."""
  import tensorflow as tf

  directory = os.path.join(root, "p3", "data", config)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{split}.tfrecord-00000-of-00001")
  with tf.io.TFRecordWriter(path) as writer:
    for row in rows:
      full = {"inputs": [ord(c) for c in row.get("inputs_pretokenized", "")][:8],
              "targets": [ord(c) for c in row.get("targets_pretokenized", "")][:8], **row}
      example = tf.train.Example(features=tf.train.Features(feature={k: _feature(v) for k, v in full.items()}))
      writer.write(example.SerializeToString())
  with open(os.path.join(directory, f"info.{split}.json"), "w") as f:
    json.dump({"features": features}, f)
  return path


def p3_rows(template: str, n: int, choices: bool = True) -> list[dict[str, Any]]:
  """n classification rows phrased by `template` (a format string over {text}); the label is the text's parity."""
  rows = []
  for i in range(n):
    row = {"inputs_pretokenized": template.format(text=f"number {i}"),
           "targets_pretokenized": "even" if i % 2 == 0 else "odd"}
    if choices:
      row["answer_choices"] = ["even", "odd"]
    rows.append(row)
  return rows


def p3_score_rows(template: str, n: int) -> list[dict[str, Any]]:
  """The `_score_eval` form of `p3_rows`: one row per (example, choice)."""
  rows = []
  for i in range(n):
    for j, choice in enumerate(["even", "odd"]):
      rows.append({"inputs_pretokenized": template.format(text=f"number {i}"), "targets_pretokenized": choice,
                   "answer_choices": ["even", "odd"], "idx": [i, j], "is_correct": int(j == i % 2),
                   "weight": 1.0})
  return rows


def write_p3(root: str, n: int = 12) -> None:
  """Two P3 pool datasets (ag_news with two templates, duorc with one per subset) and held-out RTE with a
  training template and its `_score_eval` twin."""
  features = {**P3_FEATURES, **P3_CHOICES}
  for config, template in (("ag_news_classify", "Classify: {text}"), ("ag_news_which_section", "Section of {text}?"),
                           ("duorc_SelfRC_answer", "Answer about {text}"),
                           ("duorc_ParaphraseRC_answer", "Paraphrase answer {text}"),
                           ("super_glue_rte_GPT_3_style", "{text} True or False?")):
    for split in ("train", "validation"):
      write_p3_config(root, config, split, p3_rows(template, n), features)
  write_p3_config(root, "super_glue_rte_GPT_3_style_score_eval", "validation",
                  p3_score_rows("{text} True or False?", n), {**features, **P3_SCORE})


def write_rows(path: str, rows: Iterable[Mapping[str, Any]]) -> str:
  """Rows as parquet (by extension) or JSON lines."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rows = list(rows)
  if path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def flan_release_rows(n: int = 40) -> list[dict[str, Any]]:
  """Release-style FLAN rows for two FLAN 2021 tasks, one NIV2 task and one dialog task, zero- and few-shot."""
  rows = []
  for i in range(n):
    for source, task, text in (("Flan2021", "glue/sst2:2.0.0", f"Is 'movie {i}' positive?"),
                               ("Flan2021", "bool_q:1.0.0", f"Is {i} a number?"),
                               ("NIv2", "task001_quoref_question_generation", f"Write a question about {i}."),
                               ("Dialog", "qrecc", f"Rewrite turn {i}.")):
      for template_type in ("zs_opt", "fs_opt"):
        rows.append({"inputs": text, "targets": f"answer {i}", "_task_source": source, "_task_name": task,
                     "_template_type": template_type, "_template_idx": i % 3})
  return rows


def write_bigbench(root: str, n: int = 6) -> None:
  """tasksource-style rows for a multiple-choice and a generative BIG-bench task, and a lukaemon/BBH-style file."""
  mc = [{"idx": i, "inputs": f"Is {i} even?", "targets": ["yes" if i % 2 == 0 else "no"],
         "multiple_choice_targets": ["yes", "no"], "multiple_choice_scores": [int(i % 2 == 0), int(i % 2 == 1)]}
        for i in range(n)]
  gen = [{"idx": i, "inputs": f"Sort: {i} {i + 2} {i + 1}", "targets": [f"{i} {i + 1} {i + 2}"],
          "multiple_choice_targets": [], "multiple_choice_scores": []} for i in range(n)]
  for task, rows in (("causal_judgment", mc), ("word_sorting", gen)):
    write_rows(os.path.join(root, "bigbench", task, "train.parquet"), rows[: n // 2])
    write_rows(os.path.join(root, "bigbench", task, "validation.parquet"), rows[n // 2:])
  os.makedirs(os.path.join(root, "bbh"), exist_ok=True)
  with open(os.path.join(root, "bbh", "web_of_lies.json"), "w") as f:
    json.dump({"examples": [{"input": f"Does person {i} lie?", "target": "Yes" if i % 2 else "No"}
                            for i in range(n)]}, f)


def _pool_p3(root: str, n: int) -> list[str]:
  """One training config (train and validation) for every P3 dataset the pools and T0 held-out name, and a
  `_score_eval` twin for each held-out dataset; returns their texts."""
  from tasks import p3

  texts = []
  for dataset in p3.DATASETS.values():
    config = f"{dataset.prefixes[0]}_fixture{dataset.suffix}"
    template = f"{dataset.name} asks about {{text}}?"
    for split in ("train", "validation"):
      write_p3_config(root, config, split, p3_rows(template, n), {**P3_FEATURES, **P3_CHOICES})
    if dataset in p3.T0_HELDOUT:
      write_p3_config(root, f"{config}{p3.SCORE_EVAL}", "validation", p3_score_rows(template, n),
                      {**P3_FEATURES, **P3_CHOICES, **P3_SCORE})
    texts += [template.format(text=f"number {i}") for i in range(n)]
  return texts + ["even", "odd"]


def flan_pool_release_rows(n: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
  """Release-style zero-shot rows for every non-P3 member of the FLAN pool, at least `n` of them landing in each
  member's train split and one in its validation split (`tasks.flan.split_release` holds out rows by a hash of the
  input), and the NIV2 task -> category map that places the NIV2 rows."""
  from tasks import flan

  rows, categories = [], {}
  for index, ((source, selector), name) in enumerate(flan.MEMBERS.items()):
    task = {"Flan2021": f"{selector}:1.0.0", "NIv2": f"task{index:03d}_{flan.slug(selector)}"}.get(source, selector)
    if source == "NIv2":
      categories[task] = selector
    wanted = {"train": n, "validation": 1}
    i = 0
    while any(wanted.values()):
      text = f"{name} example {i}: say {i}."
      split = "validation" if int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100 < flan.VALIDATION_PERCENT \
          else "train"
      if wanted[split]:
        wanted[split] -= 1
        rows.append({"inputs": text, "targets": f"say {i}", "_task_source": source, "_task_name": task,
                     "_template_type": "zs_opt", "_template_idx": 0})
      i += 1
  return rows, categories


def _pool_bbh(root: str, n: int) -> list[str]:
  """Rows for every BIG-bench Hard task in the layout its loader reads (a lukaemon/BBH file for the tasks that
  have one, tasksource rows otherwise), multiple-choice or generative as the task is scored; returns their texts."""
  from tasks import bigbench

  texts = []
  for task in bigbench.BBH:
    prompts = [f"{task.name} puzzle {i}" for i in range(n)]
    answers = [(task.bbh_choices or ("yes", "no"))[i % 2] if task.mode == "rank" else f"{i} {i + 1}"
               for i in range(n)]
    texts += prompts + answers
    if task.bbh_choices is not None:
      os.makedirs(os.path.join(root, "bbh"), exist_ok=True)
      with open(os.path.join(root, "bbh", f"{task.name}.json"), "w") as f:
        json.dump({"examples": [{"input": p, "target": a} for p, a in zip(prompts, answers)]}, f)
      continue
    rows = [{"idx": i, "inputs": p, "targets": [a], **(
        {"multiple_choice_targets": ["yes", "no"], "multiple_choice_scores": [int(a == "yes"), int(a == "no")]}
        if task.mode == "rank" else {"multiple_choice_targets": [], "multiple_choice_scores": []})}
        for i, (p, a) in enumerate(zip(prompts, answers))]
    write_rows(os.path.join(root, "bigbench", task.name, "train.parquet"), rows[:1])
    write_rows(os.path.join(root, "bigbench", task.name, "validation.parquet"), rows[1:])
  return texts + ["Yes", "No", "True", "False"]


def write_pools(root: str, n: int = 3) -> list[str]:
  """A data root holding every dataset both real-scale configs name (gin/phatgoose_p3_t5xl.gin: the 36 P3 experts
  and T0 held-out; gin/phatgoose_flan_t5xl.gin: the 166 FLAN-pool experts and BIG-bench Hard), each in its
  release's layout with `n` examples (the FLAN members as a release split by `tasks.flan.split_release`); returns
  every text the rows hold, for a vocabulary to be trained on."""
  from tasks import flan

  texts = _pool_p3(root, n) + _pool_bbh(root, n)
  rows, categories = flan_pool_release_rows(n)
  release = os.path.join(root, "flan_release")
  write_rows(os.path.join(release, "part-0.parquet"), rows)
  categories_file = os.path.join(root, "niv2_categories.json")
  with open(categories_file, "w") as f:
    json.dump(categories, f)
  flan.split_release(release, root, categories_file)
  return texts + [r[k] for r in rows for k in ("inputs", "targets")]
