"""Training batches and evaluation examples from registered seqio Tasks and Mixtures.

Tasks are registered by importing the module that defines them (`import tasks`) before any name is looked up
here. Sources whose tasks depend on files under the data root (P3's templates) register a *lazy registrar*: the
first lookup of a name it claims registers its tasks from `files.data_root()` (the DATA_DIR gin macro), which
gin has bound by then. A source's row checks (`row_check`) raise inside tf.data; the iterators here turn them into
one `MalformedRowError` naming the file and row.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import files
from moe_jax.errors import ConfigError, MissingFileError


class _QuietInMemorySources(logging.Filter):
  """seqio warns on every uncached FunctionDataSource; ours are generated in memory, deterministically."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietInMemorySources())


# Called with every name looked up, before the registries are read: a registrar whose names depend on the data root
# (re-)registers them there, so a name registered under another root is never served stale. Returns True if it
# registered that name.
LAZY_REGISTRARS: list[Callable[[str], bool]] = []
_BAD_ROW = ("<<moe_jax bad row: ", " >>")


def row_check(ok: tf.Tensor, path: tf.Tensor, row: tf.Tensor, problem: str) -> tf.Operation:
  """A tf.data assertion that, when it fails, surfaces from `train_batches`/`eval_examples` as
  `MalformedRowError(path, row, problem)` rather than a TensorFlow stack trace."""
  message = tf.strings.join([_BAD_ROW[0], path, "|", tf.strings.as_string(row), "|", problem, _BAD_ROW[1]])
  return tf.debugging.Assert(ok, [message])


def readable(iterator: Iterable[Any]) -> Iterator[Any]:
  """Re-raise `row_check` failures (and errors a source raised in Python) as the `files` errors they are."""
  pattern = re.escape(_BAD_ROW[0]) + r"(.*?)\|(\d+)\|(.*?)" + re.escape(_BAD_ROW[1])
  try:
    yield from iterator
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    found = re.search(pattern, str(e), re.S)
    if found:
      raise files.MalformedRowError(found[1], int(found[2]), found[3].replace("\\'", "'")) from None
    python_error = re.search(r"MalformedRowError: (.*), row (\d+): (.*?)(?:\n|$)", str(e))  # from a generator
    if python_error:
      raise files.MalformedRowError(python_error[1], int(python_error[2]), python_error[3]) from None
    raise


def get_provider(name: str) -> seqio.Task | seqio.Mixture:
  """The registered Task or Mixture called `name`; otherwise one error naming close matches and the likely fix."""
  claimed = [registrar(name) for registrar in LAZY_REGISTRARS]  # every one runs: each refreshes its own names
  tasks, mixtures = set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names())
  if name in tasks or name in mixtures or any(claimed):
    return seqio.get_mixture_or_task(name)
  close = difflib.get_close_matches(name, sorted(tasks | mixtures), n=5, cutoff=0.6)
  hint = f" Close names: {', '.join(close)}." if close else ""
  raise ConfigError(
      f"No seqio Task or Mixture named {name!r} ({len(tasks)} tasks and {len(mixtures)} mixtures registered).{hint}"
      " Tasks are registered by importing the module that defines them: `import tasks` for the built-in synthetic"
      " tasks, or add that module to the gin imports.")


def expand_tasks(names: Iterable[str]) -> list[str]:
  """Task names, with each mixture replaced by its tasks (in registration order), without duplicates."""
  out: list[str] = []
  for name in names:
    provider = get_provider(name)
    out.extend(t.name for t in getattr(provider, "tasks", [provider]))
  return list(dict.fromkeys(out))


def _use_data_root() -> None:
  """Point TFDS and seqio's caches at the data root, failing clearly if it is set but does not exist."""
  root = files.data_root()
  if root is None:
    return
  if not files.isdir(root):
    raise MissingFileError(f"Data directory {root!r} does not exist (set by the DATA_DIR gin macro or "
                           f"${files.ENV_VAR}); the built-in synthetic tasks need none: leave it unset")
  seqio.set_tfds_data_dir_override(root)
  seqio.add_global_cache_dirs([root])


TASK_IDS = "task_ids"  # a rank-0 int32 feature of tasks that carry their task's id (CrossFit; moe_jax.taskmoe.tasks)


