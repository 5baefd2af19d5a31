"""Plots a person would rather look at than read: where each task's tokens are routed, module by module."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np


def plot_routing(shares: Mapping[str, np.ndarray], task_names: Sequence[str], expert_names: Sequence[str],
                 path: str, max_panels: int = 48) -> str:
  """One heatmap per expert module: rows are tasks, columns experts, cells the share of the task's tokens routed
  to the expert (each row sums to 1 with top-1 routing, to k with top-k). With more modules than `max_panels`,
  modules of the same kind in a stack (e.g. every `encoder/*/attention/query`) are averaged per layer group.
  Writes a PNG atomically and returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = dict(shares)
  if len(panels) > max_panels:
    panels = _group_by_kind(panels)
  names = sorted(panels, key=_module_order)
  cols = min(6, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 1.5, 0.22 * len(task_names) * rows + 1.2 * rows),
                           squeeze=False)
  vmax = max(float(np.max(v)) for v in panels.values()) or 1.0
  image = None
  for ax, name in zip(axes.flat, names):
    image = ax.imshow(panels[name], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(name, fontsize=7)
    ax.set_xticks(range(len(expert_names)))
    ax.set_xticklabels(expert_names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(task_names)))
    ax.set_yticklabels(task_names, fontsize=5)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle("Share of each task's tokens routed to each expert (rows: tasks, columns: experts)", fontsize=9)
  fig.colorbar(image, ax=axes, shrink=0.6)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=130)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def _module_order(name: str) -> tuple:
  parts = name.split("/")
  return tuple(int(p.split("_")[1]) if p.startswith("layers_") and p[7:].isdigit() else p for p in parts)


def _group_by_kind(shares: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Average over layers: `encoder/layers_3/attention/query` -> `encoder/*/attention/query`."""
  groups: dict[str, list[np.ndarray]] = {}
  for name, value in shares.items():
    key = "/".join("*" if p.startswith("layers_") else p for p in name.split("/"))
    groups.setdefault(key, []).append(value)
  return {k: np.mean(v, axis=0) for k, v in groups.items()}
