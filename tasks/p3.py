"""P3 (bigscience/P3) as seqio tasks: one Task per (dataset, template) config, one Mixture per dataset.

Reads a local (or gs://) copy of the P3 release under `<data root>/p3/data/<config>/`: `<split>.tfrecord-*` files of
tf.train.Examples with `inputs_pretokenized`, `targets_pretokenized`, optional `answer_choices` and, in the
`<config>_score_eval` configs (one row per answer choice), `idx` = [example, choice], `is_correct` and `weight`;
`info.<split>.json` declares the features. Parquet/JSON-lines files with the same fields (a `datasets` export of a
config) are read instead when a config folder has no TFRecords. The text fields are re-tokenized with our vocabulary.

Names (registered on first lookup, from the configs found under the data root):
  p3_<config>          one template, e.g. p3_super_glue_rte_GPT_3_style; `_score_eval` configs keep their suffix and
                       become one example per original example, with every choice and the correct one(s)
  p3_<dataset>         the training templates of a dataset (score-eval configs excluded), e.g. p3_ag_news
  p3_t0_heldin         the 36 T0 held-in datasets in PHATGOOSE's order (`P3_POOL`), one expert each
  t0_<dataset>         a held-out dataset's evaluation templates, e.g. t0_rte; `t0_heldout` has all 11
Held-out evaluation uses a dataset's `_score_eval` configs: P3 made them for the original-task templates of the
evaluation datasets, which is the T0 / PHATGOOSE protocol. Without them it falls back to the dataset's templates
that carry answer choices. Mixtures weigh their members equally (a dataset's templates hold the same examples).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import gin
import seqio
import tensorflow as tf
from t5.evaluation import metrics

from moe_jax.data import files, pipeline
from tasks import common

SPLITS = ("train", "validation", "test")
SCORE_EVAL = "_score_eval"
HOW_TO_GET = ("python -m moe_jax.data prepare p3 --out <data root> (or copy the bigscience/P3 dataset repository "
              "from https://huggingface.co/datasets/bigscience/P3 to <data root>/p3)")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A P3 dataset: its configs are `<prefix>_<template>[<suffix>]` for one of `prefixes`."""
  name: str
  prefixes: tuple[str, ...]
  suffix: str = ""  # ANLI names the round after the template: anli_<template>_r1

  def owns(self, config: str) -> bool:
    base = config.removesuffix(SCORE_EVAL)
    return base.endswith(self.suffix) and any(base.startswith(p + "_") for p in self.prefixes)


def _d(name: str, *prefixes: str, suffix: str = "") -> Dataset:
  return Dataset(name, prefixes or (name,), suffix)


# The 36 T0 held-in datasets, in the order PHATGOOSE concatenates their experts.
P3_POOL = (
    _d("ag_news"), _d("amazon_polarity"), _d("cosmos_qa"), _d("samsum"), _d("quartz"), _d("ropes"), _d("wiki_bio"),
    _d("paws", "paws_labeled_final"), _d("wiki_qa"), _d("social_i_qa"), _d("qasc"), _d("quail"), _d("dream"),
    _d("wiqa"), _d("quarel"), _d("sciq"), _d("quoref"), _d("duorc", "duorc_ParaphraseRC", "duorc_SelfRC"),
    _d("rotten_tomatoes"), _d("yelp_review_full"), _d("common_gen"), _d("gigaword"), _d("xsum"), _d("glue_mrpc"),
    _d("glue_qqp"), _d("commonsense_qa"), _d("cos_e", "cos_e_v1.11"), _d("wiki_hop", "wiki_hop_original"),
    _d("hotpot_qa", "kilt_tasks_hotpotqa"), _d("app_reviews"), _d("trec"), _d("multi_news"), _d("imdb"),
    _d("adversarial_qa", "adversarial_qa_dbidaf", "adversarial_qa_dbert", "adversarial_qa_droberta"),
    _d("cnn_dailymail", "cnn_dailymail_3.0.0"), _d("dbpedia_14"),
)
# The T0 held-out evaluation datasets.
T0_HELDOUT = (
    _d("rte", "super_glue_rte"), _d("hellaswag"), _d("copa", "super_glue_copa"), _d("wic", "super_glue_wic"),
    _d("winogrande", "winogrande_winogrande_xl"), _d("cb", "super_glue_cb"), _d("story_cloze", "story_cloze_2016"),
    _d("anli_r1", "anli", suffix="_r1"), _d("anli_r2", "anli", suffix="_r2"), _d("anli_r3", "anli", suffix="_r3"),
    _d("wsc", "super_glue_wsc.fixed"),
)
# More P3 datasets in PHATGOOSE's 166-expert FLAN pool (trained on all their templates).
FLAN_POOL_EXTRA = (
    _d("wsc", "super_glue_wsc.fixed"), _d("copa", "super_glue_copa"), _d("hellaswag"), _d("wic", "super_glue_wic"),
    _d("race_high"), _d("race_middle"), _d("web_questions"),
)
DATASETS = {d.name: d for d in (*P3_POOL, *T0_HELDOUT, *FLAN_POOL_EXTRA)}
POOL_MIXTURE, HELDOUT_MIXTURE = "p3_t0_heldin", "t0_heldout"
EXPERT_TASKS = tuple(f"p3_{d.name}" for d in P3_POOL)  # expert i trains on EXPERT_TASKS[i]
HELDOUT_TASKS = tuple(f"t0_{d.name}" for d in T0_HELDOUT)


