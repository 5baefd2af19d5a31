"""TeacherLM's prompt fields for a multiple-choice dataset: `base` (question, lettered options and the gold answer)
and the three triggers that ask a teacher for a rationale.

Every dataset becomes one shape first, (question, options, answer index), through a format function registered
with `@register_format("name")`; the fields are then built the same way for all, as the seed builds them for
CREAK: "Q: {question} (A) {o0} (B) {o1} ... A: The answer is ({gold})." plus " Let's think step by step." (cot),
" The common mistakes are:" (error) or " The fundamental of this question is:" (fundamental), with runs of spaces
collapsed. Prepared rows keep question / options / answer_index, so the same file is an option-letter evaluation
set (`moe_jax.evaluation.option_letters.option_letter_accuracy`), and `subject` where the raw row has one (MMLU), so
an evaluation can average per subject as the seed does (`moe_jax.teacher.evaluate`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from moe_jax import fs
from moe_jax.errors import ConfigError, MissingFileError

LETTERS = "ABCDEFGHIJ"
TRIGGERS = {"cot": " Let's think step by step.", "error": " The common mistakes are:",
            "fundamental": " The fundamental of this question is:"}
CREAK_QUESTION = "Determine the correctness of the following sentence."

Question = tuple[str, list[str], int]  # (question, options, index of the gold option)
FormatFn = Callable[[dict[str, Any]], Question]
_FORMATS: dict[str, FormatFn] = {}


def register_format(name: str) -> Callable[[FormatFn], FormatFn]:
  """Register `fn(raw row) -> (question, options, answer index)` as dataset kind `name` (a new dataset's whole
  cost); it raises KeyError for a missing field, which `prepare_rows` reports with the row number."""
  def wrap(fn: FormatFn) -> FormatFn:
    _FORMATS[name] = fn
    return fn
  return wrap


def kinds() -> list[str]:
  return sorted(_FORMATS)


def collapse_spaces(text: str) -> str:
  """Runs of spaces become one (the seed's `replace("  ", " ")` until none is left)."""
  return re.sub(r" {2,}", " ", text)


def _truth(value: Any, where: str) -> bool:
  """A yes/no label as datasets store it: a bool, 0/1, or the words true/false/yes/no."""
  if isinstance(value, bool):
    return value
  if isinstance(value, (int, float)) and value in (0, 1):
    return bool(value)
  word = str(value).strip().lower()
  if word in ("true", "yes"):
    return True
  if word in ("false", "no"):
    return False
  raise ConfigError(f"{where}: label {value!r} is not a yes/no value")


def _index(answer: Any, options: list[str], where: str) -> int:
  """The gold option's index from an index, a letter, or the option's text."""
  if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
    return answer
  text = str(answer).strip()
  if len(text) == 1 and text.upper() in LETTERS[:len(options)]:
    return LETTERS.index(text.upper())
  if text in options:
    return options.index(text)
  raise ConfigError(f"{where}: answer {answer!r} is none of the {len(options)} options (index, letter or text)")


@register_format("creak")
def creak(row: dict[str, Any]) -> Question:
  """CREAK: a claim ("sentence") judged True/False ("label")."""
  return f"{CREAK_QUESTION} {row['sentence']}", ["True", "False"], 0 if _truth(row["label"], "creak") else 1


@register_format("strategyqa")
def strategyqa(row: dict[str, Any]) -> Question:
  """StrategyQA: a yes/no "question" with a boolean "answer"."""
  return row["question"], ["Yes", "No"], 0 if _truth(row["answer"], "strategyqa") else 1


@register_format("ecqa")
def ecqa(row: dict[str, Any]) -> Question:
  """ECQA: "q_text", five options "q_op1".."q_op5" and the answer's text "q_ans"."""
  options = [str(row[f"q_op{i}"]) for i in range(1, 6)]
  return row["q_text"], options, _index(row["q_ans"], options, "ecqa")


@register_format("mmlu")
def mmlu(row: dict[str, Any]) -> Question:
  """MMLU (cais/mmlu layout): "question", four "choices", "answer" (index or letter)."""
  options = [str(o) for o in row["choices"]]
  return row["question"], options, _index(row["answer"], options, "mmlu")


@register_format("custom")
def custom(row: dict[str, Any]) -> Question:
  """Any dataset already in our shape: "question", "options" (list), "answer" (index, letter or option text)."""
  options = [str(o) for o in row["options"]]
  return row["question"], options, _index(row["answer"], options, "custom")


def answer_prompt(question: str, options: list[str]) -> str:
  """"Q: {question} (A) {o0} (B) {o1} ... A: The answer is (": `base` up to its answer letter, so a student is
  scored on the letter in exactly the text it was trained on."""
  if not 1 <= len(options) <= len(LETTERS):
    raise ConfigError(f"{len(options)} options; expected 1 to {len(LETTERS)}")
  listed = " ".join(f"({letter}) {option.strip()}" for letter, option in zip(LETTERS, options))
  return collapse_spaces(f"Q: {question.strip()} {listed} A: The answer is (")


def fields(question: str, options: list[str], answer_index: int) -> dict[str, Any]:
  """The prepared row: the question in option-letter form plus `base` and one field per trigger."""
  base = answer_prompt(question, options) + f"{LETTERS[answer_index]})."
  out = {"question": collapse_spaces(question.strip()), "options": [o.strip() for o in options], "answer_index": answer_index,
         "base": base}
  out.update({name: collapse_spaces(base + trigger) for name, trigger in TRIGGERS.items()})
  return out


def prepare_rows(rows: Iterable[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
  """Prepared rows of a dataset of kind `kind`, in order; a row missing a field stops with one line naming it. A
  raw row's `subject` (MMLU's 57) is kept whatever the kind: evaluation averages per subject, as the seed does."""
  if kind not in _FORMATS:
    raise ConfigError(f"--kind={kind!r}; expected one of {kinds()} (or register one with @register_format)")
  for number, row in enumerate(rows):
    try:
      question = _FORMATS[kind](row)
    except KeyError as e:
      raise ConfigError(f"{kind} row {number}: missing field {e.args[0]!r} (has {sorted(row)})") from None
    out = fields(*question)
    if row.get("subject") is not None:
      out["subject"] = str(row["subject"])
    yield out


def read_rows(path: str) -> list[dict[str, Any]]:
  """Rows of a JSON-lines file, or of a Hugging Face `datasets` dataset saved with `save_to_disk` (a folder)."""
  if not fs.exists(path):
    raise MissingFileError(f"dataset {path!r} not found (a .jsonl file or a datasets.save_to_disk folder)")
  if fs.isdir(path):
    import datasets  # pylint: disable=g-import-not-at-top
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
      raise ConfigError(f"{path} holds splits {sorted(loaded)}: point --dataset at one split's folder")
    return [dict(row) for row in loaded]
  rows = []
  for number, line in enumerate(fs.read_text(path).splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{number}: not JSON ({e.msg})") from None
  return rows


def to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
  return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def prepare(dataset: str, kind: str, out: str) -> int:
  """Write the prepared rows of `dataset` to `out` (atomically); returns the row count."""
  rows = list(prepare_rows(read_rows(dataset), kind))
  fs.write_text(out, to_jsonl(rows))
  return len(rows)
