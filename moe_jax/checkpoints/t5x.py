"""Load T5X checkpoints (T5.1.1, T5 LM-adapted, FLAN-T5 as released under gs://t5-data/pretrained_models/t5x/) into
our parameter tree, and write our tree as one.

Our parameter names are T5X's (`t5x/examples/t5/network.py`: `token_embedder/embedding`,
`encoder/relpos_bias/rel_embedding` [heads, buckets], 2-D attention kernels [embed, heads*kv] and [heads*kv, embed],
`decoder/logits_dense/kernel` only when the head is untied), so the T5X `target` tree maps onto ours one to one;
only the storage differs. Two layouts of a `checkpoint_<step>/` directory are read:

- legacy (`t5x.checkpoints.Checkpointer`, which wrote the public checkpoints): a msgpack file `checkpoint` holding
  `{"version": 3, "optimizer": {"target": params, "state": {"step", "param_states"}}}` in which every partitioned
  array is replaced by the JSON of its tensorstore spec (`{"driver": "zarr", "dtype", "kvstore": {"driver": "file"
  or "gcs", "path": "target.encoder.layers_0.attention.key.kernel"}, "metadata": {"shape", "chunks",
  "compressor": {"id": "gzip"}}}`, the path relative to the checkpoint directory, or at the spec's top level in
  tensorstore < 0.1.14 specs) and unpartitioned ones are inline msgpack arrays; each spec names a zarr v2 array
  directory beside the file (`.zarray` + gzip chunks; bfloat16 as tensorstore's native "bfloat16" zarr dtype since
  version 3; version 2 stored it as uint16, which t5x itself no longer reads).
- orbax (`t5x.checkpoints.OrbaxCheckpointManager`): a PyTree checkpoint of the same state dict (no "version" /
  "optimizer" wrapper) in `checkpoint_<step>/state/` (`_METADATA`, ocdbt).

Only `target` is read: optimizer slots (Adafactor `v_row`/`v_col`/`v`/`m` under `state.param_states`) and the step
are skipped unread. Every array goes through tensorstore with a kvstore spec built from the checkpoint path (a local
folder, or `gs://bucket/dir` through tensorstore's gcs driver), so local and GCS checkpoints take the same code path.
Names and shapes are checked against `Transformer(config).init` from the msgpack (or orbax metadata) before any
array is read, with `load_hf_t5`'s messages.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
from typing import Any

import ml_dtypes  # bfloat16 in NumPy: the dtype tensorstore reads bf16 zarr arrays as
import numpy as np
import tensorstore as ts
from flax import serialization

from moe_jax.checkpoints.hf import Params, expected_shapes, name_map
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models.config import T5Config

CHECKPOINT_FILE = "checkpoint"  # the msgpack state dict in a legacy `checkpoint_<step>/` directory
ORBAX_METADATA = "_METADATA"  # marks an orbax PyTree checkpoint (t5x.checkpoint_utils.detect_checkpoint_type)
ORBAX_STATE_DIR = "state"  # t5x's orbax manager keeps the train state in `checkpoint_<step>/state/`
VERSION = 3  # t5x.checkpoints.VERSION: bfloat16 stored natively by tensorstore, not as uint16
TARGET = "target"
# t5x writes gs:// specs with a placeholder bucket and substitutes the real one when it reads them (portability).
_DUMMY_BUCKET = "t5x-dummy-bucket"
_CHUNK_BYTES = 64 * 2**20  # t5x's desired chunk size: whole arrays for all but the largest T5 parameters
_SHOWN = 8  # names listed in a missing/unexpected message

_Key = tuple[str, ...]


# ---- where arrays live: a kvstore spec per directory, local or gs:// ----


def _kvstore(path: str) -> dict[str, Any]:
  """The tensorstore kvstore spec of a directory (a trailing "/" makes it a prefix): `gs://bucket/dir` -> gcs,
  anything else -> a local folder."""
  match = re.fullmatch(r"gs://([^/]+)/*(.*?)/*", path)
  if match:
    return {"driver": "gcs", "bucket": match[1], "path": match[2] + "/" if match[2] else ""}
  return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _child(kvstore: dict[str, Any], relative: str) -> dict[str, Any]:
  """The kvstore spec of a directory under `kvstore` (an absolute `relative` wins, as in t5x's os.path.join)."""
  return kvstore | {"path": posixpath.join(kvstore["path"], relative.rstrip("/")) + "/"}


def _read_file(kvstore: dict[str, Any], key: str) -> bytes | None:
  """A small file's bytes, or None when it is absent."""
  result = ts.KvStore.open(kvstore).result().read(key).result()
  return result.value if result.state == "value" else None


def _has(kvstore: dict[str, Any], key: str) -> bool:
  return _read_file(kvstore, key) is not None


def _step_dirs(kvstore: dict[str, Any]) -> list[str]:
  """`checkpoint_<step>` directories under a model directory (for the hint when a step directory was not given)."""
  keys = ts.KvStore.open(kvstore).result().list().result()
  found = {m[1] for k in keys if (m := re.fullmatch(rf"(checkpoint_\d+)/({CHECKPOINT_FILE}|{ORBAX_STATE_DIR}/"
                                                     rf"{ORBAX_METADATA})", k.decode(errors="replace")))}
  return sorted(found, key=lambda name: int(name.split("_")[1]))


# ---- the state dict ----


def _is_spec(node: Any) -> bool:
  """Whether a msgpack node is a tensorstore spec standing for an array (t5x's `_is_leaf` test), not a subtree."""
  return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


def _flatten(tree: Any, prefix: _Key = ()) -> dict[_Key, Any]:
  """Leaves of a nested dict by key path; tensorstore specs count as leaves."""
  if not isinstance(tree, dict) or _is_spec(tree):
    return {prefix: tree}
  out: dict[_Key, Any] = {}
  for key, value in tree.items():
    out.update(_flatten(value, prefix + (str(key),)))
  return out


def _state_dict(contents: dict[str, Any], source: str) -> dict[str, Any]:
  """The train state dict ({"target", "state", ...}): under "optimizer" since version 2, the whole file before."""
  if not isinstance(contents, dict):
    raise MismatchError(f"{source} is not a T5X state dict (a msgpack map); is it a T5X checkpoint?")
  if contents.get("version", 0) == 1:
    raise MismatchError(f"{source}: T5X checkpoint version 1 is not supported (t5x itself reads only 0 and >= 2)")
  state = contents["optimizer"] if "optimizer" in contents else contents
  if not isinstance(state, dict) or not isinstance(state.get(TARGET), dict):
    found = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise MismatchError(f"{source} holds no `optimizer/target` parameter tree (found {found}); "
                        "is it a T5X checkpoint?")
  return state


def _spec_path(spec: dict[str, Any]) -> str:
  """The array's directory relative to the checkpoint: kvstore.path, or the pre-0.1.14 top-level path."""
  path = spec.get("kvstore", {}).get("path") or spec.get("path")
  if not path:
    raise MismatchError(f"tensorstore spec without a path in the T5X checkpoint: {spec}")
  return path


def _leaf_shape(leaf: Any) -> tuple[int, ...] | None:
  """A stored parameter's shape without reading it: inline array, or the spec's metadata (None if it has none)."""
  if _is_spec(leaf):
    shape = leaf.get("metadata", {}).get("shape")
    return None if shape is None else tuple(int(d) for d in shape)
  return tuple(np.shape(leaf))


# ---- checks, shared by both layouts ----


def _model_order(config: T5Config) -> dict[_Key, tuple[int, ...]]:
  """Our parameters and shapes in model order (embedding, encoder, decoder), so "first mismatch" reads naturally."""
  expected, names = expected_shapes(config), name_map(config)
  order = [k for k in names if k in expected] + [k for k in expected if k not in names]
  return {k: expected[k] for k in order}


def _hint(names: list[_Key], head_missing: bool) -> str:
  if ("decoder", "logits_dense", "kernel") not in names:
    return ""
  if head_missing:
    return ("; T5 1.0 checkpoints have no separate head: set T5Config.tie_word_embeddings = True for them")
  return ("; T5.1.1, LM-adapted and FLAN-T5 checkpoints have a separate head: set "
          "T5Config.tie_word_embeddings = False for them")


def _shown(names: list[_Key]) -> str:
  listed = ["/".join(k) for k in names[:_SHOWN]]
  return f"{listed}{' ...' if len(names) > _SHOWN else ''}"


def _check(found: dict[_Key, tuple[int, ...] | None], config: T5Config, source: str,
           expected: dict[_Key, tuple[int, ...]]) -> None:
  """Raise MismatchError for the first parameter whose shape differs from `config`'s, then for missing, then for
  unexpected parameters (the order and wording of `load_hf_t5`). A None shape is checked after reading."""
  for key, shape in expected.items():
    if key in found and found[key] is not None and found[key] != shape:
      raise MismatchError(
          f"parameter {'/'.join(key)}: expected shape {shape} for {config.name}, found {found[key]} "
          f"(T5X array {'.'.join((TARGET,) + key)}); is the checkpoint for another model size?")
  missing = [k for k in expected if k not in found]
  if missing:
    raise MismatchError(f"{len(missing)} parameter(s) missing from the T5X checkpoint in {source}: "
                        f"{_shown(missing)}{_hint(missing, True)}")
  unexpected = sorted(k for k in found if k not in expected)
  if unexpected:
    raise MismatchError(f"{len(unexpected)} unexpected parameter(s) in the T5X checkpoint in {source} for "
                        f"{config.name}: {_shown(unexpected)}{_hint(unexpected, False)}")


def _nest(flat: dict[_Key, np.ndarray]) -> Params:
  params: Params = {}
  for key, array in flat.items():
    node = params
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = array
  return params


# ---- the two layouts ----


def _open_arrays(directory: dict[str, Any], leaves: dict[_Key, Any], source: str) -> dict[_Key, Any]:
  """Open (metadata only) the zarr array of every spec leaf, concurrently; inline arrays pass through."""
  futures = {key: ts.open({"driver": "zarr", "kvstore": _child(directory, _spec_path(leaf))}, open=True, read=True)
             for key, leaf in leaves.items() if _is_spec(leaf)}
  opened: dict[_Key, Any] = {}
  for key, leaf in leaves.items():
    if key not in futures:
      opened[key] = np.asarray(leaf)
      continue
    try:
      opened[key] = futures[key].result()
    except ValueError as e:
      if "NOT_FOUND" not in str(e):
        raise
      raise MissingFileError(f"T5X checkpoint {source}: no zarr array {_spec_path(leaf).rstrip('/')}/.zarray for "
                             f"parameter {'/'.join(key)}, which its `{CHECKPOINT_FILE}` file lists; the copy is "
                             "incomplete") from None
    if opened[key].dtype == ts.uint16:  # t5x refuses these too (`_read_ts`)
      raise MismatchError(f"T5X checkpoint {source}: {'/'.join(key)} is stored as uint16 (version-2 bfloat16); "
                          "re-save it with a current t5x, which stores bfloat16 natively")
  return opened


def _load_legacy(directory: dict[str, Any], blob: bytes, source: str, config: T5Config,
                 expected: dict[_Key, tuple[int, ...]]) -> dict[_Key, np.ndarray]:
  """Target arrays of a legacy checkpoint whose msgpack `checkpoint` file is `blob`."""
  try:
    contents = serialization.msgpack_restore(blob)
  except Exception as e:  # msgpack raises several unrelated types for a file that is not msgpack
    raise MismatchError(f"{source}/{CHECKPOINT_FILE} is not a msgpack file ({type(e).__name__}: {e}); is it a T5X "
                        "checkpoint (a TensorFlow one holds `model_checkpoint_path` and is not supported)?") from None
  leaves = _flatten(_state_dict(contents, f"{source}/{CHECKPOINT_FILE}")[TARGET])
  _check({k: _leaf_shape(v) for k, v in leaves.items()}, config, source, expected)
  opened = _open_arrays(directory, leaves, source)
  for key, array in opened.items():
    if tuple(array.shape) != expected[key]:  # a spec without metadata, or one its .zarray contradicts
      raise MismatchError(f"parameter {'/'.join(key)}: expected shape {expected[key]} for {config.name}, found "
                          f"{tuple(array.shape)} (T5X array {'.'.join((TARGET,) + key)}); is the checkpoint for "
                          "another model size?")
  reads = {key: array.read() for key, array in opened.items() if not isinstance(array, np.ndarray)}
  return {key: reads[key].result() if key in reads else array for key, array in opened.items()}


def _load_orbax(path: str, source: str, config: T5Config,
                expected: dict[_Key, tuple[int, ...]]) -> dict[_Key, np.ndarray]:
  """Restore only `target` (as host NumPy) from an orbax PyTree checkpoint of a T5X train state."""
  import jax
  import orbax.checkpoint as ocp  # imported here: it costs seconds and most T5X checkpoints are legacy

  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)  # a StepMetadata in orbax >= 0.11
  tree = getattr(metadata, "tree", metadata)
  state = _state_dict(dict(tree), source)
  leaves = _flatten(dict(state[TARGET]))
  _check({k: tuple(v.shape) for k, v in leaves.items()}, config, source, expected)
  item = {TARGET: _nest(leaves)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                     partial_restore=True))
  return _flatten(restored[TARGET])


