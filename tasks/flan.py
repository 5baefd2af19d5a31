"""The FLAN collection as seqio tasks, and PHATGOOSE's 166-dataset FLAN expert pool.

`FLAN_POOL` is the one record of the pool's order (the order experts are concatenated in): the 36 P3 datasets of
`tasks.p3.P3_POOL`, 36 FLAN 2021 datasets, 75 Natural Instructions v2 task categories, then 19 more (7 P3, 4
dialog, AESLC and 7 WMT translation pairs). P3 members are the P3 release's dataset mixtures (`p3_<dataset>`);
every other member is a Task reading `<data root>/flan/<name>/<split>.{parquet,jsonl}` rows with `inputs` and
`targets`. `python -m moe_jax.data prepare flan` writes those folders by splitting the public FLAN collection
release (rows with `inputs`, `targets`, `_task_source`, `_task_name`, `_template_type`) by pool member, keeping
the zero-shot templates as PHATGOOSE did, and holding out 1% of each member's rows (by a hash of the input) as its
validation split.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import seqio
import tensorflow as tf
from tqdm.auto import tqdm

from moe_jax.data import files, pipeline
from tasks import common, p3

HOW_TO_GET = ("python -m moe_jax.data prepare flan --out <data root> (downloads the FLAN collection), or "
              "--source <local copy of the release> to split a copy you already have")
SPLITS = ("train", "validation")
ZERO_SHOT = ("zs_opt", "zs_noopt")
VALIDATION_PERCENT = 1

FLAN2021 = (
    "ai2_arc/ARC-Easy", "ai2_arc/ARC-Challenge", "algebra__linear_1d", "bool_q", "coqa", "definite_pronoun_resolution",
    "drop", "fix_punct", "gem/dart", "gem/e2e_nlg", "gem/web_nlg_en", "gem/wiki_lingua_english_en", "glue/sst2",
    "glue/cola", "glue/mnli", "glue/qnli", "glue/stsb", "glue/wnli", "lambada", "natural_questions_open", "newsroom",
    "openbookqa", "opinion_abstracts_idebate", "opinion_abstracts_rotten_tomatoes", "para_crawl_enes", "piqa", "quac",
    "sentiment140", "snli", "squad/v2.0", "super_glue/multirc", "super_glue/record", "trivia_qa/rc", "true_case",
    "unified_qa_science_inst", "word_segment",
)
NIV2 = (
    "Translation", "Program Execution", "Question Generation", "Sentiment Analysis", "Text Categorization",
    "Text Matching", "Toxic Language Detection", "Cause Effect Classification", "Information Extraction",
    "Textual Entailment", "Wrong Candidate Generation", "Named Entity Recognition", "Commonsense Classification",
    "Fill in The Blank", "Text Completion", "Sentence Composition", "Title Generation", "Language Identification",
    "Question Understanding", "Sentence Perturbation", "Answerability Classification", "Summarization",
    "Coreference Resolution", "Text Quality Evaluation", "Text to Code", "Paraphrasing", "Dialogue Generation",
    "Question Rewriting", "Word Semantics", "Pos Tagging", "Linguistic Probing", "Story Composition",
    "Speaker Identification", "Word Analogy", "Data to Text", "Stereotype Detection", "Negotiation Strategy Detection",
    "Dialogue Act Recognition", "Gender Classification", "Coherence Classification", "Explanation",
    "Ethics Classification", "Word Relation Classification", "Sentence Ordering", "Answer Verification", "Mathematics",
    "Intent Identification", "Keyword Tagging", "Code to Text", "Dialogue State Tracking", "Text Simplification",
    "Stance Detection", "Fact Verification", "Grammar Error Detection", "Section Classification", "Number Conversion",
    "Style Transfer", "Speaker Relation Classification", "Irony Detection", "Question Decomposition",
    "Overlap Extraction", "Grammar Error Correction", "Spelling Error Detection", "Entity Generation",
    "Sentence Expansion", "Discourse Connective Identification", "Discourse Relation Classification",
    "Poem Generation", "Entity Relation Classification", "Punctuation Error Detection", "Spam Classification",
    "Paper Review", "Sentence Compression", "Preposition Prediction", "Misc.",
)
DIALOG = ("qrecc", "wiki_dialog", "qrecc_ii", "wiki_dialog_ii")
FLAN2021_EXTRA = ("aeslc", "wmt16_translate/cs-en", "wmt16_translate/de-en", "wmt16_translate/ru-en",
                  "wmt16_translate/fi-en", "wmt16_translate/ro-en", "wmt16_translate/tr-en", "wmt14_translate/fr-en")


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# (source, selector) -> our task name. Selectors are `_task_name` without the ":version" suffix, or NIV2 categories.
MEMBERS: dict[tuple[str, str], str] = {
    **{("Flan2021", t): f"flan_{slug(t)}" for t in FLAN2021 + FLAN2021_EXTRA},
    **{("NIv2", c): f"niv2_{slug(c)}" for c in NIV2},
    **{("Dialog", d): f"dialog_{slug(d)}" for d in DIALOG},
}
FLAN_POOL = (
    *p3.EXPERT_TASKS,
    *(MEMBERS["Flan2021", t] for t in FLAN2021),
    *(MEMBERS["NIv2", c] for c in NIV2),
    *(f"p3_{d.name}" for d in p3.FLAN_POOL_EXTRA),
    *(MEMBERS["Dialog", d] for d in DIALOG),
    *(MEMBERS["Flan2021", t] for t in FLAN2021_EXTRA),
)
POOL_MIXTURE = "flan_pool"


def _rows(name: str, split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
  """A member's `inputs`/`targets` rows, streamed from its files and checked row by row."""
  directory = files.join(files.require_root(name, HOW_TO_GET), "flan", name)
  paths = files.split_files(directory, split, files.ROW_FORMATS)
  if not paths:
    raise files.DataNotFoundError(f"FLAN {name} ({split})", directory, HOW_TO_GET)
  if shuffle_files:
    random.Random(seed).shuffle(paths)

  def convert(path: str, row: int, raw: Any) -> dict[str, str]:
    files.check_fields(path, row, raw, ("inputs", "targets"))
    return {"inputs": raw["inputs"], "targets": raw["targets"]}

  return common.stream_rows(paths, convert, {k: tf.TensorSpec([], tf.string) for k in ("inputs", "targets")})


