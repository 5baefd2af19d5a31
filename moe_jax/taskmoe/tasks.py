"""Task ids for the task-level MoE: every training example carries its task's id (a row of the task embedding
table), and every evaluated task has one.

CrossFit runs carry `task_ids` already (`tasks/crossfit.py`: the row of `id2task.json`, else the task's index in
the split file). Any other seqio task gets one through `with_task_ids`: a copy of the task registered as
`<task>_with_ids` that appends the constant id to each example after the task's own preprocessors, and a mixture of
those copies to train on. At evaluation, `task_id(name)` answers for a copy, its original task, a CrossFit run, or
a task named in the gin mapping `task_id_map.ids`; `routing_ids_fn` hands that id to `evaluate_task` for every
example of the task.

seqio (and with it TensorFlow) is imported inside the functions that register or read tasks only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np

from moe_jax import fs
from moe_jax.errors import ConfigError

SUFFIX = "_with_ids"
TASK_IDS = "task_ids"
ID2TASK, TASK_VECS = "id2task.json", "task_vecs.npy"  # the seed's task embedding files (Task2Vec.save_to_disk)
_IDS: dict[str, int] = {}  # task (original and `_with_ids` copy) -> id, of every `with_task_ids` registration


@gin.configurable
def task_id_map(ids: Mapping[str, int] | None = None) -> dict[str, int]:
  """Task ids given in gin (`task_id_map.ids = {'my_task': 0, ...}`), for tasks no registration gives one."""
  return {str(k): int(v) for k, v in (ids or {}).items()}


def _add_id(task_id: int):
  """A seqio preprocessor appending the constant `task_ids` feature (rank 0, int32) to every example."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def add(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(lambda ex: {**ex, TASK_IDS: tf.constant(task_id, tf.int32)})

  return add