def is_t5x_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` is a T5X `checkpoint_<step>/` directory (legacy `checkpoint` msgpack, or t5x's orbax layout
  with the state in `state/`); our own orbax backbones (`params/`, `metadata/`) are not."""
  directory = _kvstore(os.fspath(path))
  return _has(directory, CHECKPOINT_FILE) or _has(directory, f"{ORBAX_STATE_DIR}/{ORBAX_METADATA}")


def load_t5x(path: str | os.PathLike, config: T5Config, params_dtype: str | np.dtype | None = None) -> Params:
  """Parameters of a T5X checkpoint directory `checkpoint_<step>/` (legacy msgpack + zarr, or orbax), in our tree.

  Returns what `load_hf_t5` returns: the `params` collection as a nested dict of host NumPy arrays laid out as
  `Transformer(config).init` makes them, cast to `params_dtype` (default `config.param_dtype`). T5X checkpoints carry
  no config, so `config` (the gin model) is required. `path` may also be the `checkpoint` file itself, or
  `gs://bucket/.../checkpoint_<step>` (tensorstore's gcs driver).

  Raises MissingFileError when the directory, its `checkpoint` file or a listed array is absent, and MismatchError
  naming the first parameter whose shape differs from `config`'s, or the missing or unexpected parameters.
  """
  path = os.fspath(path)
  remote = path.startswith("gs://")
  if posixpath.basename(path.rstrip("/")) == CHECKPOINT_FILE and (remote or os.path.isfile(path)):
    path = posixpath.dirname(path.rstrip("/")) if remote else os.path.dirname(os.path.abspath(path))
  if not remote and not os.path.isdir(path):
    raise MissingFileError(f"T5X checkpoint directory {path} does not exist")
  source = path if remote else os.path.abspath(path)
  directory = _kvstore(path)
  dtype = np.dtype(params_dtype if params_dtype is not None else config.param_dtype)
  expected = _model_order(config)

  if _has(directory, ORBAX_METADATA):
    arrays = _load_orbax(source, source, config, expected)
  elif _has(directory, f"{ORBAX_STATE_DIR}/{ORBAX_METADATA}"):
    arrays = _load_orbax(posixpath.join(source, ORBAX_STATE_DIR), source, config, expected)
  elif (blob := _read_file(directory, CHECKPOINT_FILE)) is not None:
    arrays = _load_legacy(directory, blob, source, config, expected)
  else:
    steps = _step_dirs(directory)
    hint = (f"; it holds {steps[-3:]}: pass one of those step directories" if steps
            else "; pass a T5X `checkpoint_<step>` directory")
    raise MissingFileError(f"no T5X `{CHECKPOINT_FILE}` file (or orbax `{ORBAX_STATE_DIR}/{ORBAX_METADATA}`) in "
                           f"{source}{hint}")
  # Cast one array at a time, dropping each as it goes: the peak stays near one copy of the model (XL is 11 GiB).
  return _nest({key: np.ascontiguousarray(arrays.pop(key), dtype=dtype) for key in expected})


# ---- writing ----


def _chunks(shape: tuple[int, ...], itemsize: int) -> list[int]:
  """A chunk shape of at most _CHUNK_BYTES whose sides divide the array's: shrink the leading axes first (rows of
  a T5 kernel or embedding stay whole)."""
  chunks = [max(1, size) for size in shape]
  budget = max(1, _CHUNK_BYTES // itemsize)
  for axis, size in enumerate(chunks):
    rest = int(np.prod(chunks[axis + 1:], dtype=np.int64))  # the later axes whole, the earlier ones already 1
    fits = [d for d in range(1, size + 1) if size % d == 0 and d * rest <= budget]
    if fits:
      chunks[axis] = max(fits)
      break
    chunks[axis] = 1
  return chunks


def _relative_spec(name: str, array: np.ndarray, remote: bool) -> dict[str, Any]:
  """The spec t5x records in the msgpack: the array's path relative to the checkpoint directory."""
  kvstore = ({"driver": "gcs", "bucket": _DUMMY_BUCKET, "path": name} if remote else {"driver": "file", "path": name})
  spec = {"driver": "zarr", "dtype": np.dtype(array.dtype).name, "kvstore": kvstore,
          "metadata": {"compressor": {"id": "gzip"}, "shape": list(array.shape),
                       "chunks": _chunks(array.shape, array.dtype.itemsize)}}
  return ts.Spec(spec).to_json()


