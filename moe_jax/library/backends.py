"""Where a library's files live, chosen by the URI's prefix; every backend offers the same few whole-file operations.

- `local://path` (or a plain path): files on this machine, each written to a temporary sibling, fsynced and renamed
  into place, so a reader (or a process killed mid-write) sees the old file or the whole new one.
- `virtual://name`: in this process's memory (fsspec's memory filesystem), for experiments and tests.
- `gs://bucket/path` (and any other fsspec URL: `s3://`, `memory://`): through fsspec (gcsfs for gs://, the
  `gcs` extra), the way TPU users keep checkpoints. An object appears whole when its upload completes.
- `hf://user/repo`: a Hugging Face Hub model repository through `huggingface_hub.HfApi`; the writes of one
  `batch()` become one commit (atomic on the Hub), so an add is one commit and a copy of a library is one commit.

Credentials are the clients' own: gcsfs finds Google credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata
server), huggingface_hub finds HF_TOKEN or its cached login. Nothing here takes, stores or prints a credential.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from moe_jax.errors import ConfigError, MissingFileError, UserError

VIRTUAL_ROOT = "memory://moe_jax-virtual"


class StorageError(UserError):
  """A backend refused an operation (permissions, a repository that does not exist, a network failure)."""


class Store:
  """Whole-file operations on paths relative to a library's root ("entries/x.json")."""

  uri: str

  def read(self, path: str) -> bytes:
    raise NotImplementedError

  def exists(self, path: str) -> bool:
    raise NotImplementedError

  def list(self, folder: str) -> list[str]:
    """File names directly inside `folder`, sorted (empty if there is none)."""
    raise NotImplementedError

  def write(self, path: str, data: bytes) -> None:
    """Write a whole file atomically (readers see the old one or the new one)."""
    raise NotImplementedError

  def delete(self, path: str) -> None:
    raise NotImplementedError

  @contextlib.contextmanager
  def batch(self, message: str) -> Iterator[None]:  # pylint: disable=unused-argument
    """Group writes (the Hub commits them together); elsewhere each write is already final when it returns."""
    yield


class LocalStore(Store):
  """A folder on this machine: each file written to a unique temporary sibling, fsynced, renamed into place."""

  def __init__(self, uri: str, root: str):
    self.uri, self._root = uri, os.path.abspath(root)

  def _path(self, path: str) -> str:
    return os.path.join(self._root, *path.split("/"))

  def read(self, path: str) -> bytes:
    try:
      with open(self._path(path), "rb") as f:
        return f.read()
    except FileNotFoundError:
      raise MissingFileError(f"{self.uri}: no file {path}") from None

  def exists(self, path: str) -> bool:
    return os.path.exists(self._path(path))

  def list(self, folder: str) -> list[str]:
    full = self._path(folder)
    return sorted(n for n in os.listdir(full) if ".tmp-" not in n) if os.path.isdir(full) else []

  def write(self, path: str, data: bytes) -> None:
    full = self._path(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    tmp = f"{full}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique: concurrent writers never share one
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, full)

  def delete(self, path: str) -> None:
    if os.path.isfile(self._path(path)):
      os.remove(self._path(path))


