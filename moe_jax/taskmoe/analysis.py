"""What a trained task-level MoE learnt to route: each task's route per layer, and which tasks route alike.

`task_routes` reads the routes a model uses for a task at evaluation (one-hot for Gumbel's argmax and the random
routings, the softmax at tau 1 for softmax routing, uniform for average; random-instance routes averaged over the
task's examples) and, for learnt routers, the router's probabilities softmax(logits) (the soft routes behind a
Gumbel argmax, which separate tasks that share an argmax). `write_routing_analysis` writes:
  routes.json             {"layers": [...], "tasks": {task: {"routes": [[...m] per layer], "probabilities": ...}}}
  routing_heatmaps.png    one panel per layer: rows are tasks, columns the layer's copies, cells the route weight
  routing_clusters.png    tasks clustered by route similarity (average-linkage hierarchical clustering of the
                          concatenated per-layer routes, cosine distance): the dendrogram and the task x task
                          similarity matrix in dendrogram order, as the paper's figure 5 groups tasks
  routing_clusters.json   the dendrogram order and the linkage matrix
Plots go through `moe_jax.plots` (Agg backend, atomic PNG writes via `moe_jax.fs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import fs
from moe_jax.models import interface
from moe_jax.models.taskmoe import TaskMoE
from moe_jax.plots import _pyplot, _save_png, task_label


def layer_names(model: TaskMoE) -> list[str]:
  cfg = model.config
  return [f"enc{i}" for i in range(cfg.num_encoder_layers)] + [f"dec{i}" for i in range(cfg.num_decoder_layers)]


def task_routes(model: TaskMoE, params: Any, task_id: int | None,
                inputs: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{"routes": [layers, m]} for one task (plus "probabilities" [layers, m] for learnt routers). A routing that
  samples at evaluation needs the task's example `inputs` [N, L]: its routes are averaged over them."""
  ids = None if task_id is None else jnp.asarray([task_id], jnp.int32)
  if interface.samples_routes_at_eval(model):
    if inputs is None:
      raise ValueError(f"routing={model.moe.routing!r} draws a route per example: pass the task's inputs")
    tiled = None if ids is None else jnp.full((len(inputs),), task_id, jnp.int32)
    routes = interface.eval_routes(model, params, jnp.asarray(inputs, jnp.int32), tiled)
    out = {"routes": np.asarray(jnp.mean(routes, axis=0), np.float64)}
  else:
    routes = model.apply({"params": params}, ids, 1, True, None, method="routes")
    out = {"routes": np.asarray(routes[0], np.float64)}
  if model.moe.routing in ("gumbel", "softmax"):
    soft = TaskMoE(model.config, dataclasses.replace(model.moe, routing="softmax", temperature=1.0))
    out["probabilities"] = np.asarray(soft.apply({"params": params}, ids, 1, True, None, method="routes")[0],
                                      np.float64)
  return out


def cluster(vectors: np.ndarray) -> dict[str, Any]:
  """Average-linkage hierarchical clustering of row vectors by cosine distance (scipy): the linkage matrix, the
  dendrogram's leaf order and the cosine similarity matrix. Identical or zero rows are fine."""
  from scipy.cluster import hierarchy  # pylint: disable=g-import-not-at-top
  from scipy.spatial import distance  # pylint: disable=g-import-not-at-top

  vectors = np.asarray(vectors, np.float64)
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  unit = vectors / np.where(norms > 0, norms, 1.0)
  similarity = np.clip(unit @ unit.T, -1.0, 1.0)
  if len(vectors) < 2:
    return {"linkage": np.zeros((0, 4)), "order": list(range(len(vectors))), "similarity": similarity}
  condensed = np.clip(distance.squareform(1.0 - similarity, checks=False), 0.0, None)
  linkage = hierarchy.linkage(condensed, method="average", optimal_ordering=True)
  return {"linkage": linkage, "order": [int(i) for i in hierarchy.leaves_list(linkage)], "similarity": similarity}


