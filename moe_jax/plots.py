"""Plots a person would rather look at than read: where each task's tokens are routed, module by module."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from moe_jax import fs


def plot_routing(shares: Mapping[str, np.ndarray], task_names: Sequence[str], expert_names: Sequence[str],
                 path: str, max_panels: int = 48) -> str:
  """One heatmap per expert module: rows are tasks, columns experts, cells the fraction of the task's routing
  choices (tokens x k) that went to the expert, so each row sums to 1. With more modules than `max_panels`,
  modules of the same kind in a stack (e.g. every `encoder/*/attention/query`) are averaged per layer group.
  Writes a PNG atomically (`moe_jax.fs`: a local path or a URL) and returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = {name: _row_normalised(v) for name, v in shares.items()}
  if len(panels) > max_panels:
    panels = _group_by_kind(panels)
  names = sorted(panels, key=_module_order)
  tasks = [t.removeprefix("synthetic_") for t in task_names]
  cols = min(6, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 + 0.2 * len(expert_names) * cols + 0.3 * cols,
                                                0.8 + (0.16 * len(tasks) + 0.9) * rows),
                           squeeze=False, sharex=True, sharey=True, constrained_layout=True)
  image = None
  for ax, name in zip(axes.flat, names):
    image = ax.imshow(panels[name], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(_short(name), fontsize=7)
    ax.set_xticks(range(len(expert_names)))
    ax.set_xticklabels(expert_names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=6)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle("Routing per expert module: share of each task's routing choices per expert "
               "(rows: evaluation tasks, columns: experts)", fontsize=9)
  fig.colorbar(image, ax=axes, shrink=0.5)
  image_bytes = io.BytesIO()
  fig.savefig(image_bytes, format="png", dpi=130)
  plt.close(fig)
  fs.write_bytes(path, image_bytes.getvalue())
  return path


def _row_normalised(counts: np.ndarray) -> np.ndarray:
  """Rows of top-k shares (summing to k) as fractions of the task's routing choices (summing to 1)."""
  counts = np.asarray(counts, np.float64)
  return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)


def _short(name: str) -> str:
  """`decoder/layers_1/encoder_decoder_attention/key` -> `dec1 cross/key`."""
  for long, short in (("encoder/layers_", "enc"), ("decoder/layers_", "dec"), ("/encoder_decoder_attention/", " cross/"),
                      ("/self_attention/", " self/"), ("/attention/", " self/"), ("/mlp/", " mlp/")):
    name = name.replace(long, short)
  return name


def _module_order(name: str) -> tuple:
  parts = name.split("/")
  return (parts[0] != "encoder",) + tuple(int(p.split("_")[1]) if p.startswith("layers_") and p[7:].isdigit() else p for p in parts)


def _group_by_kind(shares: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Average over layers: `encoder/layers_3/attention/query` -> `encoder/*/attention/query`."""
  groups: dict[str, list[np.ndarray]] = {}
  for name, value in shares.items():
    key = "/".join("*" if p.startswith("layers_") else p for p in name.split("/"))
    groups.setdefault(key, []).append(value)
  return {k: np.mean(v, axis=0) for k, v in groups.items()}
