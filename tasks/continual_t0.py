"""ELM's evaluation sets beyond T0's held-out datasets: Continual-T0's generative target tasks and the seen tasks.

ELM (Jang et al. 2023, github.com/joeljang/ELM) evaluates experts and their retrieval on three sets: the unseen T0
held-out datasets (`t0_heldout`, tasks/p3.py), `elm_seen` and `elm_target`, each capped at 300 instances per prompt.

elm_target: the generative tasks Continual-T0 taught T0 (Scialom et al. 2022, github.com/ThomasScialom/
T0_continual_learning), read from that release's data folder:
  <data root>/continual_t0/<dataset>/<prompt>.<split>.json
(ELM's copy, data/manual/ct0_data, nests most datasets one level deeper, in <dataset>/<dataset>/). Each file is
one JSON object of columns: `src`, the prompted input (Continual-T0 applied the prompt's instruction, one of its
templates drawn per example with a fixed seed); `tgt`, the target (a list of references for ASSET and e-SNLI); and
`src_info`, the raw rows, which hold the sentence a simplification rewrites. Each (dataset, prompt) ELM evaluates is
the Task `ct0_<dataset>_<prompt>`, split `validation`: the file's first 300 rows (ELM drew a seeded random 300 for
asset, gigaword, haiku and covid_qa; the first 300 for the others). Prompts:
  wiki_auto, asset  simplification_1 (11 wordings of "rewrite this with simpler words / so it is easier to read") and
                    simplification_2 (3 unseen wordings: "simplify this text"); BLEU and SARI against every reference
                    (ELM scored BLEU against ASSET's first reference only)
  gigaword          title an article under a constraint: constrain_{start,contain,end}+{make_a_title,
                    write_its_sentence} ("... starting with / containing / ending with <word>"); ROUGE and BLEU
                    (Continual-T0's rate of satisfied constraints is not computed)
  haiku             do_nothing: the dataset's own instruction ("Write a haiku about '<words>'"); ROUGE and BLEU
  covid_qa_deepset  covid_cloze_book_qa: "In the context of the COVID pandemic, <question>", closed book; Continual-T0
                    has no held-out split for it, and ELM and Continual-T0 both evaluate on its training file
  eli5              generate_a_question_1: the question an answer replies to
  empathetic_dialogues  dialogue_with_emotion: the next turn, given the emotion, the situation and the dialogue
  eSNLI             explain_why: why two sentences entail, contradict or are unrelated (3 reference explanations)
  twitter_top20     tweet_as+about: a tweet about a hashtag in the style of one of 20 famous authors
ELM scores the last five by BERTScore, which needs a model (Continual-T0 adds BLEU, and ROUGE or a style classifier
for some); they get ROUGE and BLEU here.

elm_seen: 300 validation instances of every training template of the T0 training (P3 pool) datasets, as ELM's
seen-task evaluation: `elm_seen_<config>` is `p3_<config>` cut to the first 300 rows of its validation split (its
test split for the datasets P3 releases without one), scored as the P3 task plus BLEU and ROUGE, which ELM reports
for the generative templates. app_reviews is left out: P3 has only its training split. Registered on first lookup,
from the P3 configs under the data root (see tasks/p3.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

import seqio
import tensorflow as tf

from moe_jax.data import files, pipeline
from moe_jax.evaluation import text_metrics
from tasks import common, flan, p3

ELM_EVAL_SIZE = 300  # instances per (dataset, prompt) in ELM's seen and target evaluation
TARGET_MIXTURE, SEEN_MIXTURE = "elm_target", "elm_seen"
SEEN_EXCLUDED = ("app_reviews",)  # P3 has only its training split: nothing held out to evaluate
HOW_TO_GET = ("copy the data folder of the Continual-T0 release (linked from "
              "https://github.com/ThomasScialom/T0_continual_learning) to <data root>/continual_t0, keeping its "
              "<dataset>/<prompt>.<split>.json files")


@dataclasses.dataclass(frozen=True)
class Target:
  """One Continual-T0 evaluation file: `<dataset>/<prompt>.<split>.json`."""
  dataset: str
  prompt: str
  split: str  # the release split ELM and Continual-T0 evaluate
  sari_source: str | None = None  # the `src_info` field with the sentence a simplification rewrites

  @property
  def name(self) -> str:
    return f"ct0_{flan.slug(self.dataset)}_{flan.slug(self.prompt)}"


TARGETS = (
    *(Target("wiki_auto", f"simplification_{i}", "test", "normal_sentence") for i in (1, 2)),
    *(Target("asset", f"simplification_{i}", "validation", "original") for i in (1, 2)),
    *(Target("gigaword", f"constrain_{where}+{task}", "test")
      for task in ("make_a_title", "write_its_sentence") for where in ("start", "contain", "end")),
    Target("haiku", "do_nothing", "test"),
    Target("covid_qa_deepset", "covid_cloze_book_qa", "train"),
    Target("eli5", "generate_a_question_1", "test_asks"),
    Target("empathetic_dialogues", "dialogue_with_emotion", "test"),
    Target("eSNLI", "explain_why", "test"),
    Target("twitter_top20", "tweet_as+about", "test"),
)
TARGET_TASKS = tuple(t.name for t in TARGETS)


def _release_file(target: Target) -> str:
  root = files.require_root(f"Continual-T0 {target.dataset}", HOW_TO_GET)
  return files.join(root, "continual_t0", target.dataset, f"{target.prompt}.{target.split}.json")


def _columns(path: str, sari_source: str | None) -> dict[str, list[Any]]:
  """The release file's columns, checked to be lists of one length (`src_info` too when SARI needs it)."""
  with files.open_file(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise files.MalformedRowError(path, 0, f"not JSON ({e.msg})") from None
  names = ("src", "tgt") + (("src_info",) if sari_source else ())
  if not isinstance(data, dict) or not all(isinstance(data.get(n), list) for n in names):
    raise files.MalformedRowError(path, 0, f"expected a JSON object with list columns {list(names)}")
  if len({len(data[n]) for n in names}) > 1:
    raise files.MalformedRowError(path, 0, f"columns of different lengths: {({n: len(data[n]) for n in names})}")
  if not data["src"]:
    raise files.MalformedRowError(path, 0, "no rows")
  return data


def _example(target: Target, path: str, row: int, data: dict[str, list[Any]]) -> dict[str, Any]:
  """One row as inputs (the prompted source), targets (the first reference), references (+ source for SARI)."""
  src, tgt = data["src"][row], data["tgt"][row]
  refs = [tgt] if isinstance(tgt, str) else tgt
  if not isinstance(src, str) or not src:
    raise files.MalformedRowError(path, row, "src is not a non-empty string")
  if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
    raise files.MalformedRowError(path, row, "tgt is not a non-empty string or list of strings")
  example = {"inputs": src, "targets": refs[0], "references": refs}
  if target.sari_source:
    source = data["src_info"][row].get(target.sari_source) if isinstance(data["src_info"][row], dict) else None
    if not isinstance(source, str):
      raise files.MalformedRowError(path, row, f"src_info has no {target.sari_source!r} string (SARI's source)")
    example["source"] = source
  return example


def load(target: Target) -> list[dict[str, Any]]:
  """The first `ELM_EVAL_SIZE` examples of a target file, checked."""
  path = _release_file(target)
  try:
    data = _columns(path, target.sari_source)
  except FileNotFoundError:
    raise files.DataNotFoundError(f"Continual-T0 {target.dataset} {target.prompt}", path, HOW_TO_GET) from None
  return [_example(target, path, row, data) for row in range(min(ELM_EVAL_SIZE, len(data["src"])))]


def _dataset(target: Target) -> tf.data.Dataset:
  columns: dict[str, list[Any]] = defaultdict(list)
  for example in load(target):
    for key, value in example.items():
      columns[key].append(value)
  return tf.data.Dataset.from_tensor_slices(
      {k: tf.ragged.constant(v) if k == "references" else v for k, v in columns.items()})


def register_targets() -> None:
  """One Task per target (its file is read when the split is), and the `elm_target` mixture."""
  for target in TARGETS:
    source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None, t=target: _dataset(t),
                                      splits=("validation",))
    metric_fns = [text_metrics.bleu_metric, text_metrics.rouge_metric]
    if target.sari_source:
      common.add_task(target.name, source, metric_fns + [text_metrics.sari_metric], text_metrics.sari_target)
    else:
      common.add_task(target.name, source, metric_fns, common.references)
  common.add_mixture(TARGET_MIXTURE, TARGET_TASKS)


