"""Nearest-neighbour search: both backends return a float64 NumPy top-k's rows and scores on random data and on
crafted ties (lowest row id first, in and at the edge of the top k), for k > 1 and query counts that are not a
multiple of the block; DenseSearch gives the same on a mesh of 4 virtual CPU devices (run as a script in a fresh
interpreter, since the devices need XLA_FLAGS before JAX starts)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.methods.neighbours import DenseSearch, FaissSearch, make_search
from moe_jax.training import partitioning as part

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
DIM = 24


def _unit(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _random(seed: int, rows: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return _unit(rng.normal(size=(rows, DIM))), _unit(rng.normal(size=(queries, DIM)))


def _ties() -> tuple[np.ndarray, np.ndarray]:
  """An index with 6 copies of e0 and 3 of e1 among random rows, and queries e0, e1 and (e0 + e1)/sqrt(2): their
  scores against the copies are exactly equal (one nonzero product each), so the tie rule alone decides."""
  index, _ = _random(1, 40, 0)
  eye = np.eye(DIM, dtype=np.float32)
  for row in (3, 7, 8, 20, 31, 39):
    index[row] = eye[0]
  for row in (2, 11, 25):
    index[row] = eye[1]
  return index, np.stack([eye[0], eye[1], _unit(eye[0] + eye[1]), eye[1]])


def _reference(index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """float64 scores; a stable sort, so among equal scores the lower row comes first."""
  scores = queries.astype(np.float64) @ index.astype(np.float64).T
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, 1), ids


def _backends() -> list[tuple[str, dict]]:
  return [("dense", {"block": 16}), ("faiss", {})]


def _make(index: np.ndarray, backend: str, options: dict):
  if backend == "faiss":
    pytest.importorskip("faiss")
  return make_search(index, backend, **options)


@pytest.mark.parametrize("backend,options", _backends())
@pytest.mark.parametrize("k", [1, 5])
def test_matches_numpy_top_k_on_random_data(backend, options, k):
  index, queries = _random(0, 300, 37)  # 37 queries: two full blocks of 16 and a partial one
  scores, ids = _make(index, backend, options).search(queries, k)
  want_scores, want_ids = _reference(index, queries, k)
  assert scores.shape == ids.shape == (37, k) and scores.dtype == np.float32 and ids.dtype == np.int64
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("backend,options", _backends())
def test_ties_go_to_the_lowest_row(backend, options):
  index, queries = _ties()
  scores, ids = _make(index, backend, options).search(queries, 4)
  want_scores, want_ids = _reference(index, queries, 4)
  np.testing.assert_array_equal(ids[0], [3, 7, 8, 20])  # 6 tied copies of e0: the 4 lowest rows, in order
  np.testing.assert_array_equal(ids[1, :3], [2, 11, 25])
  np.testing.assert_array_equal(ids[2, :4], [2, 3, 7, 8])  # e0's and e1's copies all tie for (e0 + e1)/sqrt(2)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, atol=1e-6)


def test_ivf_scanning_every_cell_is_exact():
  pytest.importorskip("faiss")
  index, queries = _random(2, 400, 9)
  scores, ids = FaissSearch(index, nlist=4, nprobe=4).search(queries, 3)
  want_scores, want_ids = _reference(index, queries, 3)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("backend,options", _backends())
def test_no_queries_and_bad_arguments(backend, options):
  index, queries = _random(3, 10, 2)
  search = _make(index, backend, options)
  scores, ids = search.search(np.zeros((0, DIM), np.float32), 3)
  assert scores.shape == ids.shape == (0, 3)
  with pytest.raises(ConfigError, match="k=11"):
    search.search(queries, 11)
  with pytest.raises(ConfigError, match="dimension 24"):
    search.search(queries[:, :5], 1)


def test_unknown_backend():
  with pytest.raises(ConfigError, match="backend='annoy'"):
    make_search(np.eye(3, dtype=np.float32), "annoy")


def _check_mesh() -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  index, queries = _random(0, 300, 37)
  search = DenseSearch(index, block=6)  # rounded up to 8 rows: 2 per device
  plain = search.search(queries, 3)
  with part.activate(part.make_mesh(data=2, fsdp=2), part.axis_rules()):
    assert part.batch_rows_on_mesh(search.block) == 8
    sharded = search.search(queries, 3)
    assert len(search._index.get().sharding.device_set) == DEVICES  # pylint: disable=protected-access
  np.testing.assert_array_equal(sharded[1], plain[1])
  np.testing.assert_array_equal(sharded[1], _reference(index, queries, 3)[1])
  np.testing.assert_allclose(sharded[0], plain[0], atol=1e-6)
  print("neighbours mesh OK")


def test_dense_search_on_a_mesh():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "neighbours mesh OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]


if __name__ == "__main__":
  _check_mesh()
