"""CrossFit (the NLP Few-shot Gym of Ye, Lin and Ren 2021) as seqio tasks, with the task ids a task-level router
(Task-level MoE, Ye, Zha and Ren 2022) looks its task embeddings up by.

Release layout under the data root (what CrossFit's `tasks/_build_gym.py --build` writes to its `data/` folder):
  crossfit/<task>/<task>_<k>_<seed>_<split>.tsv   split: train | dev | test; k: 16 per class for classification
                                                   tasks, 32 otherwise; seeds 100, 13, 21, 42, 87
  crossfit/random.json                             the task split: {"train": [...], "dev": [...], "test": [...]}
                                                   (CrossFit's dataloader/custom_tasks_splits/*.json; an "all" key
                                                   may sit beside them and plays no part)
  crossfit/id2task.json                            optional: {"0": "<task>", ...}, the row of each task in a
                                                   task_vecs.npy (Task-level MoE keeps it beside its task vectors)
A TSV row is `input<TAB>output[<TAB>output...]`: every field after the first is an acceptable output (CrossFit joins
a question's answers with tabs), so an input cannot hold a tab (CrossFit's builders replace tabs inside fields by
spaces). All outputs become the example's `references`; the model trains on the first. A row that is not of that
shape stops the run with the file and line, rather than being skipped as CrossFit's reader does.

Names (registered on the first lookup of a `crossfit_` name, from the split file `crossfit_split.path` names):
  crossfit_<task>_<k>_<seed>   one few-shot run, splits train, dev and test (plus `validation` = dev, the split
                               the training loop validates on); a `-` in a task name becomes `.` (seqio's names
                               allow no `-`): crossfit_glue.mrpc_16_13
  crossfit_train / _dev / _test  every run (every seed) of the split file's train / dev / test tasks, registered
                               when the list is not empty (upstream training reads all seeds of its tasks)
Inputs are `[<task>] <input>`, as CrossFit and Task-level MoE feed them, so a model can tell tasks apart. Every
example carries `task_ids`, its task's id: the row of `id2task.json` when there is one, else the task's index in
the split file's train + dev + test list (first occurrence). It is an int32 output feature, so it survives seqio's
mixing; the training batches carry it once `moe_jax.data.pipeline.feature_converter` passes it on.

Each task is scored by its CrossFit metric (`METRIC_OF`), on percentages; CrossFit evaluates at most the first
10,000 test rows of a task (pass `max_examples=10000` to match), this module reads every row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
from rouge_score import rouge_scorer
from scipy import stats
from sklearn import metrics as sk_metrics
from t5.evaluation import qa_utils

from moe_jax import fs
from moe_jax.data import files, pipeline
from moe_jax.data.vocab import run_vocabulary
from moe_jax.errors import ConfigError, MissingFileError
from tasks import common

HOW_TO_GET = ("build the NLP Few-shot Gym with INK-USC/CrossFit (cd tasks; python _build_gym.py --build), copy its "
              "data/ folder to <data root>/crossfit and a task split such as CrossFit's "
              "dataloader/custom_tasks_splits/random.json beside it")
PREFIX = "crossfit_"
SPLIT_KEYS = ("train", "dev", "test")
FILE_SPLIT = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}  # seqio split -> file suffix
ID2TASK = "id2task.json"
MISSING_SCORE = 3.0  # a regression prediction that is no number: Task-level MoE scores it as 3 (its tasks are 1-5)
Targets = Sequence[Sequence[str]]  # per example, its references


# CrossFit's metric for each of its 160 tasks (its dataloader/metrics.py).
_TASKS_BY_METRIC = {
    "ACC": (
        "ai2_arc aqua_rat art blimp-anaphor_gender_agreement blimp-anaphor_number_agreement "
        "blimp-determiner_noun_agreement_with_adj_irregular_1 blimp-ellipsis_n_bar_1 blimp-ellipsis_n_bar_2 "
        "blimp-existential_there_quantifiers_1 blimp-irregular_past_participle_adjectives "
        "blimp-sentential_negation_npi_licensor_present blimp-sentential_negation_npi_scope "
        "blimp-wh_questions_object_gap boolq commonsense_qa cosmos_qa crows_pairs definite_pronoun_resolution dream "
        "glue-mnli glue-mrpc glue-qnli glue-qqp glue-rte glue-sst2 glue-wnli google_wellformed_query hellaswag "
        "kilt_fever math_qa mc_taco medical_questions_pairs openbookqa piqa qasc quail quarel quartz-no_knowledge "
        "quartz-with_knowledge race-high race-middle sciq social_i_qa superglue-cb superglue-copa superglue-rte "
        "superglue-wic superglue-wsc swag wino_grande wiqa"),
    "Classification-F1": (
        "ade_corpus_v2-classification ag_news amazon_polarity anli circa climate_fever codah dbpedia_14 discovery "
        "emo emotion ethos-directed_vs_generalized ethos-disability ethos-gender ethos-national_origin ethos-race "
        "ethos-religion ethos-sexual_orientation financial_phrasebank hate_speech18 hate_speech_offensive hatexplain "
        "health_fact imdb liar onestop_english paws poem_sentiment rotten_tomatoes scicite scitail sick sms_spam "
        "tab_fact trec trec-finegrained tweet_eval-emoji tweet_eval-emotion tweet_eval-hate tweet_eval-irony "
        "tweet_eval-offensive tweet_eval-sentiment tweet_eval-stance_abortion tweet_eval-stance_atheism "
        "tweet_eval-stance_climate tweet_eval-stance_feminist tweet_eval-stance_hillary wiki_auto wiki_qa "
        "yahoo_answers_topics yelp_polarity"),
    "EM": (
        "acronym_identification ade_corpus_v2-dosage ade_corpus_v2-effect aslg_pc12 break-QDMR "
        "break-QDMR-high-level crawl_domain freebase_qa jeopardy kilt_ay2 kilt_hotpotqa kilt_nq kilt_trex kilt_zsre "
        "lama-conceptnet lama-google_re lama-squad lama-trex limit numer_sense proto_qa qa_srl search_qa spider "
        "squad-no_context superglue-multirc web_questions wikisql"),
    "QA-F1": "adversarialqa biomrc duorc hotpot_qa quoref ropes squad-with_context superglue-record tweet_qa",
    "Rouge-L": (
        "aeslc common_gen cos_e e2e_nlg_cleaned eli5-askh eli5-asks eli5-eli5 empathetic_dialogues gigaword kilt_wow "
        "multi_news reddit_tifu-title reddit_tifu-tldr samsum wiki_bio wiki_split xsum"),
    "Pearson-Correlation": "app_reviews mocha yelp_review_full",
    "Matthew-Correlation": "glue-cola",
}
METRIC_OF = {task: metric for metric, names in _TASKS_BY_METRIC.items() for task in names.split()}


# ----------------------------------------------------------------------------------------------------------- metrics
# Each takes every example's references and the (stripped) predictions, as `common.references` makes them, and
# returns {CrossFit's metric name: percentage}.

def _check_lengths(targets: Targets, predictions: Sequence[str]) -> None:
  if len(targets) != len(predictions) or not targets:
    raise ValueError(f"{len(targets)} targets and {len(predictions)} predictions: need as many, at least one")


def accuracy(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """ACC: right when equal to any reference ignoring case, CrossFit's only normalisation for choice-like tasks."""
  _check_lengths(targets, predictions)
  hits = [any(p.lower() == r.lower() for r in refs) for refs, p in zip(targets, predictions)]
  return {"ACC": 100.0 * float(np.mean(hits))}