def root() -> str:
  return files.join(files.require_root("P3", HOW_TO_GET), "p3", "data")


def _features(config_dir: str, split: str, first_file: str) -> dict[str, dict[str, Any]]:
  """The split's declared features (`info.<split>.json`), else the kinds found in its first record."""
  info = files.join(config_dir, f"info.{split}.json")
  try:
    with files.open_file(info) as f:
      return json.load(f)["features"]
  except (FileNotFoundError, tf.errors.NotFoundError):
    pass
  for record in tf.data.TFRecordDataset(first_file).take(1):
    example = tf.train.Example.FromString(record.numpy())
    return {name: {"dtype": "string" if f.WhichOneof("kind") == "bytes_list" else "int64"}
            for name, f in example.features.feature.items()}
  return {}


_MISSING = "\x00missing"


def _parse(path: tf.Tensor, row: tf.Tensor, record: tf.Tensor, score_eval: bool,
           has_choices: bool) -> dict[str, tf.Tensor]:
  spec = {k: tf.io.FixedLenFeature([], tf.string, default_value=_MISSING)
          for k in ("inputs_pretokenized", "targets_pretokenized")}
  if has_choices:
    spec["answer_choices"] = tf.io.VarLenFeature(tf.string)
  if score_eval:
    spec["idx"] = tf.io.FixedLenFeature([2], tf.int64, default_value=[-1, -1])
    spec["is_correct"] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  ex = tf.io.parse_single_example(record, spec)
  checks = [pipeline.row_check(ex[k] != _MISSING, path, row, f"missing field '{k}'")
            for k in ("inputs_pretokenized", "targets_pretokenized")]
  out = {"inputs": ex["inputs_pretokenized"], "targets": ex["targets_pretokenized"]}
  if has_choices:
    out["answer_choices"] = tf.sparse.to_dense(ex["answer_choices"])
    checks.append(pipeline.row_check(tf.size(out["answer_choices"]) > 0, path, row, "empty answer_choices"))
  if score_eval:
    checks.append(pipeline.row_check(ex["idx"][0] >= 0, path, row, "missing field 'idx'"))
    checks.append(pipeline.row_check(ex["is_correct"] >= 0, path, row, "missing field 'is_correct'"))
    out.update(idx=ex["idx"], is_correct=ex["is_correct"] > 0, path=path, row=row)
  with tf.control_dependencies(checks):
    return {k: tf.identity(v) for k, v in out.items()}


