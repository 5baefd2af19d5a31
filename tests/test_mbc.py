"""Model-Based Clustering (`moe_jax.methods.mbc`): embeddings against scikit-learn run by hand, properties that only
a working implementation has (cosine structure kept exactly when dims >= E; well-separated groups recovered), and
clustering a small in-memory expert library with cached embeddings."""

import numpy as np
import pytest
from sklearn.decomposition import TruncatedSVD

from moe_jax.errors import ConfigError
from moe_jax.library import ExpertInfo, ExpertLibrary, make_expert
from moe_jax.methods import mbc, merging


def trim_loop(flat, keep):
  """Top-`keep` magnitudes per row from the definition: n = ceil(keep * P); ties at the threshold kept."""
  out = np.zeros_like(flat, dtype=np.float64)
  for e, row in enumerate(flat):
    count = max(1, int(np.ceil(round(keep * len(row), 6))))
    threshold = sorted(np.abs(row), reverse=True)[count - 1]
    for j, value in enumerate(row):
      if value != 0 and abs(value) >= threshold:
        out[e, j] = value
  return out


def groups(sizes, num=300, noise=0.1, seed=0):
  """Experts made of well-separated groups: a shared random direction per group plus small noise."""
  rng = np.random.default_rng(seed)
  rows, labels = [], []
  for g, size in enumerate(sizes):
    direction = rng.normal(size=num)
    for _ in range(size):
      rows.append(direction * rng.uniform(0.5, 2.0) + noise * rng.normal(size=num))
      labels.append(g)
  return np.array(rows), labels


def partition(clusters):
  return {frozenset(members) for members in clusters.values()}


def test_embeddings_match_sklearn_by_hand():
  flat = np.random.default_rng(0).normal(size=(7, 50))
  out = mbc.expert_embeddings(flat, keep=0.2, dims=4, seed=42)
  expected = TruncatedSVD(n_components=4, random_state=42).fit_transform(trim_loop(flat, 0.2))
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)


def test_embeddings_keep_the_trimmed_cosines_when_dims_cover_the_experts():
  # dims >= E: n = E components, an exact rotation of the trimmed rows, so cosines are the trimmed experts' own
  flat = np.random.default_rng(1).normal(size=(5, 40))
  out = mbc.expert_embeddings(flat, keep=0.3, dims=64)
  assert out.shape == (5, 5)
  trimmed = trim_loop(flat, 0.3)
  unit = trimmed / np.linalg.norm(trimmed, axis=1, keepdims=True)
  np.testing.assert_allclose(out @ out.T, unit @ unit.T, atol=1e-9)
  assert mbc.expert_embeddings(flat[:, :3], keep=1.0).shape == (5, 3)  # capped at P too


def test_recovers_separated_groups():
  flat, labels = groups([4, 3, 5])
  order = np.random.default_rng(2).permutation(len(labels))  # interleave the groups
  names = [f"expert_{i}" for i in range(len(labels))]
  clusters = mbc.cluster_experts([names[i] for i in order], flat[order], k=3)
  truth = {frozenset(n for n, g in zip(names, labels) if g == group) for group in range(3)}
  assert partition(clusters) == truth
  # numbered by first appearance, members in the given order
  given = [names[i] for i in order]
  assert clusters[0][0] == given[0]
  for members in clusters.values():
    assert members == sorted(members, key=given.index)


def test_deterministic_and_order_free():
  flat, _ = groups([3, 3, 3, 3], noise=1.0, seed=4)  # noisy: k-means has real choices to make
  names = [f"e{i}" for i in range(len(flat))]
  first = mbc.cluster_experts(names, flat, k=4, dims=5, seed=7)
  assert mbc.cluster_experts(names, flat, k=4, dims=5, seed=7) == first
  reverse = mbc.cluster_experts(names[::-1], flat[::-1], k=4, dims=5, seed=7)
  assert partition(reverse) == partition(first)


def test_bad_k_and_names():
  flat, _ = groups([2, 2])
  names = ["a", "b", "c", "d"]
  with pytest.raises(ConfigError):
    mbc.cluster_experts(names, flat, k=5)
  with pytest.raises(ConfigError):
    mbc.cluster_experts(names, flat, k=0)
  with pytest.raises(ConfigError):
    mbc.cluster_experts(["a", "a", "c", "d"], flat, k=2)
  with pytest.raises(ValueError):
    mbc.cluster_experts(names[:3], flat, k=2)


def test_cluster_mixtures():
  tasks = {"a": "t1", "b": "t2", "c": "t1", "d": ("t3", "t4")}
  assert mbc.cluster_mixtures({1: ["d"], 0: ["a", "b", "c"]}, tasks.__getitem__) == {
      "mbc_cluster_0": ["t1", "t2"], "mbc_cluster_1": ["t3", "t4"]}


def expert_tree(rng, direction, d=6, r=2):
  """One expert on two modules whose flattened factors are `direction` scaled plus noise."""
  vector = direction * rng.uniform(0.5, 2.0) + 0.05 * rng.normal(size=direction.size)
  sizes = [d * r, r * d, d * r, r * d]
  a0, b0, a1, b1 = np.split(vector, np.cumsum(sizes)[:-1])
  return {"decoder": {"wo": {"lora_a": a0.reshape(1, d, r), "lora_b": b0.reshape(1, r, d),
                             "router": np.zeros((1, d))}},
          "encoder": {"q": {"lora_a": a1.reshape(1, d, r), "lora_b": b1.reshape(1, r, d),
                            "router": np.zeros((1, d))}}}


def test_library_clusters(monkeypatch):
  rng = np.random.default_rng(5)
  directions = [rng.normal(size=48) for _ in range(3)]
  library = ExpertLibrary(f"virtual://mbc-test-{rng.integers(1 << 30)}")
  names = ["qa_1", "summ_1", "nli_1", "qa_2", "summ_2", "nli_2"]
  for i, name in enumerate(names):
    tree = {k: {m: {leaf: v.astype(np.float32) for leaf, v in node.items()} for m, node in sub.items()}
            for k, sub in expert_tree(rng, directions[i % 3]).items()}
    library.add(make_expert(ExpertInfo(name, tasks=[f"{name.split('_')[0]}_task_{name[-1]}"]), tree))
  clusters = mbc.library_clusters(library, k=3, dims=8)
  assert partition(clusters) == {frozenset({"nli_1", "nli_2"}), frozenset({"qa_1", "qa_2"}),
                                 frozenset({"summ_1", "summ_2"})}
  # the embeddings are the ones computed from the flattened experts, stored per expert
  flat = np.stack([merging.flatten_experts(library.get(n).weights)[0] for n in sorted(names)])
  embeddings = mbc.expert_embeddings(flat, dims=8)
  params = {"keep": 0.2, "dims": 8, "seed": 42, "experts": sorted(names),
            "weights": [e.sha256 for e in library.entries()]}
  for i, name in enumerate(sorted(names)):
    np.testing.assert_allclose(library.get_auxiliary(name, "mbc_embedding", params)["embedding"], embeddings[i])
  # a second run reads them back instead of recomputing
  monkeypatch.setattr(mbc, "expert_embeddings", lambda *a, **k: pytest.fail("recomputed cached embeddings"))
  assert mbc.library_clusters(library, k=3, dims=8) == clusters
  mixtures = mbc.cluster_mixtures(clusters, lambda n: library.info(n).tasks)
  assert sorted(map(sorted, mixtures.values())) == [["nli_task_1", "nli_task_2"], ["qa_task_1", "qa_task_2"],
                                                    ["summ_task_1", "summ_task_2"]]