class EncDecWithTaskIds(seqio.EncDecFeatureConverter):
  """seqio's EncDec features plus the example's `task_ids` (rank 0, so [batch] once batched) when the tasks carry
  one, for the task-level MoE, which routes each example by its task. seqio's converter drops every feature it
  does not know; this one passes `task_ids` on, unpacked only: a packed row would hold examples of several tasks
  (with `pack=True` the ids are dropped, as before, and the task-level MoE's stages refuse packing)."""

  MODEL_FEATURES = {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
                    TASK_IDS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)}

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    if TASK_IDS not in ds.element_spec or self.pack:
      return seqio.EncDecFeatureConverter(pack=self.pack)(ds, task_feature_lengths)
    return super().__call__(ds, task_feature_lengths)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    return {**super()._convert_example(features), TASK_IDS: tf.cast(features[TASK_IDS], tf.int32)}

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    return {**super().get_model_feature_lengths(task_feature_lengths), TASK_IDS: 1}  # rank 0: no length checked


def feature_converter(decoder_only: bool, pack: bool) -> seqio.FeatureConverter:
  """An encoder-decoder reads seqio's EncDec features (plus `task_ids` when the tasks carry them, unpacked:
  `EncDecWithTaskIds`). A decoder-only model reads PrefixLM features: "input target" as one sequence
  (decoder_input_tokens: it shifted right after the start token 0; decoder_target_tokens: it), loss on the target
  tokens only, unpacked (our causal LMs have no segment-aware attention, and they attend causally over the input
  too)."""
  if decoder_only:
    return seqio.PrefixLMFeatureConverter(loss_on_targets_only=True, pack=False)
  return EncDecWithTaskIds(pack=pack)


