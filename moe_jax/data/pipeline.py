"""Training batches and evaluation examples from registered seqio Tasks and Mixtures.

Tasks are registered by importing the module that defines them (`import tasks` for the built-in synthetic ones)
before any name is looked up here. A data directory (TFDS data and seqio caches) is gin-configurable through the
`data_dir` arguments, e.g. `DATA_DIR = '/data'` with `train_batches.data_dir = %DATA_DIR`.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf


class _QuietInMemorySources(logging.Filter):
  """seqio warns on every uncached FunctionDataSource; ours are generated in memory, deterministically."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietInMemorySources())


def get_provider(name: str) -> seqio.Task | seqio.Mixture:
  """The registered Task or Mixture called `name`; otherwise one error naming close matches and the likely fix."""
  tasks, mixtures = set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names())
  if name in tasks or name in mixtures:
    return seqio.get_mixture_or_task(name)
  close = difflib.get_close_matches(name, sorted(tasks | mixtures), n=5, cutoff=0.6)
  hint = f" Close names: {', '.join(close)}." if close else ""
  raise ValueError(
      f"No seqio Task or Mixture named {name!r} ({len(tasks)} tasks and {len(mixtures)} mixtures registered).{hint}"
      " Tasks are registered by importing the module that defines them: `import tasks` for the built-in synthetic"
      " tasks, or add that module to the gin imports.")


def _use_data_dir(data_dir: str | None) -> None:
  """Point TFDS and seqio's caches at `data_dir`, failing clearly if it does not exist."""
  if data_dir is None:
    return
  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"Data directory {data_dir!r} does not exist (set by the DATA_DIR gin macro or a "
                            "`data_dir` argument); the built-in synthetic tasks need none: leave it unset")
  seqio.set_tfds_data_dir_override(data_dir)
  seqio.add_global_cache_dirs([data_dir])


@gin.configurable
def train_batches(mixture_or_task: str, feature_lengths: Mapping[str, int], batch_size: int, seed: int = 42,
                  start_batch: int = 0, shard_index: int = 0, num_shards: int = 1, pack: bool = False,
                  data_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of the train split: shuffled with `seed`, repeated, batched, as NumPy int32 arrays.

  Keys: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, each
  [batch_size, length] with lengths from `feature_lengths` ({'inputs': Li, 'targets': Lt}); packing adds
  encoder/decoder_segment_ids and encoder/decoder_positions. `batch_size` is this shard's batch (one shard per
  host); the shards see disjoint examples. The order is a pure function of the arguments, so a run resumed with
  `start_batch` = the number of batches it consumed gets exactly the batches the uninterrupted run would have.
  Skipping replays the input pipeline (no model work), which takes time in proportion to `start_batch`.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
  _use_data_dir(data_dir)
  ds = seqio.get_dataset(
      get_provider(mixture_or_task),
      task_feature_lengths=dict(feature_lengths),
      feature_converter=seqio.EncDecFeatureConverter(pack=pack),
      dataset_split="train",
      shuffle=True,
      num_epochs=None,
      shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
      seed=seed,
      batch_size=batch_size,
      verbose=False)
  return ds.skip(start_batch).as_numpy_iterator()


def _with_eos(tokens: list[int], eos_id: int, max_length: int | None) -> np.ndarray:
  """Truncate then append EOS, as seqio's `append_eos_after_trim` does to targets."""
  if max_length is not None:
    tokens = tokens[:max_length - 1]
  return np.asarray(tokens + [eos_id], np.int32)


@gin.configurable
def eval_examples(task_name: str, split: str = "validation", feature_lengths: Mapping[str, int] | None = None,
                  max_examples: int | None = None, data_dir: str | None = None) -> list[dict[str, Any]]:
  """A task's examples in order, tokenized and truncated as for training (EOS kept), not padded.

  Each example has `inputs` and `targets` (int32, ending in EOS), `inputs_pretokenized` and `targets_pretokenized`
  (str) and, when the task provides `answer_choices`, those strings and `answer_choice_tokens` (one int32 array per
  choice, tokenized like `targets`). `feature_lengths=None` truncates nothing.
  """
  _use_data_dir(data_dir)
  task = get_provider(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f"{task_name!r} is a Mixture; evaluate its tasks one by one: {[t.name for t in task.tasks]}")
  if split not in task.splits:
    raise ValueError(f"Task {task_name!r} has no split {split!r}; it has {tuple(task.splits)}")
  ds = task.get_dataset(sequence_length=None if feature_lengths is None else dict(feature_lengths), split=split,
                        shuffle=False, num_epochs=1)
  if max_examples is not None:
    ds = ds.take(max_examples)
  vocab = task.output_features["targets"].vocabulary
  max_target = None if feature_lengths is None else feature_lengths["targets"]
  examples = []
  for ex in ds.as_numpy_iterator():
    example = {
        "inputs": ex["inputs"].astype(np.int32),
        "targets": ex["targets"].astype(np.int32),
        "inputs_pretokenized": ex["inputs_pretokenized"].decode("utf-8"),
        "targets_pretokenized": ex["targets_pretokenized"].decode("utf-8"),
    }
    if "answer_choices" in ex:
      choices = [c.decode("utf-8") for c in ex["answer_choices"]]
      example["answer_choices"] = choices
      example["answer_choice_tokens"] = [_with_eos(list(vocab.encode(c)), vocab.eos_id, max_target)
                                         for c in choices]
    examples.append(example)
  return examples
