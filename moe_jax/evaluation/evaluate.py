"""Evaluate a model on a seqio task with the task's own metric functions, and write the results.

seqio (and with it TensorFlow) is imported inside `evaluate_task` only, so this module, `write_results` included,
imports without TensorFlow.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import numpy as np

from moe_jax import fs
from moe_jax.errors import ConfigError
from moe_jax.evaluation.scoring import choice_log_likelihoods, greedy_generate, pad_tokens, rank_classify

MODES = ("rank", "generate", "auto")
RoutingIdsFn = Callable[[str, Sequence[Mapping[str, Any]]], Sequence[int]]
# The score reported per task: the first of these its metric functions give (rank classification gives accuracy).
PRIMARY_METRICS = ("accuracy", "exact_match", "rougeLsum")


def primary_metric(metrics: Mapping[str, float]) -> float:
  for name in PRIMARY_METRICS:
    if name in metrics:
      return float(metrics[name])
  raise ConfigError(f"no primary metric ({PRIMARY_METRICS}) among {sorted(metrics)}")


def _padded_length(longest: int, configured: int | None) -> int:
  """The configured length (one shape for every task), else the longest rounded up to a multiple of 16."""
  return configured if configured is not None else -(-longest // 16) * 16


def _merge(results: list[Mapping[str, Any]]) -> dict[str, float]:
  return {k: float(v) for r in results for k, v in r.items()}


def evaluate_task(model: nn.Module, params: Any, task_name: str, split: str = "validation", batch_size: int = 32,
                  feature_lengths: Mapping[str, int] | None = None, mode: str = "auto",
                  length_normalize: bool = True, max_examples: int | None = None,
                  routing_ids_fn: RoutingIdsFn | None = None) -> dict[str, Any]:
  """Score a task's split: returns {'metrics': {name: value}, 'predictions': [per-example dict], 'mode': mode}.

  'rank' picks the answer choice of highest (per-token, if `length_normalize`) log-likelihood and feeds the
  per-choice scores, in t5's `rank_classification` format, to the task's score metric fns (without any, its
  prediction metric fns judge the chosen strings); 'generate' decodes greedily up to the targets length and feeds
  the postprocessed strings to the task's prediction metric fns; 'auto' ranks when the task has answer choices.
  `routing_ids_fn(task_name, examples)` gives one routing id per example (for `Fixed()`-routed experts).
  """
  from moe_jax.data.pipeline import eval_examples, get_provider

  if mode not in MODES:
    raise ValueError(f"evaluate_task: mode={mode!r}; expected one of {MODES}")
  task = get_provider(task_name)
  examples = eval_examples(task_name, split, feature_lengths, max_examples)
  if not examples:
    raise ValueError(f"Task {task_name!r} has no {split!r} examples")
  has_choices = "answer_choices" in examples[0]
  mode = ("rank" if has_choices else "generate") if mode == "auto" else mode
  if mode == "rank" and not has_choices:
    raise ValueError(f"Task {task_name!r} has no answer_choices, so it cannot be rank-classified; use 'generate'")

  lengths = feature_lengths or {}
  inputs = pad_tokens([e["inputs"] for e in examples],
                      _padded_length(max(len(e["inputs"]) for e in examples), lengths.get("inputs")))
  longest_target = max(len(t) for e in examples for t in e.get("answer_choice_tokens", [e["targets"]]))
  target_length = _padded_length(longest_target, lengths.get("targets"))
  routing_ids = None if routing_ids_fn is None else np.asarray(routing_ids_fn(task_name, examples), np.int32)
  records = [{"input": e["inputs_pretokenized"], "target": e["targets_pretokenized"]} for e in examples]

  if mode == "rank":
    scores, token_counts = choice_log_likelihoods(
        model, params, inputs, [e["answer_choice_tokens"] for e in examples], batch_size=batch_size,
        target_length=target_length, routing_ids=routing_ids)
    chosen = rank_classify(scores, token_counts, length_normalize)
    predictions = [e["answer_choices"][c] for e, c in zip(examples, chosen)]
    for record, e, s, n, p in zip(records, examples, scores, token_counts, predictions):
      k = len(e["answer_choices"])
      record.update(prediction=p, choices=e["answer_choices"], scores=s[:k].tolist(), lengths=n[:k].tolist())
    if task.score_metric_fns:
      # t5's rank_classification format: ((example, choice), is_correct, weight, target length) per choice.
      rank_targets, flat_scores = [], []
      for i, e in enumerate(examples):
        correct = e.get("correct_choices", [e["targets_pretokenized"]])  # any of several right answers counts
        for j, choice in enumerate(e["answer_choices"]):
          n = int(token_counts[i, j])
          rank_targets.append(((i, j), choice in correct, 1.0, n))
          flat_scores.append(float(scores[i, j]) / n if length_normalize else float(scores[i, j]))
      metrics = _merge([fn(rank_targets, flat_scores) for fn in task.score_metric_fns])
    else:
      metrics = _merge([fn([e["targets_pretokenized"] for e in examples], predictions)
                        for fn in task.predict_metric_fns])
  else:
    vocab = task.output_features["targets"].vocabulary
    tokens = greedy_generate(model, params, inputs, target_length, routing_ids, batch_size)
    predictions = [vocab.decode(t.tolist()) for t in tokens]
    for record, p in zip(records, predictions):
      record["prediction"] = p
    targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True) for e in examples]
    predictions = [task.postprocess_fn(p, example=e, is_target=False) for e, p in zip(examples, predictions)]
    metrics = _merge([fn(targets, predictions) for fn in task.predict_metric_fns])
  return {"metrics": metrics, "predictions": records, "mode": mode}


def _mean_metrics(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """Per metric, the mean over the tasks that report it."""
  names = sorted({m for metrics in results.values() for m in metrics})
  return {m: float(np.mean([r[m] for r in results.values() if m in r])) for m in names}


def _markdown(results: Mapping[str, Mapping[str, float]], mean: Mapping[str, float]) -> str:
  names = list(mean)
  cell = lambda r, m: "" if m not in r or math.isnan(r[m]) else f"{r[m]:.2f}"
  rows = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  rows += [f"| {task} | " + " | ".join(cell(r, m) for m in names) + " |" for task, r in sorted(results.items())]
  rows.append(f"| **mean** ({len(results)} tasks) | " + " | ".join(cell(mean, m) for m in names) + " |")
  return "\n".join(rows) + "\n"


def write_results(results: Mapping[str, Mapping[str, float]], out_dir: str,
                  predictions: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
  """Write `results.json` ({'tasks': {task: metrics}, 'mean': metrics}), `results.md` (task x metric table with a
  mean row) and, for each task in `predictions`, `predictions/<task>.jsonl` (one evaluated example per line); each
  file atomically (`moe_jax.fs`), to a local folder or a URL such as gs://."""
  results = {task: {m: float(v) for m, v in metrics.items()} for task, metrics in results.items()}
  mean = _mean_metrics(results)
  fs.write_text(fs.join(out_dir, "results.json"),
                json.dumps({"tasks": results, "mean": mean}, indent=2, sort_keys=True) + "\n")
  fs.write_text(fs.join(out_dir, "results.md"), _markdown(results, mean))
  for task, records in (predictions or {}).items():
    fs.write_text(fs.join(out_dir, "predictions", f"{task}.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