def plot_route_heatmaps(routes: Mapping[str, np.ndarray], layers: Sequence[str], path: str, title: str = "") -> str:
  """One panel per layer (encoder layers first): rows tasks, columns copies, cell = route weight in [0, 1]."""
  plt = _pyplot()
  tasks = list(routes)
  stacked = np.stack([routes[t] for t in tasks])  # [tasks, layers, m]
  copies = stacked.shape[2]
  cols = min(6, len(layers))
  rows = math.ceil(len(layers) / cols)
  size = (1.8 + (0.35 * copies + 0.4) * cols, 1.0 + (0.2 * len(tasks) + 0.8) * rows)
  fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharey=True, constrained_layout=True)
  image = None
  for index, (ax, layer) in enumerate(zip(axes.flat, layers)):
    image = ax.imshow(stacked[:, index], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(layer, fontsize=8)
    ax.set_xticks(range(copies))
    ax.set_xticklabels([str(k) for k in range(copies)], fontsize=6)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels([task_label(t) for t in tasks], fontsize=6)
  for ax in list(axes.flat)[len(layers):]:
    ax.axis("off")
  fig.suptitle(title or "Task-level routes per layer (rows: tasks, columns: layer copies)", fontsize=9)
  fig.colorbar(image, ax=axes, shrink=0.5)
  return _save_png(fig, path)


def plot_route_clusters(names: Sequence[str], clustered: Mapping[str, Any], path: str, title: str = "") -> str:
  """The dendrogram of `cluster` beside the cosine-similarity matrix of the tasks' routes in dendrogram order."""
  from scipy.cluster import hierarchy  # pylint: disable=g-import-not-at-top

  plt = _pyplot()
  labels = [task_label(n) for n in names]
  order = clustered["order"]
  size = 2.5 + 0.25 * len(names)
  fig, (tree_ax, matrix_ax) = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), constrained_layout=True,
                                           gridspec_kw={"width_ratios": [1, 1.3]})
  if len(names) > 1:
    hierarchy.dendrogram(clustered["linkage"], labels=labels, orientation="left", ax=tree_ax, color_threshold=0,
                         above_threshold_color="black")
    tree_ax.set_xlabel("cosine distance (average linkage)", fontsize=7)
    tree_ax.tick_params(labelsize=6)
  else:
    tree_ax.axis("off")
  matrix = np.asarray(clustered["similarity"])[np.ix_(order, order)]
  image = matrix_ax.imshow(matrix, cmap="magma", vmin=min(0.0, float(matrix.min())), vmax=1.0,
                           interpolation="nearest", origin="lower")  # row 0 at the bottom, as the dendrogram's
  matrix_ax.set_xticks(range(len(order)))
  matrix_ax.set_xticklabels([labels[i] for i in order], rotation=90, fontsize=6)
  matrix_ax.set_yticks(range(len(order)))
  matrix_ax.set_yticklabels([labels[i] for i in order], fontsize=6)
  fig.colorbar(image, ax=matrix_ax, shrink=0.6, label="cosine similarity of routes")
  fig.suptitle(title or "Tasks clustered by route similarity", fontsize=9)
  return _save_png(fig, path)


def write_routing_analysis(output_dir: str, routes: Mapping[str, Mapping[str, np.ndarray]], layers: Sequence[str],
                           title: str = "") -> dict[str, str]:
  """Write routes.json, routing_heatmaps.png, routing_clusters.png and routing_clusters.json (see the module
  docstring) for `routes` {task: task_routes(...)}; returns {what: path}. Clusters read the router's
  probabilities when every task has them, else the routes."""
  if not routes:
    return {}
  if jax.process_index() != 0:
    return {}
  names = list(routes)
  key = "probabilities" if all("probabilities" in r for r in routes.values()) else "routes"
  record = {"layers": list(layers), "clustered_by": key,
            "tasks": {t: {k: np.asarray(v).tolist() for k, v in r.items()} for t, r in routes.items()}}
  paths = {"routes": fs.join(output_dir, "routes.json"), "heatmaps": fs.join(output_dir, "routing_heatmaps.png"),
           "clusters": fs.join(output_dir, "routing_clusters.png"),
           "clusters_json": fs.join(output_dir, "routing_clusters.json")}
  fs.write_text(paths["routes"], json.dumps(record, indent=1) + "\n")
  plot_route_heatmaps({t: r["routes"] for t, r in routes.items()}, layers, paths["heatmaps"], title)
  clustered = cluster(np.stack([np.asarray(routes[t][key]).reshape(-1) for t in names]))
  plot_route_clusters(names, clustered, paths["clusters"], f"{title}: tasks clustered by route {key}" if title
                      else "")
  order = [names[i] for i in clustered["order"]]
  fs.write_text(paths["clusters_json"], json.dumps({"clustered_by": key, "order": order,
                                                    "linkage": np.asarray(clustered["linkage"]).tolist()}) + "\n")
  return paths
