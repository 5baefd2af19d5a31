"""The one data root and the files under it: finding a dataset's split files, reading rows, and clear errors.

Every real-data source (P3, FLAN, BIG-bench) reads under `data_root()`, set once by the `DATA_DIR` gin macro
(`--gin.DATA_DIR=/data` or `gs://bucket/data`) or the MOE_JAX_DATA_DIR environment variable. A missing dataset
fails with `DataNotFoundError` naming the dataset, the folder looked in and the command that fetches it; a bad row
fails with `MalformedRowError` naming the file and the row. Remote roots go through `moe_jax.fs` (fsspec).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import gin

from moe_jax.errors import ConfigError, MissingFileError, UserError
from moe_jax.fs import isdir, join, listdir, open_file  # the one path layer, for the sources reading under the root

ENV_VAR = "MOE_JAX_DATA_DIR"
ROW_FORMATS = (".parquet", ".jsonl", ".json")  # what `read_rows` reads


class DataNotFoundError(MissingFileError):
  """A dataset's files are not under the data root."""

  def __init__(self, dataset: str, looked_in: str, how: str):
    super().__init__(f"dataset {dataset!r} not found: no files in {looked_in} (data root {data_root()!r}). "
                     f"To get it: {how}")


class MalformedRowError(UserError, ValueError):
  """A row that lacks a field or has an unusable value, located by file and row number (0-based)."""

  def __init__(self, path: str, row: int, problem: str):
    super().__init__(f"{path}, row {row}: {problem}")


@gin.configurable
def data_root(path: str | None = None) -> str | None:
  """The data root: `path` (bound to the DATA_DIR macro by gin/data/*.gin), else $MOE_JAX_DATA_DIR, else None."""
  return path or os.environ.get(ENV_VAR) or None


def require_root(dataset: str, how: str) -> str:
  root = data_root()
  if root is None:
    raise DataNotFoundError(dataset, "<unset>", f"set the data root (--gin.DATA_DIR=... or ${ENV_VAR}), then {how}")
  return root


def split_files(directory: str, split: str, suffixes: Sequence[str] = ROW_FORMATS + (".tfrecord",)) -> list[str]:
  """Files of `split` in `directory`, sharded or not: `<split>.jsonl`, `<split>-00000-of-00002.parquet`,
  `<split>.tfrecord-00000-of-00001`, ... in sorted order."""
  names = listdir(directory)
  found = []
  for suffix in suffixes:
    patterns = (f"{split}{suffix}", f"{split}{suffix}-*", f"{split}-*{suffix}", f"{split}_*{suffix}")
    found += [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
  return [join(directory, n) for n in sorted(dict.fromkeys(found))]


def read_rows(path: str) -> Iterator[dict[str, Any]]:
  """Rows of a parquet, JSON-lines or JSON file (a list of rows, or `{"examples": [...]}` as in the BBH release)."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    with open_file(path, "rb") as f:
      for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
        yield from batch.to_pylist()
  elif path.endswith(".jsonl"):
    with open_file(path) as f:
      for row, line in enumerate(f):
        if line.strip():
          try:
            yield json.loads(line)
          except json.JSONDecodeError as e:
            raise MalformedRowError(path, row, f"not JSON ({e.msg})") from None
  elif path.endswith(".json"):
    with open_file(path) as f:
      data = json.load(f)
    rows = data.get("examples") if isinstance(data, dict) else data
    if not isinstance(rows, list):
      raise MalformedRowError(path, 0, "expected a JSON list of rows or an object with an 'examples' list")
    yield from rows
  else:
    raise ConfigError(f"{path}: unknown row format (expected one of {ROW_FORMATS})")


def check_fields(path: str, row: int, example: Any, fields: Sequence[str]) -> None:
  """Raise `MalformedRowError` unless `example` is a mapping with every one of `fields`, none of them None."""
  if not isinstance(example, dict):
    raise MalformedRowError(path, row, f"expected an object with fields {list(fields)}, got {type(example).__name__}")
  missing = [f for f in fields if example.get(f) is None]
  if missing:
    raise MalformedRowError(path, row, f"missing field(s) {missing} (has {sorted(example)})")


def local_glob(pattern: str) -> list[str]:
  """Sorted local paths matching `pattern` (used by `prepare`, which reads local release copies)."""
  return sorted(glob.glob(pattern, recursive=True))
