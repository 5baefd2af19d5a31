"""Concatenate single-expert files (normally gate-stage outputs) into one MoE expert file.

The MoE file uses the expert-file format of `moe_jax.training.checkpointing` (one safetensors file, leaves stacked
on the expert axis) with metadata `experts`: one {task, source, stage} dict per expert, in expert-axis order. The
order is the contract that routers and `routing_ids` rely on, so it is exactly the order given; appending keeps the
existing experts bit-identical and adds the new ones after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import gin

from moe_jax import fs
from moe_jax.errors import ConfigError, MismatchError
from moe_jax.models import experts as ex
from moe_jax.training import checkpointing as ckpt

# Metadata that every expert of one MoE file must share (they run on one backbone, in one module layout).
_SHARED = ("fingerprint", "modules", "rank")


def expert_entries(metadata: dict[str, Any], source: str) -> list[dict[str, Any]]:
  """Per-expert {task, source, stage} of a file: its `experts` list (an MoE file) or one entry (a single expert)."""
  if "experts" in metadata:
    return [dict(e) for e in metadata["experts"]]
  if metadata["num_experts"] != 1:
    raise MismatchError(f"expert file {source} holds {metadata['num_experts']} experts but no per-expert `experts` "
                        "metadata; only single-expert files and files written by concatenate can be combined")
  return [{"task": metadata.get("task"), "source": fs.absolute(source), "stage": metadata.get("stage")}]


def load_moe(path: str, config: Any = None) -> tuple[Any, dict[str, Any]]:
  """(expert tree, metadata) of a single-expert or MoE file, metadata always carrying the `experts` list."""
  path = ckpt.expert_file(path)
  tree, metadata = ckpt.load_experts(path, config)
  return tree, {**metadata, "experts": expert_entries(metadata, path)}


def _check_same(reference: tuple[str, dict[str, Any], Any], candidate: tuple[str, dict[str, Any], Any]) -> None:
  """Raise MismatchError naming `candidate`'s file and the first thing that differs from `reference`."""
  ref_path, ref_meta, ref_tree = reference
  path, meta, tree = candidate
  if (meta.get("backbone") or {}).get("weights") != (ref_meta.get("backbone") or {}).get("weights"):
    raise MismatchError(f"expert file {path} was trained on backbone {(meta.get('backbone') or {}).get('weights')},"
                        f" {ref_path} on {(ref_meta.get('backbone') or {}).get('weights')}: one MoE holds one "
                        "backbone's experts")
  for key in _SHARED:
    if meta.get(key) != ref_meta.get(key):
      found, want = meta.get(key), ref_meta.get(key)
      if key == "modules":
        extra, missing = sorted(set(found) - set(want)), sorted(set(want) - set(found))
        found, want = f"extra {extra[:3]}", f"missing {missing[:3]}"
      raise MismatchError(f"expert file {path} differs from {ref_path} in {key}: {found} vs {want}")
  ref_flat, flat = flax.traverse_util.flatten_dict(ref_tree), flax.traverse_util.flatten_dict(tree)
  for key in sorted(set(ref_flat) | set(flat)):
    a, b = ref_flat.get(key), flat.get(key)
    if a is None or b is None or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
      describe = lambda x: "absent" if x is None else f"{x.dtype}{list(x.shape)}"
      raise MismatchError(f"expert file {path} differs from {ref_path} at {'/'.join(key)}: {describe(b)} vs "
                          f"{describe(a)}")


@gin.configurable
def concatenate(expert_files: Sequence[str] | None = None, output: str = gin.REQUIRED, append_to: str | None = None,
                library: str | None = None, names: Sequence[str] | None = None,
                tags: Sequence[str] | None = None) -> str:
  """Stack the experts of `expert_files` (files or run dirs) in order into one MoE file at `output`; with
  `append_to`, that MoE file's experts come first, unchanged. Returns `output`. The write is atomic, so `output`
  may equal `append_to`. Raises MismatchError for mismatched files or a task that would appear twice.

  Or stack experts of the expert library at `library` (a URI): `names` in that order, else every expert in it,
  keeping those tagged with every one of `tags`."""
  if library is not None:
    if expert_files or append_to:
      raise ConfigError("concatenate: give library (an expert library) or expert_files/append_to, not both")
    from moe_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
    chosen = ExpertLibrary(library, read_only=True)
    ckpt.save_experts(output, *chosen.stack(chosen.select(names, tags)))
    return output
  if isinstance(expert_files, str):
    expert_files = [expert_files]
  if not expert_files:
    raise ConfigError("concatenate: no expert_files given")
  paths = [ckpt.expert_file(p) for p in ([append_to] if append_to else []) + list(expert_files)]
  loaded = []  # (path, metadata, tree)
  for path in paths:
    tree, metadata = load_moe(path)
    loaded.append((path, metadata, tree))
  for item in loaded[1:]:
    _check_same(loaded[0], item)
  entries, seen = [], {}
  for path, meta, _ in loaded:
    for entry in meta["experts"]:
      task = entry.get("task")
      if task in seen:
        source = entries[seen[task]]["source"]
        raise MismatchError(f"task {task!r} of {path} is already expert {seen[task]} (from {source}); one expert "
                            "per task")
      seen[task] = len(entries)
      entries.append(entry)
  stacked = ex.stack([tree for _, _, tree in loaded], [path for path, _, _ in loaded])
  first = loaded[0][1]
  metadata = {"base_model": first.get("base_model"), "fingerprint": first["fingerprint"],
              "backbone": first.get("backbone"), "modules": first["modules"],
              "rank": first["rank"], "num_experts": len(entries), "experts": entries}
  ckpt.save_experts(output, stacked, metadata)
  return output