def classification_f1(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """Classification-F1: scikit-learn's macro F1 against each example's first reference (its label), over the labels
  seen in either; a label never predicted counts 0, as scikit-learn's default does (without its warning)."""
  _check_lengths(targets, predictions)
  gold = [refs[0] for refs in targets]
  return {"Classification-F1": 100.0 * float(sk_metrics.f1_score(gold, list(predictions), average="macro",
                                                                  zero_division=0))}


def _squad(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """t5's SQuAD v1.1 scores (t5.evaluation.qa_utils: the official script's normalisation, exact match and token
  F1, each the best over the references), on percentages."""
  _check_lengths(targets, predictions)
  normalized = [[qa_utils.normalize_squad(r) for r in refs] for refs in targets]
  return qa_utils.qa_metrics(normalized, [qa_utils.normalize_squad(p) for p in predictions])


def exact_match(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """EM: SQuAD-normalised (lower case, no punctuation, articles or extra spaces) equality with any reference."""
  return {"EM": float(_squad(targets, predictions)["em"])}


def qa_f1(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """QA-F1: SQuAD's token F1 after the same normalisation, the best over the references."""
  return {"QA-F1": float(_squad(targets, predictions)["f1"])}


def rouge_l(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """Rouge-L: rouge-score's `rougeL` F-measure (one LCS over the whole text, no stemming), the best over the
  references. CrossFit used the `rouge` package, which tokenises differently (rouge-score lower-cases and keeps
  only ASCII letters and digits), so scores differ slightly; a prediction with nothing but punctuation scores 0 in
  both."""
  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for refs, p in zip(targets, predictions)]
  return {"Rouge-L": 100.0 * float(np.mean(best))}


def _number(text: str) -> float:
  try:
    return float(text.strip())
  except ValueError:
    return MISSING_SCORE


def pearson(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """Pearson-Correlation (scipy) of the predicted and labelled numbers; a prediction that is no number counts as
  `MISSING_SCORE`, as in Task-level MoE (CrossFit made it NaN, which made the whole score NaN)."""
  _check_lengths(targets, predictions)
  gold = [float(refs[0]) for refs in targets]
  return {"Pearson-Correlation": 100.0 * float(stats.pearsonr(gold, [_number(p) for p in predictions])[0])}


def matthews(targets: Targets, predictions: Sequence[str]) -> dict[str, float]:
  """Matthew-Correlation (scikit-learn) of "acceptable" against anything else, CrossFit's rule for glue-cola."""
  _check_lengths(targets, predictions)
  gold = [refs[0] == "acceptable" for refs in targets]
  return {"Matthew-Correlation": 100.0 * float(sk_metrics.matthews_corrcoef(gold, [p == "acceptable"
                                                                                   for p in predictions]))}


METRIC_FNS: dict[str, Callable[[Targets, Sequence[str]], dict[str, float]]] = {
    "ACC": accuracy, "Classification-F1": classification_f1, "EM": exact_match, "QA-F1": qa_f1,
    "Rouge-L": rouge_l, "Pearson-Correlation": pearson, "Matthew-Correlation": matthews,
}


# ------------------------------------------------------------------------------------------------------- task split

@dataclasses.dataclass(frozen=True)
class TaskSplit:
  """A CrossFit task split: which tasks train the upstream model, which select it and which test it."""
  path: str
  train: tuple[str, ...]
  dev: tuple[str, ...]
  test: tuple[str, ...]

  @property
  def tasks(self) -> tuple[str, ...]:
    """train + dev + test, each task once (a split file may list a task twice, e.g. `sick` in CrossFit's
    train_non_nli_test_nli.json): the order the default task ids follow."""
    return tuple(dict.fromkeys(self.train + self.dev + self.test))


def load_task_split(path: str) -> TaskSplit:
  """The split JSON at `path`; one error line naming the file and what is wrong with it."""
  try:
    raw = json.loads(fs.read_text(path))
  except FileNotFoundError:
    raise MissingFileError(f"CrossFit task split {path} not found. To get it: {HOW_TO_GET}") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not a JSON task split ({e.msg}, line {e.lineno})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: a task split is a JSON object with lists 'train', 'dev' and 'test', "
                      f"got a {type(raw).__name__}")
  missing = [k for k in SPLIT_KEYS if k not in raw]
  if missing:
    raise ConfigError(f"{path}: task split lacks {', '.join(repr(k) for k in missing)} (needs lists of task names "
                      f"under 'train', 'dev' and 'test'; has {sorted(raw)})")
  for key in SPLIT_KEYS:
    if not isinstance(raw[key], list) or not all(isinstance(t, str) and t for t in raw[key]):
      raise ConfigError(f"{path}: {key!r} must be a list of task names, got {raw[key]!r:.200}")
  split = TaskSplit(path, *(tuple(raw[k]) for k in SPLIT_KEYS))
  if not split.tasks:
    raise ConfigError(f"{path}: the task split lists no tasks")
  return split


def task_ids(split: TaskSplit, directory: str) -> dict[str, int]:
  """Each task's id: its row in `<directory>/id2task.json` when that file exists (so ids match the task_vecs.npy
  it came with), else its index in `split.tasks`, which a given split file keeps stable."""
  path = files.join(directory, ID2TASK)
  if not fs.exists(path):
    return {task: i for i, task in enumerate(split.tasks)}
  try:
    ids = {task: int(i) for i, task in json.loads(fs.read_text(path)).items()}
  except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
    raise ConfigError(f"{path}: expected a JSON object {{\"<id>\": \"<task>\", ...}} (Task-level MoE's "
                      f"id2task.json)") from None
  absent = [t for t in split.tasks if t not in ids]
  if absent:
    raise ConfigError(f"{path} has no id for {len(absent)} task(s) of {split.path}: {absent[:5]}")
  return ids


# -------------------------------------------------------------------------------------------------------- TSV files

def _parse_line(path: str, number: int, line: str) -> tuple[str, tuple[str, ...]]:
  """One `input<TAB>output[<TAB>output...]` line (1-based `number`) as (input, outputs). Whitespace at the line's end
  (tabs too) and spaces at its start go, as CrossFit's reader strips them; a tab at its start is an empty input."""
  fields = line.rstrip().split("\t")
  fields[0] = fields[0].lstrip()
  problem = None
  if len(fields) < 2:
    problem = "blank line" if not fields[0] else "no tab: expected input<TAB>output[<TAB>output...]"
  elif not fields[0].strip():
    problem = "empty input"
  elif not all(f.strip() for f in fields[1:]):
    problem = f"empty output among {fields[1:]!r:.200}"
  if problem:
    raise files.MalformedRowError(path, number - 1, f"line {number}: {problem}")
  return fields[0], tuple(fields[1:])


def read_tsv(path: str) -> list[tuple[str, tuple[str, ...]]]:
  """Every row of a few-shot TSV as (input, outputs), in file order. Lines end at `\\n` only (a stray `\\r` or
  other Unicode line break inside a field stays in it), and a malformed line stops with the file and line number."""
  try:
    data = fs.read_bytes(path)
  except FileNotFoundError:
    raise MissingFileError(f"CrossFit file {path} not found. To get it: {HOW_TO_GET}") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise files.MalformedRowError(path, line - 1, f"line {line}: not UTF-8") from None
  lines = text.split("\n")
  if lines[-1] == "":  # the newline ending the last row
    lines.pop()
  if not lines:
    raise files.MalformedRowError(path, 0, "empty file: no input<TAB>output rows")
  return [_parse_line(path, i + 1, line) for i, line in enumerate(lines)]


# ------------------------------------------------------------------------------------------------------ seqio tasks

@dataclasses.dataclass(frozen=True)
class Run:
  """One few-shot run of a task: its k-shot train/dev sample drawn with `seed`, and the task's test set."""
  task: str
  k: int
  seed: int
  task_id: int
  directory: str  # the task's folder

  @property
  def name(self) -> str:
    return f"{PREFIX}{self.task.replace('-', '.')}_{self.k}_{self.seed}"

  def path(self, split: str) -> str:
    return files.join(self.directory, f"{self.task}_{self.k}_{self.seed}_{FILE_SPLIT[split]}.tsv")


def crossfit_dir() -> str:
  return files.join(files.require_root("CrossFit", HOW_TO_GET), "crossfit")


@gin.configurable
def crossfit_split(path: str = "random.json") -> str:
  """The task split file: an absolute path or URL, or a path under `<data root>/crossfit`."""
  return path if fs.is_url(path) or os.path.isabs(path) else files.join(crossfit_dir(), path)


def find_runs(task: str, task_id: int, directory: str) -> list[Run]:
  """The (k, seed) runs in a task's folder, by k then seed; each must have its train, dev and test file. One
  listing of the folder answers all (a remote root answers each question with a request)."""
  names = set(files.listdir(directory))
  pattern = re.compile(rf"{re.escape(task)}_(\d+)_(\d+)_(?:train|dev|test)\.tsv")
  found = {(int(m[1]), int(m[2])) for m in map(pattern.fullmatch, names) if m}
  runs = [Run(task, k, seed, task_id, directory) for k, seed in sorted(found)]
  for run in runs:
    for split in SPLIT_KEYS:
      if fs.basename(run.path(split)) not in names:
        raise MissingFileError(f"CrossFit file {run.path(split)} not found (its run has the other splits). "
                               f"To get it: {HOW_TO_GET}")
  return runs


def examples(run: Run, split: str) -> dict[str, list]:
  """A run's split as columns: prompted inputs, first outputs as targets, every output as references."""
  rows = read_tsv(run.path(split))
  return {"inputs": [f"[{run.task}] {text}" for text, _ in rows], "targets": [outs[0] for _, outs in rows],
          "references": [list(outs) for _, outs in rows], "task_ids": [run.task_id] * len(rows)}


def _dataset(run: Run, split: str) -> tf.data.Dataset:
  columns = examples(run, split)
  references = tf.RaggedTensor.from_row_lengths(  # as tf.ragged.constant makes it, without its per-row Python work
      tf.constant([r for refs in columns["references"] for r in refs], tf.string),
      tf.constant([len(refs) for refs in columns["references"]], tf.int64))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": columns["inputs"], "targets": columns["targets"], "references": references,
      "task_ids": tf.constant(columns["task_ids"], tf.int32)})


def _add_task(run: Run) -> None:
  """(Re-)register a run: text tokenised with the run's vocabulary (as `common.add_task`), plus `task_ids`."""
  features = {k: seqio.Feature(run_vocabulary(), add_eos=True) for k in ("inputs", "targets")}
  features["task_ids"] = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.int32, rank=0)
  source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: _dataset(run, split),
                                    splits=tuple(FILE_SPLIT))
  seqio.TaskRegistry.remove(run.name)
  seqio.TaskRegistry.add(run.name, source=source, output_features=features,
                         metric_fns=[METRIC_FNS[METRIC_OF[run.task]]], postprocess_fn=common.references,
                         preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])


