"""What the real-data task modules (P3, FLAN, BIG-bench) share: registration with our vocabulary, and metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import files
from moe_jax.data.vocab import run_vocabulary


def add_task(name: str, source: seqio.DataSource, metric_fns: Sequence[Callable[..., Any]],
             postprocess_fn: Callable[..., Any] | None = None) -> None:
  """(Re-)register a text-to-text Task whose source yields `inputs` and `targets` strings.

  Text is tokenized with the run's vocabulary (the backbone's, resolved when the data is read: see
  `moe_jax.data.vocab`), never with token ids a release may carry, so one data copy serves any model.
  """
  features = {k: seqio.Feature(run_vocabulary(), add_eos=True) for k in ("inputs", "targets")}
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, output_features=features, metric_fns=list(metric_fns),
                         postprocess_fn=postprocess_fn,
                         preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])


def stream_rows(paths: Sequence[str], convert: Callable[[str, int, Any], Mapping[str, Any]],
                signature: Mapping[str, tf.TensorSpec]) -> tf.data.Dataset:
  """Rows of parquet/JSON-lines/JSON files, in order, each passed through `convert(path, row, raw)` (which checks
  it, raising `files.MalformedRowError`) as a tf.data stream with `signature`."""

  def generate():
    for path in paths:
      for row, raw in enumerate(files.read_rows(path)):
        yield convert(path, row, raw)

  return tf.data.Dataset.from_generator(generate, output_signature=dict(signature))


def add_mixture(name: str, members: Sequence[str]) -> None:
  """(Re-)register a Mixture of registered tasks or mixtures, each at rate 1 (see the callers for why)."""
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(members), default_rate=1.0)


def references(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False) -> Any:
  """Postprocessor for generation with several acceptable answers: a target becomes the example's `references`
  (when it has them); a prediction is stripped of surrounding whitespace."""
  if is_target:
    return list(example["references"]) if example and example.get("references") else [output.strip()]
  return output.strip()


def exact_match_any(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal (after stripping) to any of their references."""
  hits = [p.strip() in {r.strip() for r in refs} for refs, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits))}


def rouge_first(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """t5's ROUGE (1, 2, Lsum) against each example's first reference."""
  from t5.evaluation import metrics

  return metrics.rouge([refs[0] for refs in targets], list(predictions))
