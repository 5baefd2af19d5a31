"""Plots a person would rather look at than read: where each task's tokens are routed, module by module, and how
often that is the task's own expert."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from moe_jax import fs

if TYPE_CHECKING:  # the routing module pulls in jax; a plot needs only its result
  from moe_jax.methods.routing import Diagnostics


def task_label(name: str) -> str:
  """A task's name in tables and legends, without the built-in suites' prefix (`synthetic_`, `demo_`)."""
  return name.removeprefix("synthetic_").removeprefix("demo_")


def plot_routing(shares: Mapping[str, np.ndarray], task_names: Sequence[str], expert_names: Sequence[str],
                 path: str, max_panels: int = 48) -> str:
  """One heatmap per expert module: rows are tasks, columns experts, cells the fraction of the task's routing
  choices (tokens x k) that went to the expert, so each row sums to 1. With more modules than `max_panels`,
  modules of the same kind in a stack (e.g. every `encoder/*/attention/query`) are averaged per layer group.
  Writes a PNG atomically (`moe_jax.fs`: a local path or a URL) and returns its path."""
  plt = _pyplot()
  panels = {name: _row_normalised(v) for name, v in shares.items()}
  if len(panels) > max_panels:
    panels = _group_by_kind(panels)
  names = sorted(panels, key=_module_order)
  tasks = [task_label(t) for t in task_names]
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
  return _save_png(fig, path)


def plot_routing_diagnostics(diagnostics: Diagnostics, tasks: Sequence[str], path: str) -> str:
  """Two panels over the expert modules in model order: the share of each task's routing choices that go to its
  own expert (tasks with one; dashed: chance, 1/E) and each task's routing entropy (dashed: its maximum, log2 E),
  so one sees in which layers routing finds the task's expert. Writes a PNG atomically and returns its path."""
  plt = _pyplot()
  modules = diagnostics["modules"]
  names = sorted(modules, key=_module_order)
  x = np.arange(len(names))
  fig, (own_ax, entropy_ax) = plt.subplots(2, 1, figsize=(min(4 + 0.14 * len(names), 40), 7.5), sharex=True,
                                           constrained_layout=True)
  colors = plt.cm.tab10 if len(tasks) <= 10 else plt.cm.tab20  # one color per task, the same in both panels
  for i, task in enumerate(tasks):
    style = dict(marker=".", color=colors(i % colors.N), label=task_label(task))
    own = np.array([modules[n]["own_share"][task] for n in names])
    if not np.all(np.isnan(own)):
      own_ax.plot(x, own, **style)
    entropy_ax.plot(x, [modules[n]["entropy"][task] for n in names], **style)
  own_ax.axhline(diagnostics["chance_share"], color="gray", linestyle="--", label="chance (1/E)")
  entropy_ax.axhline(diagnostics["max_entropy"], color="gray", linestyle="--", label="max (log2 E)")
  own_ax.set(ylabel="share of routing choices\nto the task's own expert", ylim=(0.0, 1.02))
  # One expert (an MBC library of one cluster) has no entropy to show: keep the axis from collapsing to 0.
  entropy_ax.set(ylabel="routing entropy (bits)", ylim=(0.0, max(1.05 * diagnostics["max_entropy"], 0.1)))
  decoder = [i for i, n in enumerate(names) if n.startswith("decoder/")]
  for ax in (own_ax, entropy_ax):
    if decoder and decoder[0] > 0:
      ax.axvline(decoder[0] - 0.5, color="black", linewidth=0.8, linestyle=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  step = math.ceil(len(names) / 280)  # past the widest figure, label every step-th module so labels stay legible
  entropy_ax.set_xticks(x[::step])
  entropy_ax.set_xticklabels([_short(n) for n in names[::step]], rotation=90, fontsize=6)
  fig.suptitle("PHATGOOSE routing per expert module (dotted line: encoder stack | decoder stack)", fontsize=9)
  return _save_png(fig, path)


def _pyplot():
  """matplotlib.pyplot on the Agg backend: plots are written to files, on machines without a display."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save_png(fig, path: str) -> str:
  """Write `fig` as a PNG atomically (`moe_jax.fs`: a local path or a URL), close it and return `path`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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