def _rows(config: str, split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
  """The parsed, checked rows of one config's split: the release's TFRecords, or parquet/JSON-lines rows with the
  same fields (e.g. a `datasets` export: `Dataset.to_parquet('<config>/<split>.parquet')`)."""
  config_dir = files.join(root(), config)
  score_eval = config.endswith(SCORE_EVAL)
  paths = files.split_files(config_dir, split, (".tfrecord",))
  if not paths:
    row_files = files.split_files(config_dir, split, files.ROW_FORMATS)
    if not row_files:
      raise files.DataNotFoundError(f"P3 {config} ({split})", config_dir, HOW_TO_GET)
    return _row_file_rows(row_files, score_eval)
  features = _features(config_dir, split, paths[0])
  has_choices = "answer_choices" in features
  ds = tf.data.Dataset.from_tensor_slices(paths)
  if shuffle_files:
    ds = ds.shuffle(len(paths), seed=seed)
  ds = ds.interleave(lambda p: tf.data.TFRecordDataset(p).enumerate().map(lambda i, r: (p, i, r)),
                     cycle_length=min(len(paths), 16), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.map(lambda p, i, r: _parse(p, i, r, score_eval, has_choices), num_parallel_calls=tf.data.AUTOTUNE)


def _row_file_rows(paths: Sequence[str], score_eval: bool) -> tf.data.Dataset:
  """`_rows` from parquet/JSON-lines files; answer choices are expected when the first row has them."""
  first = next(files.read_rows(paths[0]), {})
  has_choices = isinstance(first, dict) and "answer_choices" in first
  required = ("inputs_pretokenized", "targets_pretokenized") + (("idx", "is_correct") if score_eval else ())
  string = tf.TensorSpec([], tf.string)
  signature = {"inputs": string, "targets": string}
  if has_choices:
    signature["answer_choices"] = tf.TensorSpec([None], tf.string)
  if score_eval:
    signature.update(idx=tf.TensorSpec([2], tf.int64), is_correct=tf.TensorSpec([], tf.bool), path=string,
                     row=tf.TensorSpec([], tf.int64))

  def convert(path: str, row: int, raw: Any) -> dict[str, Any]:
    files.check_fields(path, row, raw, required + (("answer_choices",) if has_choices else ()))
    out = {"inputs": raw["inputs_pretokenized"], "targets": raw["targets_pretokenized"]}
    if has_choices:
      if not raw["answer_choices"]:
        raise files.MalformedRowError(path, row, "empty answer_choices")
      out["answer_choices"] = list(raw["answer_choices"])
    if score_eval:
      out.update(idx=list(raw["idx"]), is_correct=bool(raw["is_correct"]), path=path, row=row)
    return out

  return common.stream_rows(paths, convert, signature)


def _grouped(config: str, split: str) -> tf.data.Dataset:
  """A `_score_eval` split as one example per original example: its choices in `idx` order, the correct one(s)."""
  groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
  for row in pipeline.readable(_rows(config, split).as_numpy_iterator()):
    groups[int(row["idx"][0])].append(row)
  columns: dict[str, list[Any]] = defaultdict(list)
  for rows in (sorted(g, key=lambda r: int(r["idx"][1])) for _, g in sorted(groups.items())):
    choices = [r["targets"].decode() for r in rows]
    correct = [c for c, r in zip(choices, rows) if r["is_correct"]]
    if not correct:
      raise files.MalformedRowError(rows[0]["path"].decode(), int(rows[0]["row"]),
                                    f"no answer choice of example {int(rows[0]['idx'][0])} is marked is_correct")
    for key, value in (("inputs", rows[0]["inputs"].decode()), ("targets", correct[0]),
                       ("answer_choices", choices), ("correct_choices", correct)):
      columns[key].append(value)
  if not columns:
    raise files.DataNotFoundError(f"P3 {config} ({split})", files.join(root(), config), HOW_TO_GET)
  ragged = {k: tf.ragged.constant(v) for k, v in columns.items() if k.endswith("choices")}
  return tf.data.Dataset.from_tensor_slices({"inputs": columns["inputs"], "targets": columns["targets"], **ragged})


def _source(config: str) -> seqio.FunctionDataSource:
  if config.endswith(SCORE_EVAL):
    dataset_fn = lambda split, shuffle_files, seed=None: _grouped(config, split)
  else:
    dataset_fn = lambda split, shuffle_files, seed=None: _rows(config, split, shuffle_files, seed)
  return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


def _templates(dataset: Dataset, configs: Sequence[str]) -> tuple[list[str], list[str]]:
  """A dataset's (training configs, score-eval configs)."""
  owned = [c for c in configs if dataset.owns(c)]
  return [c for c in owned if not c.endswith(SCORE_EVAL)], [c for c in owned if c.endswith(SCORE_EVAL)]


_registered_from: str | None = None  # the P3 folder of the last `register()`
_registered_names: list[str] = []  # the tasks and mixtures it registered


def registered_from() -> str | None:
  """The P3 folder the registered P3 names were read from (None before the first registration)."""
  return _registered_from


def register() -> list[str]:
  """Register every config found under the data root and the dataset/pool mixtures; returns the config names.
  The names registered from a previous root are removed first: a mixture there may name templates this root lacks."""
  global _registered_from
  configs = files.listdir(root())
  if not configs:
    raise files.DataNotFoundError("P3", root(), HOW_TO_GET)
  for name in _registered_names:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
  _registered_names.clear()
  before = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  for config in configs:
    rank = config.endswith(SCORE_EVAL)
    common.add_task(f"p3_{config}", _source(config), [metrics.rank_classification] if rank else
                    [metrics.rank_classification, common.exact_match_any], common.references)
  for dataset in DATASETS.values():
    train, score = _templates(dataset, configs)
    if train:
      common.add_mixture(f"p3_{dataset.name}", [f"p3_{c}" for c in train])
    if dataset in T0_HELDOUT and (score or train):
      common.add_mixture(f"t0_{dataset.name}", [f"p3_{c}" for c in (score or train)])
  for name, members in ((POOL_MIXTURE, EXPERT_TASKS), (HELDOUT_MIXTURE, HELDOUT_TASKS)):
    present = [m for m in members if m in seqio.MixtureRegistry.names()]
    if present:
      common.add_mixture(name, present)
  _registered_names.extend(sorted((set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())) - before))
  _registered_from = root()
  return configs


def ensure_registered() -> None:
  """`register()` unless it already ran for the current data root (listing a large or remote root once)."""
  if _registered_from != root():
    register()


def _claims(name: str) -> bool:
  """Lazy registrar: P3 names are registered from the data root on their first lookup, and again after the data
  root changes."""
  if not name.startswith(("p3_", "t0_")):
    return False
  ensure_registered()
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    return True
  dataset = DATASETS.get(name.removeprefix("p3_").removeprefix("t0_"))
  if dataset is not None:  # a known dataset with no configs under the root
    raise files.DataNotFoundError(f"P3 {dataset.name} (configs {', '.join(p + '_*' for p in dataset.prefixes)})",
                                  root(), HOW_TO_GET)
  return False


pipeline.LAZY_REGISTRARS.append(_claims)
gin.constant("P3_POOL", EXPERT_TASKS)
gin.constant("T0_HELDOUT", HELDOUT_TASKS)