class FsspecStore(Store):
  """Any fsspec URL (gs:// through gcsfs, memory://): objects written whole, in one upload."""

  def __init__(self, uri: str, root: str):
    self.uri = uri
    self._fs, self._root = self._remote("open", lambda: fsspec.core.url_to_fs(root))

  def _remote(self, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, with a failure of the store (credentials, permissions, network) as one line naming the library."""
    try:
      return fn()
    except FileNotFoundError:
      raise
    except Exception as e:  # pylint: disable=broad-except  each filesystem has its own error types
      if not (_is_network_error(e) or type(e).__module__.split(".")[0] in ("gcsfs", "google")):
        raise
      detail = " ".join(str(e).split())[:200]
      raise StorageError(f"{self.uri}: {what} failed ({type(e).__name__}: {detail}); check the path and the "
                         "credentials the filesystem finds (for gs://: GOOGLE_APPLICATION_CREDENTIALS or `gcloud "
                         "auth application-default login`)") from None

  def _path(self, path: str) -> str:
    return posixpath.join(self._root, path)

  def read(self, path: str) -> bytes:
    try:
      return self._remote(f"read {path}", lambda: self._fs.cat_file(self._path(path)))
    except FileNotFoundError:
      raise MissingFileError(f"{self.uri}: no file {path}") from None

  def exists(self, path: str) -> bool:
    return self._remote(f"look for {path}", lambda: self._fs.exists(self._path(path)))

  def list(self, folder: str) -> list[str]:
    full = self._path(folder)

    def names() -> list[str]:
      self._fs.invalidate_cache(full)  # another process may have added files since the last listing
      if not self._fs.isdir(full):
        return []
      return sorted(posixpath.basename(p.rstrip("/")) for p in self._fs.ls(full, detail=False))

    return self._remote(f"list {folder}", names)

  def write(self, path: str, data: bytes) -> None:
    full = self._path(path)

    def put() -> None:
      self._fs.makedirs(posixpath.dirname(full), exist_ok=True)
      self._fs.pipe_file(full, data)  # one object, visible once complete

    self._remote(f"write {path}", put)

  def delete(self, path: str) -> None:
    full = self._path(path)
    self._remote(f"delete {path}", lambda: self._fs.rm(full) if self._fs.exists(full) else None)


_RAISE = object()


def _is_network_error(error: Exception) -> bool:
  """A failure to reach a server (offline, DNS, refused, timed out), from the OS or an HTTP client library."""
  return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.split(".")[0] in (
      "httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp")


def default_hub_api() -> Any:
  """The Hub client; it reads HF_TOKEN or the cached login itself. Tests replace it with a local stand-in."""
  from huggingface_hub import HfApi  # pylint: disable=g-import-not-at-top
  return HfApi()


class HubStore(Store):
  """A Hugging Face Hub model repository; the writes of a `batch` are one commit."""

  def __init__(self, uri: str, repo_id: str, api: Any = None):
    self.uri, self.repo_id = uri, repo_id
    self._api = api if api is not None else hub_api_factory()
    self._pending: dict[str, bytes | None] | None = None  # path -> data, or None for a deletion
    self._message: list[str] = []
    self._files: set[str] | None = None  # the repository's listing, fetched once per batch

  def _call(self, what: str, fn: Callable[[], Any], missing: Any = _RAISE) -> Any:
    """`fn()`, its failures as one-line errors that name the repository and what failed, never the request (whose
    headers carry the token); `missing` is returned instead when the repository or file does not exist."""
    from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
    try:
      return fn()
    except (errors.RepositoryNotFoundError, errors.EntryNotFoundError) as e:
      if missing is not _RAISE:
        return missing
      raise MissingFileError(f"{self.uri}: {what}: not found on the Hub ({type(e).__name__})") from None
    except errors.HfHubHTTPError as e:
      status = getattr(getattr(e, "response", None), "status_code", "?")
      raise StorageError(f"{self.uri}: {what} failed (HTTP {status}); check the repository name and that HF_TOKEN "
                         "(or `hf auth login`) grants access") from None
    except Exception as e:  # pylint: disable=broad-except  the HTTP library's own connection errors
      if not _is_network_error(e):
        raise
      raise StorageError(f"{self.uri}: {what}: cannot reach the Hub ({type(e).__name__}); check the network, "
                         "HF_ENDPOINT and HF_HUB_OFFLINE") from None

  def _listing(self) -> set[str]:
    if self._files is None or self._pending is None:  # outside a batch, always fresh: others may have committed
      self._files = set(self._call("list files", lambda: self._api.list_repo_files(self.repo_id, repo_type="model"),
                                   missing=[]))  # no repository yet: an empty library, which the first commit creates
    files = set(self._files)
    for path, data in (self._pending or {}).items():
      (files.add if data is not None else files.discard)(path)
    return files

  def read(self, path: str) -> bytes:
    if self._pending and path in self._pending and self._pending[path] is not None:
      return self._pending[path]
    if path not in self._listing():
      raise MissingFileError(f"{self.uri}: no file {path}")
    local = self._call(f"download {path}", lambda: self._api.hf_hub_download(
        repo_id=self.repo_id, filename=path, repo_type="model"))
    with open(local, "rb") as f:
      return f.read()

  def exists(self, path: str) -> bool:
    return path in self._listing()

  def list(self, folder: str) -> list[str]:
    prefix = folder.rstrip("/") + "/"
    return sorted({p[len(prefix):].split("/")[0] for p in self._listing() if p.startswith(prefix)})

  def write(self, path: str, data: bytes) -> None:
    with self.batch(f"write {path}"):
      self._pending[path] = bytes(data)

  def delete(self, path: str) -> None:
    with self.batch(f"delete {path}"):
      if path in self._listing():
        self._pending[path] = None

  @contextlib.contextmanager
  def batch(self, message: str) -> Iterator[None]:
    outermost = self._pending is None
    if outermost:
      self._pending, self._message = {}, [message]
    try:
      yield
      if outermost and self._pending:
        self._commit()
    finally:
      if outermost:
        self._pending, self._files = None, None

  def _commit(self) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete  # pylint: disable=g-import-not-at-top
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=io.BytesIO(d)) if d is not None
                  else CommitOperationDelete(path_in_repo=p) for p, d in sorted(self._pending.items())]
    self._call("create the repository", lambda: self._api.create_repo(self.repo_id, repo_type="model",
                                                                      exist_ok=True, private=True))
    self._call(f"commit {len(operations)} file(s)", lambda: self._api.create_commit(
        repo_id=self.repo_id, repo_type="model", operations=operations, commit_message=self._message[0]))


hub_api_factory: Callable[[], Any] = default_hub_api


def open_store(uri: str) -> Store:
  """The backend of a library URI (see the module docstring)."""
  uri = os.fspath(uri)
  if not uri:
    raise ConfigError("library URI is empty: give local://PATH, virtual://NAME, gs://BUCKET/PATH or hf://USER/REPO")
  if uri.startswith("local://"):
    return LocalStore(uri, uri[len("local://"):])
  if uri.startswith("virtual://"):
    return FsspecStore(uri, f"{VIRTUAL_ROOT}/{uri[len('virtual://'):].strip('/')}")
  if uri.startswith("hf://"):
    repo_id = uri[len("hf://"):].strip("/")
    if repo_id.count("/") != 1:
      raise ConfigError(f"library URI {uri!r}: expected hf://USER/REPO (a Hub model repository)")
    return HubStore(uri, repo_id)
  if "://" not in uri:
    return LocalStore(uri, uri)
  protocol = uri.split("://", 1)[0]
  try:
    fsspec.get_filesystem_class(protocol)
  except (ImportError, ValueError) as e:
    hint = " (pip install 'moe_jax[gcs]' for gs://)" if protocol in ("gs", "gcs") else ""
    raise ConfigError(f"library URI {uri!r}: no filesystem for {protocol}://{hint}: {e}") from None
  return FsspecStore(uri, uri)