def register() -> None:
  """Register one Task per non-P3 pool member (their files are looked up when a split is read)."""
  for name in MEMBERS.values():
    source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None, n=name: _rows(n, split, shuffle_files,
                                                                                          seed), splits=SPLITS)
    common.add_task(name, source, [common.exact_match_any], common.references)


_pool_from: str | None = None  # the P3 folder the pool mixture's P3 members were registered from


def _claims(name: str) -> bool:
  """Lazy registrar for the pool mixture, whose P3 members exist once P3 is registered from the data root."""
  global _pool_from
  if name != POOL_MIXTURE:
    return False
  p3.ensure_registered()
  if _pool_from == p3.registered_from():
    return True
  missing = [m for m in FLAN_POOL if m not in seqio.TaskRegistry.names() and m not in seqio.MixtureRegistry.names()]
  if missing:
    raise files.DataNotFoundError(f"P3 member(s) {missing} of the FLAN pool", p3.root(), p3.HOW_TO_GET)
  common.add_mixture(POOL_MIXTURE, FLAN_POOL)
  _pool_from = p3.registered_from()
  return True


def member_of(row: Mapping[str, object], niv2_categories: Mapping[str, str]) -> str | None:
  """The pool member a release row belongs to, or None (another source, or a task outside the pool)."""
  source, task = str(row.get("_task_source", "")), str(row.get("_task_name", ""))
  if source == "NIv2":
    category = row.get("_task_category") or niv2_categories.get(task) or niv2_categories.get(task.split("_")[0])
    return MEMBERS.get(("NIv2", str(category)))
  return MEMBERS.get((source, task.split(":")[0]))


def load_niv2_categories(path: str | None) -> dict[str, str]:
  """NIV2 task -> category, from a JSON map or a natural-instructions `tasks/` folder (each task's "Categories")."""
  if not path:
    return {}
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  categories = {}
  for task_file in files.local_glob(os.path.join(path, "task*.json")):
    with open(task_file, encoding="utf-8") as f:
      categories[os.path.basename(task_file).removesuffix(".json")] = json.load(f)["Categories"][0]
  return categories


def split_release(source: str, out_root: str, niv2_categories: str | None = None,
                  template_types: Sequence[str] = ZERO_SHOT) -> dict[str, collections.Counter]:
  """Split a local FLAN collection release (parquet/jsonl files under `source`) into `<out_root>/flan/<member>/`
  {train,validation}.jsonl; returns per-member row counts per split. Written to a temporary folder and moved into
  place member by member, so an interrupted run leaves no half-written member."""
  release = [p for fmt in files.ROW_FORMATS for p in files.local_glob(os.path.join(source, "**", f"*{fmt}"))]
  if not release:
    raise FileNotFoundError(f"no FLAN release files ({', '.join(files.ROW_FORMATS)}) under {source}")
  categories = load_niv2_categories(niv2_categories)
  final = os.path.join(out_root, "flan")
  staging = os.path.join(out_root, f".flan.tmp-{os.getpid()}")
  os.makedirs(staging, exist_ok=True)
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  handles, uncategorised = {}, 0
  try:
    for path in tqdm(release, desc="split FLAN release", unit="file"):
      for row, example in enumerate(files.read_rows(path)):
        if example.get("_template_type") not in template_types:
          continue
        name = member_of(example, categories)
        if name is None:
          uncategorised += example.get("_task_source") == "NIv2"
          continue
        files.check_fields(path, row, example, ("inputs", "targets"))
        digest = int(hashlib.sha1(example["inputs"].encode()).hexdigest(), 16)
        split = "validation" if digest % 100 < VALIDATION_PERCENT else "train"
        if (name, split) not in handles:
          os.makedirs(os.path.join(staging, name), exist_ok=True)
          handles[name, split] = open(os.path.join(staging, name, f"{split}.jsonl"), "w", encoding="utf-8")
        handles[name, split].write(json.dumps({k: example[k] for k in example if k in (
            "inputs", "targets", "_task_source", "_task_name", "_template_type")}, ensure_ascii=False) + "\n")
        counts[name][split] += 1
  finally:
    for handle in handles.values():
      handle.close()
  os.makedirs(final, exist_ok=True)
  for name in counts:
    for split in SPLITS:  # a small member may get no validation rows; its split still exists, empty
      open(os.path.join(staging, name, f"{split}.jsonl"), "a", encoding="utf-8").close()
    target = os.path.join(final, name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.replace(os.path.join(staging, name), target)
  shutil.rmtree(staging)
  if uncategorised:
    print(f"warning: {uncategorised} NIV2 rows had no known category and were skipped; pass the task -> category "
          "map (--niv2_categories: a JSON file or a natural-instructions tasks/ folder)")
  return dict(counts)


register()
pipeline.LAZY_REGISTRARS.append(_claims)
gin.constant("FLAN_POOL", FLAN_POOL)
