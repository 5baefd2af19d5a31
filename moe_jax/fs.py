"""One path layer (fsspec) for everything moe_jax writes or reads outside orbax: run and model directories, expert
and MoE files, config.gin, metrics, results, plots and the data root.

Local paths stay plain paths (`os` semantics, absolute where orbax needs them). A URL (`gs://bucket/run`, `s3://...`,
`memory://...` in tests) goes to its fsspec filesystem, so `gs://` works without a gcsfuse mount (install the `gcs`
extra for gcsfs). Orbax writes its checkpoints to local paths and `gs://` itself.

Writes are atomic: locally a temporary sibling renamed into place; on an object store one object written at close
(readers see the old object or the new one, never part of one).
"""

from __future__ import annotations

import os
import posixpath
from typing import IO, Any

import fsspec


def is_url(path: str) -> bool:
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (orbax and subprocesses want that); a URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def _url_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """The fsspec filesystem of a URL and the path inside it."""
  return fsspec.core.url_to_fs(path)


def join(first: str | os.PathLike, *rest: str) -> str:
  first = os.fspath(first)
  if is_url(first):
    return posixpath.join(first.rstrip("/"), *rest) if rest else first
  return os.path.join(first, *rest)


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
  return os.path.exists(path) if not is_url(path) else _ask(path, "exists")


def isfile(path: str) -> bool:
  return os.path.isfile(path) if not is_url(path) else _ask(path, "isfile")


def isdir(path: str) -> bool:
  return os.path.isdir(path) if not is_url(path) else _ask(path, "isdir")


def _ask(url: str, question: str) -> bool:
  fs, inner = _url_fs(url)
  return bool(getattr(fs, question)(inner))


def makedirs(path: str) -> None:
  """Create a folder and its parents (object stores have no folders: nothing to do there but on memory://)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, inner = _url_fs(path)
  fs.makedirs(inner, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Entry names in `path`, sorted; empty if it is not a folder."""
  if not isdir(path):
    return []
  if not is_url(path):
    return sorted(os.listdir(path))
  fs, inner = _url_fs(path)
  return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def open_file(path: str, mode: str = "r") -> IO[Any]:
  """Open for reading ("r", "rb"); whole-file writes go through `write_text`/`write_bytes`, which are atomic."""
  if not is_url(path):
    return open(path, mode, encoding=None if "b" in mode else "utf-8")
  return fsspec.open(path, mode, encoding=None if "b" in mode else "utf-8").open()


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Write a whole file atomically, creating its folder."""
  folder = dirname(path)
  if folder:
    makedirs(folder)
  if is_url(path):
    with fsspec.open(path, "wb") as f:
      f.write(data)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def copy(source: str, target: str) -> None:
  """Copy a file atomically (the target appears whole or not at all)."""
  write_bytes(target, read_bytes(source))


def remove(path: str) -> None:
  """Remove a file or a folder tree if it exists."""
  if not exists(path):
    return
  if not is_url(path):
    if os.path.isdir(path):
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(path)
    else:
      os.remove(path)
    return
  fs, inner = _url_fs(path)
  fs.rm(inner, recursive=True)