@gin.configurable
def train_batches(mixture_or_task: str, feature_lengths: Mapping[str, int], batch_size: int, seed: int = 42,
                  start_batch: int = 0, shard_index: int = 0, num_shards: int = 1,
                  pack: bool = False, decoder_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of the train split: shuffled with `seed`, repeated, batched, as NumPy int32 arrays.

  Keys: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, each
  [batch_size, length] with lengths from `feature_lengths` ({'inputs': Li, 'targets': Lt}); packing adds
  encoder/decoder_segment_ids and encoder/decoder_positions; tasks with a `task_ids` feature (CrossFit, the
  task-level MoE's tasks) add `task_ids` [batch_size] when unpacked. `batch_size` is this shard's batch (one shard per
  host); the shards see disjoint examples. The order is a pure function of the arguments, so a run resumed with
  `start_batch` = the number of batches it consumed gets exactly the batches the uninterrupted run would have.
  Skipping replays the input pipeline (no model work), which takes time in proportion to `start_batch`.
  `decoder_only`: batches for a causal LM instead (`feature_converter`).
  """
  if not 0 <= shard_index < num_shards:
    raise ConfigError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
  _use_data_root()
  ds = seqio.get_dataset(
      get_provider(mixture_or_task),
      task_feature_lengths=dict(feature_lengths),
      feature_converter=feature_converter(decoder_only, pack),
      dataset_split="train",
      shuffle=True,
      num_epochs=None,
      shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
      seed=seed,
      batch_size=batch_size,
      verbose=False)
  return readable(ds.skip(start_batch).as_numpy_iterator())


def _with_eos(tokens: list[int], eos_id: int, max_length: int | None) -> np.ndarray:
  """Truncate then append EOS, as seqio's `append_eos_after_trim` does to targets."""
  if max_length is not None:
    tokens = tokens[:max_length - 1]
  return np.asarray(tokens + [eos_id], np.int32)


# Per-example fields a source may add for evaluation: strings or lists of strings, decoded and passed through.
EXTRA_FIELDS = ("correct_choices", "references", "source")


@gin.configurable
def eval_examples(task_name: str, split: str = "validation", feature_lengths: Mapping[str, int] | None = None,
                  max_examples: int | None = None) -> list[dict[str, Any]]:
  """A task's examples in order, tokenized and truncated as for training (EOS kept), not padded.

  Each example has `inputs` and `targets` (int32, ending in EOS), `inputs_pretokenized` and `targets_pretokenized`
  (str) and, when the task provides `answer_choices`, those strings and `answer_choice_tokens` (one int32 array per
  choice, tokenized like `targets`). `correct_choices` (rank classification with several right answers) and
  `references` (generation with several acceptable answers) pass through when the source gives them.
  `feature_lengths=None` truncates nothing.
  """
  _use_data_root()
  task = get_provider(task_name)
  if not isinstance(task, seqio.Task):
    raise ConfigError(f"{task_name!r} is a Mixture; evaluate its tasks one by one: {[t.name for t in task.tasks]}")
  if split not in task.splits:
    raise ConfigError(f"Task {task_name!r} has no split {split!r}; it has {tuple(task.splits)}")
  ds = task.get_dataset(sequence_length=None if feature_lengths is None else dict(feature_lengths), split=split,
                        shuffle=False, num_epochs=1)
  if max_examples is not None:
    ds = ds.take(max_examples)
  vocab = task.output_features["targets"].vocabulary
  max_target = None if feature_lengths is None else feature_lengths["targets"]
  decode = lambda b: b.decode("utf-8")
  examples = []
  for ex in readable(ds.as_numpy_iterator()):
    example = {
        "inputs": ex["inputs"].astype(np.int32),
        "targets": ex["targets"].astype(np.int32),
        "inputs_pretokenized": decode(ex["inputs_pretokenized"]),
        "targets_pretokenized": decode(ex["targets_pretokenized"]),
    }
    if "answer_choices" in ex:
      choices = [decode(c) for c in ex["answer_choices"]]
      example["answer_choices"] = choices
      example["answer_choice_tokens"] = [_with_eos(list(vocab.encode(c)), vocab.eos_id, max_target)
                                         for c in choices]
    for field in EXTRA_FIELDS:
      if field in ex:
        value = ex[field]
        example[field] = decode(value) if isinstance(value, bytes) else [decode(v) for v in value]
    examples.append(example)
  return examples


def mixture_examples(name: str, split: str, feature_lengths: Mapping[str, int] | None, max_examples: int | None
                     ) -> list[dict[str, Any]]:
  """Examples of a task, or of a mixture: its tasks' first examples in equal shares (a P3 dataset's templates,
  say), as `eval_examples` gives them; up to `max_examples` in all (None: every example of every task)."""
  provider = get_provider(name)
  members = [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [name]
  share = None if max_examples is None else -(-max_examples // len(members))
  examples = [e for task in members for e in eval_examples(task, split, feature_lengths, share)]
  return examples[:max_examples]


def validation_batches(mixture_or_task: str, feature_lengths: Mapping[str, int], batch_size: int, num_batches: int,
                       shard_index: int = 0, num_shards: int = 1,
                       decoder_only: bool = False) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of this shard of the validation split, in a fixed order (no shuffling), as
  training batches are shaped. A short last batch is padded with all-zero rows, which carry no loss weight.

  Under several processes (`jax.process_count() > 1`) every process returns the same number of batches: the
  shards of a split may differ in size (shard i holds examples i, i + num_shards, ...), and the validation loss is
  one jitted computation over the global mesh, which every process must run equally often or it waits forever.
  The processes agree on the largest local count and the shorter ones append all-zero batches (no loss weight, so
  the loss is unchanged); an empty split raises on every process together, a split empty on one shard only does
  not. Evaluation (`moe_jax.evaluation`) needs no such agreement: every process reads all of a task's examples in
  the same order, so its batch counts are equal by construction.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  _use_data_root()
  provider = get_provider(mixture_or_task)
  tasks = getattr(provider, "tasks", [provider])
  missing = [t.name for t in tasks if "validation" not in t.splits]
  if missing:
    raise ConfigError(f"{mixture_or_task}: no 'validation' split in {missing}; validation needs one "
                      "(or set train.validate_every = 0)")
  ds = seqio.get_dataset(provider, task_feature_lengths=dict(feature_lengths),
                         feature_converter=feature_converter(decoder_only, False), dataset_split="validation",
                         shuffle=False, num_epochs=1, seed=0, verbose=False,
                         shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None)
  ds = ds.batch(batch_size)  # keeps the short last batch (seqio's own batching drops it), padded below
  batches = list(readable(ds.take(num_batches).as_numpy_iterator()))
  count = len(batches)
  if jax.process_count() > 1:  # the largest local count, the same on every process
    count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
  if not count:
    raise ConfigError(f"{mixture_or_task}: the validation split is empty")
  pad = lambda x: np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
  zeros = {k: np.zeros((batch_size, *spec.shape[1:]), spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  return [{k: pad(v) for k, v in b.items()} for b in batches] + [dict(zeros) for _ in range(count - len(batches))]
