"""Score each student epoch by option letters: `python -m moe_jax.teacher evaluate --gin_file=...`.

As the seed's evaluation, each prepared evaluation row is the prompt "Q: {question} (A) ... A: The answer is ("
(the `base` text up to its answer letter: the student's training format) and every option letter is scored as its
continuation (`moe_jax.evaluation.option_letters`: lm-eval's causal log-likelihood, letters encoded in context);
the prediction is the likeliest letter. Writes, in `output_dir`: `epoch_E.md` (one table per checkpoint: eval set,
examples, accuracy), `results.json` and `accuracy.png` (accuracy against epoch, one line per eval set), all
atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import gin
import numpy as np

from moe_jax import fs
from moe_jax.errors import MissingFileError
from moe_jax.evaluation import option_letters
from moe_jax.models.causal import CausalLM, CausalLMConfig
from moe_jax.teacher import formats
from moe_jax.teacher.enhance import load_causal, model_config_for
from moe_jax.teacher.text import Codec, hf_codec

_EPOCH = re.compile(r"^epoch_(\d+)$")


def accuracy(model: CausalLM, params: Any, codec: Codec, rows: list[dict[str, Any]], batch_size: int = 32) -> float:
  """Percent of `rows` (prepared: question, options, answer_index) whose likeliest letter is the gold one."""
  if not rows:
    return 0.0
  contexts, letters = [], []
  for row in rows:
    prompt = formats.answer_prompt(row["question"], row["options"])
    pairs = [option_letters.split_continuation(codec.encode, prompt, letter)
             for letter in formats.LETTERS[:len(row["options"])]]
    contexts.append(np.asarray(list(codec.prefix) + pairs[0][0], np.int32))
    letters.append([np.asarray(tokens, np.int32) for _, tokens in pairs])
  scores = option_letters.option_letter_log_likelihoods(model, params, contexts, letters, batch_size)
  gold = np.asarray([int(row["answer_index"]) for row in rows])
  return 100.0 * float(np.mean(np.argmax(scores, axis=-1) == gold))


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


def table(epoch: int, scores: Mapping[str, float], sizes: Mapping[str, int]) -> str:
  lines = [f"# epoch {epoch}", "", "| eval set | examples | accuracy |", "|---|---|---|"]
  lines += [f"| {name} | {sizes[name]} | {scores[name]:.2f} |" for name in sorted(scores)]
  return "\n".join(lines) + "\n"


@gin.configurable
def evaluate_students(model_dir: str = gin.REQUIRED, eval_files: Mapping[str, str] = gin.REQUIRED,
                      output_dir: str | None = None, model_config: CausalLMConfig | None = None,
                      tokenizer_from: str | None = None, batch_size: int = 32,
                      max_examples: int | None = None) -> dict[int, dict[str, float]]:
  """{epoch: {eval set: accuracy}} of every finished epoch of the student run `model_dir` on the prepared
  `eval_files` ({name: prepared .jsonl}), written to `output_dir` (default `model_dir/eval`). `tokenizer_from`: a
  HF directory whose tokenizer the student reads (a student fine-tuned from a HF model)."""
  output_dir = output_dir or fs.join(model_dir, "eval")
  sets = {name: formats.read_rows(path)[:max_examples] for name, path in eval_files.items()}
  config = model_config_for(tokenizer_from, model_config)
  results: dict[int, dict[str, float]] = {}
  for epoch, path in epochs_of(model_dir).items():
    model, params, _, codec = load_causal(path, config)
    if tokenizer_from:
      codec = hf_codec(tokenizer_from)
    results[epoch] = {name: accuracy(model, params, codec, rows, batch_size) for name, rows in sets.items()}
    fs.write_text(fs.join(output_dir, f"epoch_{epoch}.md"),
                  table(epoch, results[epoch], {name: len(rows) for name, rows in sets.items()}))
  fs.write_text(fs.join(output_dir, "results.json"), json.dumps({str(e): s for e, s in results.items()}, indent=1))
  plot_accuracy(results, fs.join(output_dir, "accuracy.png"), fs.basename(fs.absolute(model_dir)))
  return results
