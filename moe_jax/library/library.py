"""The expert library: the one place experts and their auxiliary data live, on any backend (`backends`).

Layout under the library's root:

  entries/<key>.json                    one manifest per expert: its info, the weights file and its SHA-256
  blobs/<sha256>.safetensors            the weights, content-addressed (rename and restore never copy them)
  aux/<sha256>/<method>-<hash>.safetensors   auxiliary data of the weights with that SHA-256, one file per method
                                        and parameter set (`hash` of the parameters)

Why nothing is ever half-written: an add writes the weights file first and the manifest last, each atomically, so
a process killed at any point leaves either no manifest (the expert is absent; an unreferenced blob is invisible)
or a complete one. Manifests are separate files, so processes adding different experts never write the same file:
both land. A manifest records its weights' SHA-256 and size, and a weights file that does not match (truncated,
corrupt) is reported by the expert's name and never loaded.

Why auxiliary data is keyed by the weights' hash: it belongs to the weights, not to a name. A rename keeps it, a
replace (new weights) leaves it behind and deletes it, a copy carries it along.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy for safetensors
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from tqdm.auto import tqdm

from moe_jax.checkpoints import identity
from moe_jax.errors import ConfigError, MismatchError, MissingFileError, UserError
from moe_jax.library.backends import Store, open_store
from moe_jax.library.expert import Expert, ExpertInfo, check_name, name_of_key, now, stack_experts, storage_key

FORMAT = "moe_jax-expert-library"
VERSION = 1
_MARKER = "library.json"
_ENTRIES, _BLOBS, _AUX = "entries", "blobs", "aux"
_AUX_METADATA = "moe_jax_auxiliary"


class CorruptExpertError(UserError):
  """A stored file does not match what its manifest recorded (truncated, overwritten, damaged)."""


class ReadOnlyError(UserError):
  """A write to a library opened read-only."""


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _entry_path(name: str) -> str:
  return f"{_ENTRIES}/{storage_key(name)}.json"


def _aux_path(sha: str, method: str, params: Mapping[str, Any]) -> str:
  check_name(method)
  return f"{_AUX}/{sha}/{storage_key(method)}-{identity.config_hash(params)}.safetensors"


@dataclasses.dataclass(frozen=True)
class Entry:
  """A manifest: the info, where the weights are and what they must hash to, and whether it was removed."""

  info: ExpertInfo
  sha256: str
  size: int
  removed: str | None = None  # when it was (soft-)removed

  @property
  def blob(self) -> str:
    return f"{_BLOBS}/{self.sha256}.safetensors"

  def to_bytes(self) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "info": self.info.to_json(), "sha256": self.sha256,
                       "size": self.size, "removed": self.removed}, indent=1, sort_keys=True).encode()


class ExpertLibrary:
  """Experts with their info and auxiliary data at a URI (`local://`, `virtual://`, `gs://`, `hf://`, a path).

  `read_only=True` refuses every write (ReadOnlyError). A library that does not exist yet is empty; the first
  write creates it.
  """

  def __init__(self, uri: str, read_only: bool = False, store: Store | None = None):
    self.store = store or open_store(uri)
    self.uri, self.read_only = self.store.uri, read_only
    if self.store.exists(_MARKER):
      marker = json.loads(self.store.read(_MARKER))
      if marker.get("format") != FORMAT or marker.get("version", 0) > VERSION:
        raise MismatchError(f"{self.uri} is not a moe_jax expert library of version <= {VERSION} "
                            f"({_MARKER}: {marker})")

  def __repr__(self) -> str:
    return f"ExpertLibrary({self.uri!r}{', read_only=True' if self.read_only else ''})"

  # Reading.

  def _entry(self, name: str, removed_ok: bool = False) -> Entry:
    path = _entry_path(name)
    try:
      data = self.store.read(path)
    except MissingFileError:
      raise MissingFileError(f"{self.uri} has no expert {name!r} (it has {len(self.names())}: "
                             f"{self.names()[:5]}...); see `python -m moe_jax.library list {self.uri}`") from None
    try:
      record = json.loads(data)
      entry = Entry(ExpertInfo.from_json(record["info"]), record["sha256"], int(record["size"]), record.get("removed"))
    except (ValueError, KeyError, TypeError) as e:
      raise CorruptExpertError(f"expert {name!r} in {self.uri}: its manifest {path} is unreadable ({e}); remove "
                               "that file or restore it from a copy") from None
    if entry.removed and not removed_ok:
      raise MissingFileError(f"expert {name!r} in {self.uri} was removed on {entry.removed}; `python -m "
                             f"moe_jax.library restore {self.uri} {name}` brings it back")
    return entry

  def names(self, include_removed: bool = False) -> list[str]:
    """Expert names, sorted."""
    keys = [n[:-len(".json")] for n in self.store.list(_ENTRIES) if n.endswith(".json")]
    names = sorted(name_of_key(k) for k in keys)
    return names if include_removed else [n for n in names if not self._entry(n, removed_ok=True).removed]

  def entries(self, include_removed: bool = False) -> list[Entry]:
    entries = [self._entry(n, removed_ok=True) for n in self.names(include_removed=True)]
    return [e for e in entries if include_removed or not e.removed]

  def __contains__(self, name: str) -> bool:
    return self.store.exists(_entry_path(name)) and not self._entry(name, removed_ok=True).removed

  def __len__(self) -> int:
    return len(self.names())

  def info(self, name: str) -> ExpertInfo:
    return self._entry(name).info

  def select(self, names: Sequence[str] | None = None, tags: Sequence[str] | None = None) -> list[str]:
    """Expert names: `names` in their order (each checked to exist), else every expert (sorted), keeping those that
    carry all of `tags`."""
    chosen = list(names) if names is not None else self.names()
    for name in chosen:
      self._entry(name)
    if tags:
      chosen = [n for n in chosen if set(tags) <= set(self.info(n).tags)]
    if not chosen:
      raise ConfigError(f"{self.uri}: no expert matches names={names} tags={list(tags or [])}")
    return chosen

  def get(self, name: str) -> Expert:
    """The expert's info and weights (host NumPy), after checking the weights against the manifest."""
    entry = self._entry(name)
    tensors = load_safetensors(self._weights_bytes(name, entry))
    return Expert(entry.info, flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tensors.items()}))

  def _weights_bytes(self, name: str, entry: Entry) -> bytes:
    """The weights file of `entry`, checked against its recorded size and SHA-256."""
    try:
      data = self.store.read(entry.blob)
    except MissingFileError:
      raise CorruptExpertError(f"expert {name!r} in {self.uri}: its weights file {entry.blob} is missing") from None
    if len(data) != entry.size or _sha256(data) != entry.sha256:
      raise CorruptExpertError(f"expert {name!r} in {self.uri}: its weights file {entry.blob} is corrupt or "
                               f"truncated ({len(data)} bytes, expected {entry.size} with SHA-256 "
                               f"{entry.sha256[:12]}...); not loaded. Replace or remove it")
    return data

  def stack(self, names: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """(MoE tree, MoE file metadata) of these experts in this order (`expert.stack_experts`)."""
    return stack_experts([self.get(n) for n in names])

  # Writing.

  def _writable(self) -> None:
    if self.read_only:
      raise ReadOnlyError(f"{self.uri} was opened read-only; open it without read_only to change it")

  @contextlib.contextmanager
  def batch(self, message: str) -> Iterator[None]:
    """Group changes (on the Hub: one commit)."""
    self._writable()
    with self.store.batch(message):
      if not self.store.exists(_MARKER):
        self.store.write(_MARKER, json.dumps({"format": FORMAT, "version": VERSION}).encode())
      yield

  def _put(self, expert: Expert) -> Entry:
    """Write the weights (if this content is not stored yet) and return their manifest; the caller writes it."""
    data = save_safetensors(expert.flat_weights())
    entry = Entry(expert.info, _sha256(data), len(data))
    if not self.store.exists(entry.blob):
      self.store.write(entry.blob, data)
    return entry

  def add(self, expert: Expert) -> None:
    """Add a new expert; ConfigError if the name is taken (also by a removed expert: restore or purge it)."""
    name = expert.name
    with self.batch(f"add expert {name}"):
      if self.store.exists(_entry_path(name)):
        removed = self._entry(name, removed_ok=True).removed
        raise ConfigError(f"{self.uri} already has an expert {name!r}{' (removed; restore or purge it)' if removed else ''}"
                          f": choose another name or `replace` it")
      entry = self._put(expert)
      self.store.write(_entry_path(name), entry.to_bytes())

  def replace(self, expert: Expert) -> None:
    """Replace an existing expert's weights and info; auxiliary data of the old weights is deleted."""
    with self.batch(f"replace expert {expert.name}"):
      old = self._entry(expert.name, removed_ok=True)
      entry = self._put(expert)
      self.store.write(_entry_path(expert.name), entry.to_bytes())
      if entry.sha256 != old.sha256 and not any(e.sha256 == old.sha256 for e in self.entries(True)):
        for path in self.store.list(f"{_AUX}/{old.sha256}"):
          self.store.delete(f"{_AUX}/{old.sha256}/{path}")

  def remove(self, name: str, purge: bool = False) -> None:
    """Soft-remove an expert (hidden from listings and loading; `restore` brings it back), or with `purge` delete
    it for good: its manifest, and its weights and auxiliary data unless another expert has the same weights."""
    with self.batch(f"{'purge' if purge else 'remove'} expert {name}"):
      entry = self._entry(name, removed_ok=purge)
      if not purge:
        self.store.write(_entry_path(name), dataclasses.replace(entry, removed=now()).to_bytes())
        return
      self.store.delete(_entry_path(name))
      if not any(e.sha256 == entry.sha256 for e in self.entries(True)):
        for path in self.store.list(f"{_AUX}/{entry.sha256}"):
          self.store.delete(f"{_AUX}/{entry.sha256}/{path}")
        self.store.delete(entry.blob)

  def restore(self, name: str) -> None:
    with self.batch(f"restore expert {name}"):
      entry = self._entry(name, removed_ok=True)
      if not entry.removed:
        raise ConfigError(f"expert {name!r} in {self.uri} is not removed")
      self.store.write(_entry_path(name), dataclasses.replace(entry, removed=None).to_bytes())

  def rename(self, old: str, new: str) -> None:
    """Give an expert a new name; its weights and auxiliary data stay where they are (they are keyed by content)."""
    check_name(new)
    with self.batch(f"rename expert {old} to {new}"):
      entry = self._entry(old)
      if self.store.exists(_entry_path(new)):
        raise ConfigError(f"{self.uri} already has an expert {new!r}")
      self.store.write(_entry_path(new), dataclasses.replace(entry, info=dataclasses.replace(entry.info,
                                                                                             name=new)).to_bytes())
      self.store.delete(_entry_path(old))

  # Auxiliary data: per expert weights, per method and parameter set.

  def get_auxiliary(self, name: str, method: str, params: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    path = _aux_path(self._entry(name).sha256, method, params)
    if not self.store.exists(path):
      return None
    try:
      return dict(load_safetensors(self.store.read(path)))
    except Exception as e:  # pylint: disable=broad-except  safetensors raises its own error types
      raise CorruptExpertError(f"expert {name!r} in {self.uri}: auxiliary data {path} ({method}) is unreadable "
                               f"({type(e).__name__}); delete that file to recompute it") from None

  def put_auxiliary(self, name: str, method: str, params: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    with self.batch(f"auxiliary data {method} of {name}"):
      sha = self._entry(name).sha256
      metadata = {_AUX_METADATA: json.dumps({"method": method, "params": identity.plain(params), "expert": sha})}
      self.store.write(_aux_path(sha, method, params), save_safetensors(
          {k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata))

  def auxiliary(self, name: str, method: str, params: Mapping[str, Any],
                compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The stored auxiliary data, or `compute()`'s, stored (by process 0 of a multi-process run, unless the
    library is read-only) and returned. Every process computes: the computation may span them all."""
    found = self.get_auxiliary(name, method, params)
    if found is not None:
      return found
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    if not self.read_only and jax.process_index() == 0:
      self.put_auxiliary(name, method, params, arrays)
    return arrays

  def auxiliary_entries(self, name: str) -> list[dict[str, Any]]:
    """[{"method", "params", "file"}] of an expert's stored auxiliary data."""
    sha = self._entry(name).sha256
    found = []
    for file in self.store.list(f"{_AUX}/{sha}"):
      header = _safetensors_metadata(self.store.read(f"{_AUX}/{sha}/{file}"))
      found.append({**json.loads(header.get(_AUX_METADATA, "{}")), "file": file})
    return found


def _safetensors_metadata(data: bytes) -> dict[str, str]:
  length = int.from_bytes(data[:8], "little")
  return json.loads(data[8:8 + length]).get("__metadata__", {})


def copy_library(source: str | ExpertLibrary, target: str | ExpertLibrary, include_removed: bool = True,
                 names: Sequence[str] | None = None) -> list[str]:
  """Copy experts (default: all, removed ones included) with their weights and auxiliary data from `source` to
  `target` (on the Hub: one commit). An expert the target already holds with the same weights is skipped; one it
  holds with other weights is an error. Returns the copied names."""
  source = source if isinstance(source, ExpertLibrary) else ExpertLibrary(source, read_only=True)
  target = target if isinstance(target, ExpertLibrary) else ExpertLibrary(target)
  wanted = names if names is not None else source.names(include_removed=include_removed)
  copied = []
  with target.batch(f"copy {len(wanted)} expert(s) from {source.uri}"):
    for name in tqdm(wanted, desc=f"copy to {target.uri}", unit="expert"):
      entry = source._entry(name, removed_ok=True)  # pylint: disable=protected-access
      if target.store.exists(_entry_path(name)):
        theirs = target._entry(name, removed_ok=True)  # pylint: disable=protected-access
        if theirs.sha256 != entry.sha256:
          raise MismatchError(f"{target.uri} already has an expert {name!r} with other weights; remove it there or "
                              "copy to another library")
        continue
      if not target.store.exists(entry.blob):  # checked first: a corrupt file must not spread
        target.store.write(entry.blob, source._weights_bytes(name, entry))  # pylint: disable=protected-access
      for file in source.store.list(f"{_AUX}/{entry.sha256}"):
        path = f"{_AUX}/{entry.sha256}/{file}"
        target.store.write(path, source.store.read(path))
      target.store.write(_entry_path(name), entry.to_bytes())
      copied.append(name)
  return copied