@gin.configurable
def with_task_ids(tasks: Sequence[str] = gin.REQUIRED, name: str = "taskmoe_tasks",
                  ids: Mapping[str, int] | None = None) -> str:
  """Register `<task>_with_ids` for every task of `tasks` (mixtures expand to their tasks) and a mixture `name` of
  them, at rate 1 each; returns `name`, so gin can bind `train.mixture_or_task_name = @with_task_ids()`.

  A task's id is `ids[task]`, else its index in the expanded list (the order of EXPERT_TASKS for the demo, the
  row of task_vecs.npy that `moe_jax.taskmoe.embeddings` writes for the same list). The copy keeps the task's
  source, preprocessors, features, metrics and postprocessing, plus `task_ids`, so it trains and scores exactly as
  the task does."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_jax.data.pipeline import expand_tasks, get_provider  # pylint: disable=g-import-not-at-top

  names = expand_tasks(tasks)
  if not names:
    raise ConfigError("with_task_ids: no tasks given")
  given = {str(k): int(v) for k, v in (ids or {}).items()}
  missing = [t for t in names if given and t not in given]
  if missing:
    raise ConfigError(f"with_task_ids.ids gives no id for {missing[:5]}")
  from moe_jax.data.vocab import run_vocabulary  # pylint: disable=g-import-not-at-top

  # The id is appended after the task's tokenisation, so this feature's vocabulary never encodes or decodes
  # anything; it is the run's so that `vocab.check_tasks` (which checks every feature's vocabulary) accepts it.
  id_feature = seqio.Feature(run_vocabulary(), add_eos=False, dtype=tf.int32, rank=0)
  copies = []
  for index, task_name in enumerate(names):
    task = get_provider(task_name)
    task_id = given.get(task_name, index)
    if TASK_IDS in task.output_features:
      raise ConfigError(f"{task_name} carries task_ids already (a CrossFit run?): train on it as it is")
    copy = f"{task_name}{SUFFIX}"
    seqio.TaskRegistry.remove(copy)
    seqio.TaskRegistry.add(copy, source=task.source, output_features={**task.output_features, TASK_IDS: id_feature},
                           preprocessors=[*task.preprocessors, _add_id(task_id)],
                           postprocess_fn=task.postprocessor, metric_fns=list(task.metric_fns),
                           shuffle_buffer_size=task.shuffle_buffer_size)
    _IDS[task_name] = _IDS[copy] = task_id
    copies.append(copy)
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, copies, default_rate=1.0)
  return name


def known_ids(mixture_or_task: str) -> dict[str, int]:
  """{task: id} of the `with_task_ids` copies in a mixture (and of their original tasks), for a checkpoint to
  record: an evaluation in another process then routes those tasks by the same ids (`remember`)."""
  from moe_jax.data.pipeline import expand_tasks  # pylint: disable=g-import-not-at-top  (seqio)

  out = {}
  for name in expand_tasks([mixture_or_task]):
    if name in _IDS:
      out[name] = _IDS[name]
      if name.endswith(SUFFIX):
        out[name[:-len(SUFFIX)]] = _IDS[name]
  return out


def remember(ids: Mapping[str, int]) -> None:
  """Route these tasks by these ids from now on (a checkpoint's record of `known_ids`); an id that contradicts
  one this process registered is an error."""
  for name, value in ids.items():
    if _IDS.get(name, int(value)) != int(value):
      raise ConfigError(f"task {name!r} has id {_IDS[name]} here but {value} in the checkpoint's record")
    _IDS[name] = int(value)


def task_id(task_name: str) -> int:
  """The id a task's examples are routed by: a `with_task_ids` registration's, the gin mapping's, or a CrossFit
  run's (`tasks.crossfit.run_of`); one error line otherwise."""
  if task_name in _IDS:
    return _IDS[task_name]
  mapped = task_id_map()
  if task_name in mapped:
    return mapped[task_name]
  if task_name.startswith("crossfit_"):
    from tasks import crossfit  # pylint: disable=g-import-not-at-top  (seqio)

    return crossfit.run_of(task_name).task_id
  raise ConfigError(f"task {task_name!r} has no task id: register it with moe_jax.taskmoe.tasks.with_task_ids, or "
                    "map it in gin (task_id_map.ids = {'<task>': <id>})")


def routing_ids_fn(task_name: str, examples: Sequence[Mapping[str, Any]]) -> list[int]:
  """`evaluate_task`'s routing_ids_fn for a TaskMoE: every example of the task gets the task's id."""
  return [task_id(task_name)] * len(examples)


def write_task_vecs(directory: str, names: Sequence[str], vectors: np.ndarray) -> None:
  """`task_vecs.npy` [num_tasks, dim] float32 and `id2task.json` {"<row>": "<task>"}, the seed's files
  (modules/task2vec.py), each written atomically."""
  vectors = np.asarray(vectors, np.float32)
  if vectors.ndim != 2 or len(vectors) != len(names):
    raise ConfigError(f"task vectors are {vectors.shape}; expected [{len(names)} tasks, dim]")
  import io  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  np.save(buffer, vectors)
  fs.write_bytes(fs.join(directory, TASK_VECS), buffer.getvalue())
  fs.write_text(fs.join(directory, ID2TASK), json.dumps({str(i): t for i, t in enumerate(names)}) + "\n")


def read_task_vecs(directory: str) -> tuple[list[str], np.ndarray]:
  """(task of each row, vectors) of a `write_task_vecs` directory (or the seed's)."""
  raw = json.loads(fs.read_text(fs.join(directory, ID2TASK)))
  import io  # pylint: disable=g-import-not-at-top

  vectors = np.load(io.BytesIO(fs.read_bytes(fs.join(directory, TASK_VECS))))
  names = [raw[str(i)] for i in range(len(raw))]
  if len(names) != len(vectors):
    raise ConfigError(f"{directory}: {len(names)} tasks in {ID2TASK} but {len(vectors)} rows in {TASK_VECS}")
  return names, vectors
