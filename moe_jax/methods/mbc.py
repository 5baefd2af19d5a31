"""Model-Based Clustering (MBC; MTTL, Ostapenko et al. 2024): group experts by the similarity of their weights, to
train one new expert per group on the union of its tasks.

Per expert, its flattened LoRA factors (`moe_jax.methods.merging.flatten_experts`) are trimmed to their top `keep`
magnitudes (`merging.trim`, the same trimming as TIES), the E x P matrix is reduced by TruncatedSVD to `dims`
dimensions and the rows L2-normalised; k-means (k-means++, 10 inits) then runs on the ROWS of the E x E cosine
similarity matrix of those embeddings, i.e. each expert is described by its similarities to all experts.

Results are a function of the set of experts, not of their order: embeddings and k-means are computed over the
experts sorted by name (randomized SVD and k-means++ draw from the seed by row index), and clusters are numbered in
order of first appearance of their members in the order given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD

from moe_jax.errors import ConfigError, MismatchError
from moe_jax.methods import merging
from moe_jax.models import experts as ex

AUXILIARY = "mbc_embedding"


def expert_embeddings(flat: Any, keep: float = 0.2, dims: int = 64, seed: int = 42) -> np.ndarray:
  """float64 [E, n] unit-norm embeddings of E flattened experts `flat` [E, P]: trim each row to its top `keep`
  magnitudes (`merging.trim`), TruncatedSVD (scikit-learn's randomized default, as MTTL uses it) with
  random_state=seed to n = min(dims, E, P) components, L2-normalise rows (an all-zero row stays zero).

  n is capped at E because E rows span at most E dimensions: with dims >= E the embedding is an exact rotation of
  the trimmed rows, so their cosine similarities are those of the trimmed experts themselves. (scikit-learn refuses
  more components than P.)"""
  trimmed = merging.trim(flat, keep)
  num = min(dims, *trimmed.shape)
  if num < 1 or trimmed.shape[1] < 2:
    raise ConfigError(f"expert_embeddings: cannot embed {list(trimmed.shape)} experts into {dims} dimensions")
  embedded = TruncatedSVD(n_components=num, random_state=seed).fit_transform(trimmed)
  norm = np.linalg.norm(embedded, axis=1, keepdims=True)
  return embedded / np.where(norm > 0, norm, 1.0)


def _sorted_order(names: Sequence[str]) -> list[int]:
  if len(set(names)) != len(names):
    raise ConfigError(f"expert names repeat: {sorted(n for n in set(names) if list(names).count(n) > 1)}")
  return sorted(range(len(names)), key=lambda i: names[i])


def _clusters(names: Sequence[str], embeddings: np.ndarray, k: int, seed: int) -> dict[int, list[str]]:
  """k-means on the rows of the cosine matrix of `embeddings` (rows of `names` sorted by name; unit or zero rows),
  clusters renumbered 0, 1, ... by first appearance in `names`' order, members in that order."""
  by_name = sorted(names)
  similarity = embeddings @ embeddings.T
  labels = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit(similarity).labels_
  label_of = dict(zip(by_name, labels.tolist()))
  renumber: dict[int, int] = {}
  clusters: dict[int, list[str]] = {}
  for name in names:
    cluster = renumber.setdefault(label_of[name], len(renumber))
    clusters.setdefault(cluster, []).append(name)
  return clusters


def _check_k(k: int, num_experts: int) -> None:
  if not 1 <= k <= num_experts:
    raise ConfigError(f"MBC: k={k} clusters for {num_experts} experts; choose 1 <= k <= {num_experts}")


def cluster_experts(names: Sequence[str], flat: Any, k: int = 10, keep: float = 0.2, dims: int = 64,
                    seed: int = 42) -> dict[int, list[str]]:
  """{cluster: expert names} of the experts `names` whose flattened factors are the rows of `flat` [E, P]: MBC
  with `expert_embeddings(keep, dims, seed)` and KMeans(k, k-means++, n_init=10, random_state=seed) on the rows of
  the cosine similarity matrix. Clusters are numbered by first appearance in `names`, members in `names`' order;
  k-means may leave fewer than k clusters non-empty when experts coincide. ConfigError for k outside [1, E]."""
  names = list(names)
  flat = np.asarray(flat)
  if flat.ndim != 2 or flat.shape[0] != len(names):
    raise MismatchError(f"cluster_experts: {len(names)} names for flattened experts of shape {list(flat.shape)}")
  _check_k(k, len(names))
  order = _sorted_order(names)
  return _clusters(names, expert_embeddings(flat[order], keep, dims, seed), k, seed)


def library_clusters(library: Any, k: int = 10, names: Sequence[str] | None = None, keep: float = 0.2,
                     dims: int = 64, seed: int = 42) -> dict[int, list[str]]:
  """`cluster_experts` over experts of an `ExpertLibrary` (default: all, sorted), each flattened as
  `merging.flatten_experts` does: modules in sorted path order, lora_a then lora_b per module.

  Each expert's embedding is kept as its auxiliary data "mbc_embedding" ({"embedding": [n]}). An embedding depends
  on every expert in the set (one SVD), so its parameters name the set: {"keep", "dims", "seed", "experts" (sorted
  names), "weights" (their weights' SHA-256, so a replaced member invalidates it)}. All embeddings are computed
  together on the first miss."""
  names = list(library.select(names))
  _check_k(k, len(names))
  by_name = [names[i] for i in _sorted_order(names)]
  sha = {entry.info.name: entry.sha256 for entry in library.entries()}
  params = {"keep": keep, "dims": dims, "seed": seed, "experts": by_name, "weights": [sha[n] for n in by_name]}
  computed: list[np.ndarray] = []

  def embeddings() -> np.ndarray:
    if not computed:
      tree = ex.stack([library.get(n).weights for n in by_name], by_name)
      computed.append(expert_embeddings(merging.flatten_experts(tree), keep, dims, seed))
    return computed[0]

  rows = [library.auxiliary(name, AUXILIARY, params, lambda i=i: {"embedding": embeddings()[i]})["embedding"]
          for i, name in enumerate(by_name)]
  return _clusters(names, np.stack(rows).astype(np.float64), k, seed)


def cluster_mixtures(clusters: Mapping[int, Sequence[str]],
                     task_of: Callable[[str], str | Sequence[str]]) -> dict[str, list[str]]:
  """{"mbc_cluster_{i}": the tasks of cluster i's experts}, in cluster order, each task once in member order: the
  task unions to train one new expert per cluster on (MBC does not merge the members). `task_of` gives an expert's
  task (or tasks), e.g. `lambda name: library.info(name).tasks`."""
  out = {}
  for index in sorted(clusters):
    tasks: list[str] = []
    for name in clusters[index]:
      found = task_of(name)
      for task in [found] if isinstance(found, str) else found:
        if task not in tasks:
          tasks.append(task)
    out[f"mbc_cluster_{index}"] = tasks
  return out
