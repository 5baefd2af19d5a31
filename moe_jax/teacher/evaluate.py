"""Score each student epoch by option letters: `python -m moe_jax.teacher evaluate --gin_file=...`.

As the seed's evaluation, each prepared evaluation row is the prompt "Q: {question} (A) ... A: The answer is ("
(the `base` text up to its answer letter: the student's training format) and every option letter is scored as its
continuation (`moe_jax.evaluation.option_letters`: lm-eval's causal log-likelihood, letters encoded in context);
the prediction is the likeliest letter. A set whose rows carry `subject` (MMLU) scores, as the seed's MMLU average
over its 57 subject tasks, the mean of its per-subject accuracies (each subject weighs the same, whatever its size),
not the pooled fraction of rows.

The sets are prepared files: `eval_files` ({name: path}) and `eval_sets` (benchmark names, `mmlu` or
`mmlu:validation`, read from `data_root/teacherlm/<benchmark>/<split>.jsonl`, the layout `python -m moe_jax.teacher
download` writes). Writes, in `output_dir`: `epoch_E.md` (one table per checkpoint: eval set, examples, accuracy;
then a per-subject table for each subject-averaged set), `results.json` (`accuracy` {epoch: {set: accuracy}},
`examples`, and for subject-averaged sets `pooled` and `subjects` {epoch: {set: {subject: accuracy}}} with
`subject_examples`) and `accuracy.png` (accuracy against epoch, one line per eval set), all atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import gin
import numpy as np

from moe_jax import fs
from moe_jax.data import files
from moe_jax.errors import ConfigError, MissingFileError
from moe_jax.evaluation import option_letters
from moe_jax.models.causal import CausalLM, CausalLMConfig
from moe_jax.teacher import formats, hub
from moe_jax.teacher.lm import load_lm, model_config_for
from moe_jax.teacher.text import Codec

_EPOCH = re.compile(r"^epoch_(\d+)$")


def correct(model: CausalLM, params: Any, codec: Codec, rows: list[dict[str, Any]],
            batch_size: int = 32) -> np.ndarray:
  """[len(rows)] bool: whether each row's (prepared: question, options, answer_index) likeliest letter is the
  gold one."""
  if not rows:
    return np.zeros((0,), bool)
  contexts, letters = [], []
  for row in rows:
    prompt = formats.answer_prompt(row["question"], row["options"])
    pairs = [option_letters.split_continuation(codec.encode, prompt, letter)
             for letter in formats.LETTERS[:len(row["options"])]]
    contexts.append(np.asarray(list(codec.prefix) + pairs[0][0], np.int32))
    letters.append([np.asarray(tokens, np.int32) for _, tokens in pairs])
  scores = option_letters.option_letter_log_likelihoods(model, params, contexts, letters, batch_size)
  gold = np.asarray([int(row["answer_index"]) for row in rows])
  return np.argmax(scores, axis=-1) == gold


class SetScore(NamedTuple):
  """One eval set's score at one checkpoint: `accuracy` (percent; the mean over subjects where rows carry one),
  the `pooled` percent of rows right, and {subject: (examples, accuracy)} (empty without subjects)."""

  accuracy: float
  pooled: float
  subjects: dict[str, tuple[int, float]]


def subjects_of(rows: list[dict[str, Any]], name: str = "eval set") -> list[str] | None:
  """Each row's subject, or None when no row has one; a set where only some rows have one is a preparation error
  (its average would silently drop or pool them)."""
  have = [row.get("subject") is not None for row in rows]
  if not any(have):
    return None
  if not all(have):
    raise ConfigError(f"{name}: {have.count(False)} of {len(rows)} rows have no 'subject' (MMLU rows need one "
                      "each; prepare the whole set from rows with a subject column)")
  return [str(row["subject"]) for row in rows]


def set_score(hits: np.ndarray, subjects: Sequence[str] | None) -> SetScore:
  """`hits` ([N] bool, one per row) as a `SetScore`: with `subjects` (one per row) the accuracy is the mean of the
  per-subject accuracies, as the seed averages MMLU's 57 subjects, so a large subject weighs no more than a small
  one."""
  hits = np.asarray(hits, bool)
  pooled = 100.0 * float(np.mean(hits)) if hits.size else 0.0
  if subjects is None:
    return SetScore(pooled, pooled, {})
  labels = np.asarray(subjects)
  per = {subject: (int(np.sum(labels == subject)), 100.0 * float(np.mean(hits[labels == subject])))
         for subject in sorted(set(subjects))}
  return SetScore(float(np.mean([acc for _, acc in per.values()])), pooled, per)


def eval_set_files(eval_sets: Sequence[str], data_root: str | None) -> dict[str, str]:
  """{name: prepared file} of benchmark names (`mmlu`, or `mmlu:validation` for another split) under the data root
  (`data_root`, else the DATA_DIR macro / $MOE_JAX_DATA_DIR); a missing file is one line naming the command that
  writes it."""
  if isinstance(eval_sets, str):
    raise ConfigError(f"eval_sets={eval_sets!r}: a list of benchmark names, e.g. ['mmlu', 'creak']")
  root = data_root or files.data_root()
  if eval_sets and not root:
    raise ConfigError(f"eval_sets={list(eval_sets)} read under a data root: bind evaluate_students.data_root (or "
                      f"DATA_DIR, or set ${files.ENV_VAR})")
  out = {}
  for name in eval_sets:
    benchmark, _, split = name.partition(":")
    path = hub.prepared_path(root, benchmark, split or None)
    if not fs.exists(path):
      split_flag = f" --split {split}" if split else ""
      raise MissingFileError(f"eval set {name!r}: {path} not found; write it with `python -m moe_jax.teacher "
                             f"download --benchmark {benchmark} --data_root {root}{split_flag}` (offline: "
                             f"{hub.offline_recipe(root, benchmark, split or None)})")
    out[name] = path
  return out


def epochs_of(model_dir: str) -> dict[int, str]:
  """{epoch: its product} of a `train_student` run, in epoch order."""
  found = {int(m.group(1)): fs.join(model_dir, name) for name in fs.listdir(model_dir)
           if (m := _EPOCH.match(name)) and fs.isdir(fs.join(model_dir, name, "backbone"))}
  if not found:
    raise MissingFileError(f"{model_dir} has no finished epoch (epoch_E/backbone): train the student first")
  return dict(sorted(found.items()))


def plot_accuracy(results: Mapping[int, Mapping[str, float]], path: str, title: str = "") -> str:
  """Accuracy against epoch, one line per evaluation set, written atomically as a PNG."""
  from moe_jax.plots import _pyplot, _save_png  # pylint: disable=g-import-not-at-top,protected-access
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
  epochs = sorted(results)
  for name in sorted({n for scores in results.values() for n in scores}):
    ax.plot(epochs, [results[e].get(name, float("nan")) for e in epochs], marker="o", label=name)
  ax.set_xlabel("epoch")
  ax.set_ylabel("option-letter accuracy (%)")
  ax.set_title(title)
  ax.legend()
  return _save_png(fig, path)


def table(epoch: int, scores: Mapping[str, float], sizes: Mapping[str, int],
          subjects: Mapping[str, Mapping[str, tuple[int, float]]] | None = None,
          pooled: Mapping[str, float] | None = None) -> str:
  """The checkpoint's table; a subject-averaged set's row holds the mean over subjects, its pooled accuracy and
  per-subject table follow."""
  lines = [f"# epoch {epoch}", "", "| eval set | examples | accuracy |", "|---|---|---|"]
  lines += [f"| {name} | {sizes[name]} | {scores[name]:.2f} |" for name in sorted(scores)]
  for name, per in sorted((subjects or {}).items()):
    pooled_text = f" (pooled over rows: {pooled[name]:.2f})" if pooled and name in pooled else ""
    lines += ["", f"## {name} by subject", "", f"{name}: {scores[name]:.2f} is the mean over {len(per)} subjects"
              f"{pooled_text}.", "", "| subject | examples | accuracy |", "|---|---|---|"]
    lines += [f"| {subject} | {count} | {acc:.2f} |" for subject, (count, acc) in per.items()]
  return "\n".join(lines) + "\n"


@gin.configurable
def evaluate_students(model_dir: str = gin.REQUIRED, eval_files: Mapping[str, str] | None = None,
                      output_dir: str | None = None, model_config: CausalLMConfig | None = None,
                      init_from: str | None = None, batch_size: int = 32,
                      max_examples: int | None = None, eval_sets: Sequence[str] = (),
                      data_root: str | None = None) -> dict[int, dict[str, float]]:
  """{epoch: {eval set: accuracy}} of every finished epoch of the student run `model_dir` on the prepared
  `eval_files` ({name: prepared .jsonl}) and `eval_sets` (benchmarks under `data_root`, see `eval_set_files`),
  written to `output_dir` (default `model_dir/eval`). `init_from`: the HF directory the student was fine-tuned from,
  whose config.json is the model config when none is bound (the tokenizer is the one the student's run recorded).
  Every set is read, and its subjects checked, before any model
  loads, so a missing file fails in a second."""
  paths = dict(eval_files or {})
  for name, path in eval_set_files(eval_sets, data_root).items():
    if name in paths:
      raise ConfigError(f"eval set {name!r} is both in eval_files and eval_sets: rename one")
    paths[name] = path
  if not paths:
    raise ConfigError("no eval set: bind evaluate_students.eval_files ({name: prepared .jsonl}) or eval_sets "
                      "(['mmlu', 'creak', 'ecqa', 'strategyqa'] with data_root)")
  output_dir = output_dir or fs.join(model_dir, "eval")
  sets = {name: formats.read_rows(path)[:max_examples] for name, path in paths.items()}
  subjects = {name: subjects_of(rows, f"eval set {name!r} ({paths[name]})") for name, rows in sets.items()}
  sizes = {name: len(rows) for name, rows in sets.items()}
  config = model_config_for(init_from, model_config)
  results: dict[int, dict[str, float]] = {}
  pooled: dict[int, dict[str, float]] = {}
  by_subject: dict[int, dict[str, dict[str, tuple[int, float]]]] = {}
  for epoch, path in epochs_of(model_dir).items():
    model, params, _, codec = load_lm(path, config)
    scores = {name: set_score(correct(model, params, codec, rows, batch_size), subjects[name])
              for name, rows in sets.items()}
    results[epoch] = {name: score.accuracy for name, score in scores.items()}
    pooled[epoch] = {name: score.pooled for name, score in scores.items() if score.subjects}
    by_subject[epoch] = {name: score.subjects for name, score in scores.items() if score.subjects}
    fs.write_text(fs.join(output_dir, f"epoch_{epoch}.md"),
                  table(epoch, results[epoch], sizes, by_subject[epoch], pooled[epoch]))
  summary: dict[str, Any] = {"accuracy": {str(e): s for e, s in results.items()}, "examples": sizes}
  if any(by_subject.values()):
    summary["pooled"] = {str(e): s for e, s in pooled.items()}
    summary["subjects"] = {str(e): {name: {subject: acc for subject, (_, acc) in per.items()}
                                    for name, per in sets_.items()} for e, sets_ in by_subject.items()}
    summary["subject_examples"] = {name: {subject: count for subject, (count, _) in per.items()}
                                   for name, per in next(iter(by_subject.values())).items()}
  fs.write_text(fs.join(output_dir, "results.json"), json.dumps(summary, indent=1))
  plot_accuracy(results, fs.join(output_dir, "accuracy.png"), fs.basename(fs.absolute(model_dir)))
  return results