def save_t5x(params: Params, path: str | os.PathLike, step: int = 0) -> None:
  """Write our parameter tree as a legacy T5X checkpoint directory `path` (T5X names it `checkpoint_<step>` inside a
  model directory): one gzip zarr v2 array per parameter, named `target.<dotted path>`, and the msgpack
  `checkpoint` file `{"version": 3, "optimizer": {"target": <specs>, "state": {"step": step}}}`.

  Arrays keep their dtype (float32 or bfloat16). There is no optimizer state: a T5X run restores the checkpoint
  with `RestoreCheckpointConfig(fallback_to_scratch=True)` (its optimizer slots from init), or just its `target`.
  A local checkpoint is written in a temporary sibling and renamed into place, as t5x does; on gs:// the
  `checkpoint` file is written last, so a partial copy has none and is not mistaken for a checkpoint.
  """
  path = os.fspath(path)
  remote = path.startswith("gs://")
  final = path.rstrip("/") if remote else os.path.abspath(path)
  if remote:
    if _has(_kvstore(final), CHECKPOINT_FILE):
      raise ConfigError(f"{final} already holds a T5X checkpoint; remove it or choose another path")
    target = final
  else:
    if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
      raise ConfigError(f"{final} already exists and is not an empty folder; remove it or choose another path")
    target = f"{final}.tmp-{int(time.time())}-{os.getpid()}"
    os.makedirs(target)
  directory = _kvstore(target)

  arrays = {key: np.asarray(value) for key, value in _flatten(params).items()}
  for key, array in arrays.items():
    if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
      raise ConfigError(f"save_t5x: parameter {'/'.join(key)} has dtype {array.dtype}; expected floating point")
  names = {key: ".".join((TARGET,) + key) for key in arrays}
  specs = {key: _relative_spec(names[key], array, remote) for key, array in arrays.items()}
  stores = {key: ts.open(specs[key] | {"kvstore": _child(directory, names[key])}, create=True, open=True)
            for key in arrays}
  writes = [stores[key].result().write(array) for key, array in arrays.items()]
  for write in writes:
    write.result()
  state = {"version": VERSION,
           "optimizer": {TARGET: _nest(specs), "state": {"step": np.asarray(step, np.int32)}}}
  ts.KvStore.open(directory).result().write(CHECKPOINT_FILE, serialization.msgpack_serialize(state)).result()
  if not remote:
    if os.path.isdir(final):
      os.rmdir(final)  # empty, checked above
    os.rename(target, final)