_registered_key: tuple[str, str] | None = None  # (crossfit folder, split file) of the last `register()`
_registered_names: list[str] = []
_runs: dict[str, Run] = {}  # registered task name -> its run


def _task_runs(split: TaskSplit, directory: str) -> dict[str, list[Run]]:
  """Every split task's runs; one error for the tasks without a metric and one for those without files."""
  unknown = [t for t in split.tasks if t not in METRIC_OF]
  if unknown:
    raise ConfigError(f"{split.path}: CrossFit has no metric for {unknown[:5]} (see tasks.crossfit.METRIC_OF)")
  ids = task_ids(split, directory)
  runs = {t: find_runs(t, ids[t], files.join(directory, t)) for t in split.tasks}
  absent = [t for t, r in runs.items() if not r]
  if absent:
    raise files.DataNotFoundError(f"CrossFit {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''} "
                                  f"({len(absent)} task(s) of {split.path})", directory, HOW_TO_GET)
  return runs


def register() -> TaskSplit:
  """Register every run of the split file's tasks and the train/dev/test mixtures, replacing the names an earlier
  registration made (another data root or split file may hold other tasks)."""
  global _registered_key
  directory, split = crossfit_dir(), load_task_split(crossfit_split())
  runs = _task_runs(split, directory)
  for name in _registered_names:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
  _registered_names.clear()
  _runs.clear()
  for run in (r for task_runs in runs.values() for r in task_runs):
    _add_task(run)
    _runs[run.name] = run
  _registered_names.extend(_runs)
  for key in SPLIT_KEYS:
    members = [r.name for task in dict.fromkeys(getattr(split, key)) for r in runs[task]]
    if members:
      common.add_mixture(f"{PREFIX}{key}", members)
      _registered_names.append(f"{PREFIX}{key}")
  _registered_key = (directory, split.path)
  return split


def ensure_registered() -> None:
  """`register()` unless it already ran for the current data root and split file."""
  if _registered_key != (crossfit_dir(), crossfit_split()):
    register()


def run_of(name: str) -> Run:
  """The few-shot run a registered `crossfit_<task>_<k>_<seed>` name stands for (its task, seed and task id)."""
  ensure_registered()
  if name not in _runs:
    raise ConfigError(f"{name!r} is no registered CrossFit run ({len(_runs)} registered from {crossfit_split()})")
  return _runs[name]


def _claims(name: str) -> bool:
  """Lazy registrar: CrossFit names are registered on their first lookup, and again when the data root or the
  split file changes."""
  if not name.startswith(PREFIX):
    return False
  ensure_registered()
  return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


pipeline.LAZY_REGISTRARS.append(_claims)
