"""Nearest-neighbour search over unit-norm embeddings (inner product = cosine similarity), behind one interface:
`search(queries [Q, D], k) -> (scores [Q, k] float32, row ids [Q, k] int64)`, best first.

Backends: `DenseSearch`, exact, a jitted matmul and `jax.lax.top_k` on the accelerator (the index of a retrieval
baseline, ~1000 inputs per expert times a few hundred experts, fits any device); `FaissSearch`, faiss on the CPU,
exact (`IndexFlatIP`) or approximate (IVF) for indexes too large to score in full. Ties: among equal scores the
lowest row id wins, both in which rows make the top k and in their order, so the backends agree on duplicated rows.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import ConfigError
from moe_jax.training import partitioning as part

BACKENDS = ("dense", "faiss")


class NeighbourSearch(Protocol):
  """What `make_search` returns, whichever backend: callers (retrieval routing) never depend on which."""

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] float32, row ids [Q, k] int64) of each query's k highest inner products, best first."""


def _matrix(embeddings: Any, name: str) -> np.ndarray:
  array = np.asarray(embeddings, np.float32)
  if array.ndim != 2 or not array.shape[0]:
    raise ConfigError(f"{name}: expected a non-empty [rows, dim] array, got shape {array.shape}")
  return np.ascontiguousarray(array)


def _queries(queries: Any, dim: int, k: int, rows: int, name: str) -> np.ndarray:
  """Queries as [Q, dim] float32, once `k` is known to be answerable from `rows` index rows."""
  queries = np.asarray(queries, np.float32)
  if queries.size == 0:
    queries = queries.reshape(0, dim)  # no queries, however shaped
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ConfigError(f"{name}.search: queries of shape {queries.shape} for an index of dimension {dim}; embed "
                      "them with the index's embedder")
  if not 1 <= k <= rows:
    raise ConfigError(f"{name}.search: k={k} but the index holds {rows} rows; ask for 1 <= k <= {rows}")
  return np.ascontiguousarray(queries)


@functools.partial(jax.jit, static_argnames="k")
def _top_k(index: jax.Array, queries: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # HIGHEST: TF32 on a GPU would perturb scores in the 3rd or 4th digit and reorder near ties.
  scores = jnp.einsum("qd,md->qm", queries, index, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)  # equal scores: the lower index first


class DenseSearch:
  """Exact search with a jitted matmul over query blocks of `block` rows (one compile per k). Inside
  `partitioning.activate` the index is replicated on the mesh and each block's rows are split per its `batch`
  rule (the block is rounded up to a multiple of its shards); elsewhere it lives on the default device."""

  def __init__(self, embeddings: np.ndarray, block: int = 1024):
    self.embeddings = _matrix(embeddings, "DenseSearch")
    if block < 1:
      raise ConfigError(f"DenseSearch: block={block}; queries are scored in blocks of at least one row")
    self.block = block
    self._index = part.ReplicatedOnMesh(self.embeddings)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = _queries(queries, self.embeddings.shape[1], k, len(self.embeddings), "DenseSearch")
    scores, ids = np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    index, rows = self._index.get(), part.batch_rows_on_mesh(self.block)
    for start in range(0, len(queries), rows):
      block = np.zeros((rows, queries.shape[1]), np.float32)
      n = len(queries[start:start + rows])
      block[:n] = queries[start:start + rows]
      top = part.to_host(_top_k(index, part.place_batch(block), k))
      scores[start:start + n], ids[start:start + n] = top[0][:n], top[1][:n]
    return scores, ids


class FaissSearch:
  """Search with faiss (pip: faiss-cpu): exact `IndexFlatIP` by default; with `nlist`, an inverted-file index of
  that many k-means cells (trained on the embeddings) that scans the `nprobe` cells nearest each query, faster and
  approximate. Where fewer than k rows lie in the scanned cells, the missing results have id -1."""

  def __init__(self, embeddings: np.ndarray, nlist: int | None = None, nprobe: int = 8):
    try:
      import faiss  # pylint: disable=g-import-not-at-top  (an optional dependency)
    except ImportError as e:
      raise ConfigError("FaissSearch needs faiss, which is not installed: pip install faiss-cpu, or use "
                        "backend='dense'") from e
    self.embeddings = _matrix(embeddings, "FaissSearch")
    dim = self.embeddings.shape[1]
    if nlist is None:
      self.index = faiss.IndexFlatIP(dim)
    else:
      if not 1 <= nlist <= len(self.embeddings) or nprobe < 1:
        raise ConfigError(f"FaissSearch: nlist={nlist}, nprobe={nprobe} for {len(self.embeddings)} rows; need "
                          "1 <= nlist <= rows (k-means needs a row per cell) and nprobe >= 1")
      self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
      self.index.train(self.embeddings)
      self.index.nprobe = nprobe
    self.index.add(self.embeddings)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = _queries(queries, self.embeddings.shape[1], k, len(self.embeddings), "FaissSearch")
    scores, ids = self.index.search(queries, k)
    # faiss keeps the lowest ids among tied scores but may list them highest first: order as DenseSearch does.
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1).astype(np.int64)


def make_search(embeddings: np.ndarray, backend: str = "dense", **options: Any) -> NeighbourSearch:
  """A search over `embeddings` [M, D] with `backend` "dense" (`DenseSearch`; option `block`) or "faiss"
  (`FaissSearch`; options `nlist`, `nprobe`)."""
  if backend == "dense":
    return DenseSearch(embeddings, **options)
  if backend == "faiss":
    return FaissSearch(embeddings, **options)
  raise ConfigError(f"make_search: backend={backend!r}; expected one of {BACKENDS}")