def _held_out_rows(config: str, source: seqio.DataSource) -> seqio.FunctionDataSource:
  """A P3 config's first `ELM_EVAL_SIZE` validation rows, or test rows when it has no validation split."""

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files  # one split, in file order
    for held_out in ("validation", "test"):
      try:
        return source.get_dataset(split=held_out, shuffle=False, seed=seed).take(ELM_EVAL_SIZE)
      except files.DataNotFoundError:
        continue
    raise files.DataNotFoundError(f"P3 {config} (validation or test split, for {SEEN_MIXTURE})",
                                  files.join(p3.root(), config), p3.HOW_TO_GET)

  return seqio.FunctionDataSource(dataset_fn, splits=("validation",))


_seen_from: str | None = None  # the P3 folder the elm_seen names were registered from
_seen_names: list[str] = []


def register_seen() -> list[str]:
  """`elm_seen_<config>` for every training template of the pool datasets under the data root, and the mixture;
  returns the task names. Names registered from a previous data root are removed first."""
  global _seen_from
  p3.ensure_registered()
  for name in _seen_names:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
  _seen_names.clear()
  datasets = [f"p3_{d.name}" for d in p3.P3_POOL if d.name not in SEEN_EXCLUDED]
  templates = [t for d in datasets if d in seqio.MixtureRegistry.names() for t in seqio.get_mixture_or_task(d).tasks]
  if not templates:
    raise files.DataNotFoundError(f"P3 training datasets (for {SEEN_MIXTURE})", p3.root(), p3.HOW_TO_GET)
  names = []
  for task in templates:
    config = task.name.removeprefix("p3_")
    names.append(f"{SEEN_MIXTURE}_{config}")
    common.add_task(names[-1], _held_out_rows(config, task.source),
                    list(task.metric_fns) + [text_metrics.bleu_metric, text_metrics.rouge_metric],
                    task.postprocess_fn)
  common.add_mixture(SEEN_MIXTURE, names)
  _seen_names.extend(names + [SEEN_MIXTURE])
  _seen_from = p3.registered_from()
  return names


def _claims(name: str) -> bool:
  """Lazy registrar for the elm_seen names, which exist once P3 is registered from the data root."""
  if name != SEEN_MIXTURE and not name.startswith(f"{SEEN_MIXTURE}_"):
    return False
  p3.ensure_registered()
  if _seen_from != p3.registered_from():
    register_seen()
  return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


register_targets()
pipeline.LAZY_REGISTRARS.append(_claims)
