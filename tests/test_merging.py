"""Merges of LoRA experts (`moe_jax.methods.merging`) against results worked out by hand on tiny tensors, and TIES
against a plain float64 loop written from its definition (trim, elect, disjoint mean)."""

import math

import numpy as np
import pytest

from moe_jax.errors import ConfigError, MismatchError
from moe_jax.methods import merged, merging
from moe_jax.models.config import T5Config

# Three experts, six parameters. With keep=0.5 each expert keeps its 3 largest magnitudes:
#   expert 0 keeps 4, 3, 2.5 -> [ 4, 0, 0,  3, 0,  2.5]
#   expert 1 keeps 5, 3, 2.5 -> [-3, 0, 0,  0, 5, -2.5]
#   expert 2 keeps 6, 4, 2   -> [ 2, 6, 0, -4, 0,  0  ]
FLAT = np.array([[4.0, -1.0, 0.0, 3.0, -2.0, 2.5],
                 [-3.0, 2.0, 0.0, 1.0, 5.0, -2.5],
                 [2.0, 6.0, 0.0, -4.0, -1.0, 0.25]])


def test_ties_hand_computed_half():
  # column 0: sum 4 - 3 + 2 = 3 > 0, sign conflict: mean of the positive 4 and 2 = 3
  # column 1: only 6 survives = 6;  column 2: all zero = 0
  # column 3: 3 + 0 - 4 = -1 < 0, sign conflict: mean of -4 alone = -4
  # column 4: expert 0's -2 was trimmed, so only 5 = 5
  # column 5: 2.5 - 2.5 = 0, no elected sign = 0
  np.testing.assert_array_equal(merging.ties_merge(FLAT, keep=0.5), [3.0, 6.0, 0.0, -4.0, 5.0, 0.0])


def test_ties_hand_computed_no_trimming():
  # keep=1.0 trims nothing (zeros stay zeros):
  # column 0: 4 - 3 + 2 > 0 -> (4 + 2) / 2 = 3;  column 1: -1 + 2 + 6 > 0 -> (2 + 6) / 2 = 4;  column 2: 0
  # column 3: 3 + 1 - 4 = 0 -> 0;  column 4: -2 + 5 - 1 > 0 -> 5;  column 5: 2.5 - 2.5 + 0.25 > 0 -> 2.75 / 2
  out = merging.ties_merge(FLAT, keep=1.0)
  np.testing.assert_array_equal(out, [3.0, 4.0, 0.0, 0.0, 5.0, 1.375])
  assert out.dtype == np.float32


def test_ties_hand_computed_small_keep():
  # keep=0.1 of 6 parameters: ceil(0.6) = 1 entry per expert: 4 (column 0), 5 (column 4), 6 (column 1).
  np.testing.assert_array_equal(merging.ties_merge(FLAT, keep=0.1), [4.0, 6.0, 0.0, 0.0, 5.0, 0.0])


def test_ties_default_keep_and_all_zero_column():
  # keep=0.2 of 6: ceil(1.2) = 2 per expert: {4, 3}, {5, -3}, {6, -4}.
  # column 0: 4 - 3 > 0 -> 4;  column 1: 6;  column 3: 3 - 4 < 0 -> -4;  column 4: 5;  columns 2 and 5: 0
  np.testing.assert_array_equal(merging.ties_merge(FLAT), [4.0, 6.0, 0.0, -4.0, 5.0, 0.0])


def test_trim_ties_at_the_threshold_are_all_kept():
  # keep 1 of 4, but all four magnitudes tie at the threshold: all kept; a zero is never kept.
  flat = np.array([[1.0, -1.0, 1.0, -1.0], [0.5, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(merging.trim(flat, 0.25), flat)
  # column 0: 1 + 0.5 > 0 -> 0.75; the rest have a single value
  np.testing.assert_array_equal(merging.ties_merge(flat, 0.25), [0.75, -1.0, 1.0, -1.0])


def test_trim_count_is_not_hurt_by_rounding():
  flat = np.arange(1.0, 11.0)[None]  # 0.7 * 10 = 7.000000000000001 in floating point: still 7 entries
  assert np.count_nonzero(merging.trim(flat, 0.7)) == 7
  assert np.count_nonzero(merging.trim(flat, 0.71)) == 8


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_trim_rejects_bad_keep(keep):
  with pytest.raises(ConfigError):
    merging.ties_merge(FLAT, keep)


def ties_loop(flat, keep):
  """TIES from its definition, one entry at a time, in Python floats."""
  num_experts, num = len(flat), len(flat[0])
  count = max(1, math.ceil(round(keep * num, 6)))
  trimmed = [[0.0] * num for _ in range(num_experts)]
  for e in range(num_experts):
    threshold = sorted((abs(float(v)) for v in flat[e]), reverse=True)[count - 1]
    for j in range(num):
      value = float(flat[e][j])
      if value != 0 and abs(value) >= threshold:
        trimmed[e][j] = value
  out = [0.0] * num
  for j in range(num):
    total = sum(trimmed[e][j] for e in range(num_experts))
    if total == 0:
      continue
    agreeing = [trimmed[e][j] for e in range(num_experts) if trimmed[e][j] * total > 0]
    out[j] = sum(agreeing) / len(agreeing)
  return np.array(out)


@pytest.mark.parametrize("seed", range(12))
def test_ties_matches_a_plain_loop(seed):
  rng = np.random.default_rng(seed)
  num_experts, num = int(rng.integers(1, 6)), int(rng.integers(1, 40))
  if seed % 2:  # small integers: many ties at the threshold, exact zero sums, zeros
    flat = rng.integers(-3, 4, (num_experts, num)).astype(np.float64)
  else:
    flat = rng.normal(size=(num_experts, num)) * (rng.random((num_experts, num)) > 0.2)
  keep = float(rng.choice([0.05, 0.2, 0.37, 0.5, 1.0]))
  np.testing.assert_allclose(merging.ties_merge(flat, keep), ties_loop(flat, keep), rtol=1e-6, atol=1e-7)


def tree(factors):
  """{module: {"lora_a", "lora_b", "router"}} from {module path: (A [E, d_in, r], B [E, r, d_out])}."""
  out = {}
  for path, (a, b) in factors.items():
    node = out
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node.update(lora_a=np.asarray(a, np.float32), lora_b=np.asarray(b, np.float32),
                router=np.ones((np.shape(a)[0], np.shape(a)[1]), np.float32))
  return out


A0, A1 = [[1.0, 2.0], [3.0, 4.0]], [[3.0, 0.0], [1.0, -2.0]]
B0, B1 = [[2.0, 0.0], [0.0, 2.0]], [[0.0, 4.0], [-2.0, 0.0]]
TWO = tree({"encoder/q": ([A0, A1], [B0, B1])})


def test_uniform_parameters_hand_computed():
  out = merging.uniform_parameters(TWO)
  np.testing.assert_array_equal(out["encoder"]["q"]["lora_a"], [[[2.0, 1.0], [2.0, 1.0]]])
  np.testing.assert_array_equal(out["encoder"]["q"]["lora_b"], [[[1.0, 2.0], [-1.0, 1.0]]])
  np.testing.assert_array_equal(out["encoder"]["q"]["router"], np.zeros((1, 2)))


def test_weighted_parameters_are_normalised():
  out = merging.uniform_parameters(TWO, weights=[1.0, 3.0])  # 0.25 and 0.75
  np.testing.assert_array_equal(out["encoder"]["q"]["lora_a"], [[[2.5, 0.5], [1.5, -0.5]]])
  np.testing.assert_array_equal(out["encoder"]["q"]["lora_b"], [[[0.5, 3.0], [-1.5, 0.5]]])
  # one implementation: merged.average_factors with the normalised weights
  same = merged.average_factors(TWO, [0.25, 0.75])
  np.testing.assert_array_equal(out["encoder"]["q"]["lora_a"], same["encoder"]["q"]["lora_a"])


@pytest.mark.parametrize("weights", [[1.0], [0.0, 0.0], [-1.0, 2.0], [np.nan, 1.0]])
def test_bad_weights(weights):
  with pytest.raises(ConfigError):
    merging.uniform_parameters(TWO, weights)


def test_uniform_updates_is_merged_experts_with_normalised_weights():
  kernel = np.arange(4.0, dtype=np.float32).reshape(2, 2)
  config, params = merging.uniform_updates(T5Config(dtype="float32"), {"encoder": {"q": {"kernel": kernel}}}, TWO,
                                           weights=[1.0, 3.0])
  rank = 2
  update = (0.25 * np.array(A0) @ np.array(B0) + 0.75 * np.array(A1) @ np.array(B1)) / rank
  np.testing.assert_allclose(params["encoder"]["q"]["kernel"], kernel + update, rtol=1e-6)
  assert "lora_a" not in params["encoder"]["q"] and not config.delta_modules


def test_router_weights():
  # two modules, top-2 routing over 3 experts: each row sums to 2
  shares = {"a": np.array([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), "b": np.array([[0.0, 1.0, 1.0], [1.0, 0.5, 0.5]])}
  # task 1: mean over modules [1.5, 0.25, 0.25] (sum 2) -> [0.75, 0.125, 0.125]
  np.testing.assert_allclose(merging.router_weights(shares, task=1), [0.75, 0.125, 0.125])
  np.testing.assert_allclose(merging.router_weights({p: s[0] for p, s in shares.items()}), [0.25, 0.5, 0.25])
  np.testing.assert_allclose(merging.router_weights(np.stack([shares["a"][0], shares["b"][0]])), [0.25, 0.5, 0.25])
  assert merging.router_weights([0.2, 0.6]).sum() == pytest.approx(1.0)
  with pytest.raises(MismatchError):
    merging.router_weights(shares)  # [tasks, E] rows without `task`
  with pytest.raises(ConfigError):
    merging.router_weights([0.0, 0.0])


def test_flatten_order_and_round_trip():
  rng = np.random.default_rng(0)
  moe = tree({"encoder/q": (rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 5))),
              "decoder/wo": (rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 4)))})
  flat = merging.flatten_experts(moe)
  # sorted module paths ("decoder/wo" < "encoder/q"), A then B each
  dec, enc = moe["decoder"]["wo"], moe["encoder"]["q"]
  expected = np.concatenate([dec["lora_a"].reshape(3, -1), dec["lora_b"].reshape(3, -1),
                             enc["lora_a"].reshape(3, -1), enc["lora_b"].reshape(3, -1)], axis=1)
  np.testing.assert_array_equal(flat, expected)
  one = merging.unflatten_expert(flat[1], moe)
  for module in (("decoder", "wo"), ("encoder", "q")):
    node, source = one[module[0]][module[1]], moe[module[0]][module[1]]
    np.testing.assert_array_equal(node["lora_a"], source["lora_a"][1:2])
    np.testing.assert_array_equal(node["lora_b"], source["lora_b"][1:2])
    assert node["router"].shape == (1, source["lora_a"].shape[1]) and not node["router"].any()
  with pytest.raises(MismatchError):
    merging.unflatten_expert(flat[1, :-1], moe)


def test_ties_merge_experts():
  rng = np.random.default_rng(1)
  moe = tree({"encoder/q": (rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 5))),
              "decoder/wo": (rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 4)))})
  out = merging.ties_merge_experts(moe, keep=0.3)
  assert out["encoder"]["q"]["lora_a"].shape == (1, 4, 2) and out["encoder"]["q"]["lora_b"].shape == (1, 2, 5)
  assert out["decoder"]["wo"]["lora_a"].shape == (1, 6, 2) and out["decoder"]["wo"]["lora_b"].shape == (1, 2, 4)
  assert out["encoder"]["q"]["lora_a"].dtype == np.float32
  # the trimming is over the whole flattened expert, not per module
  np.testing.assert_array_equal(merging.flatten_experts(out)[0], merging.ties_merge(merging.flatten_experts(moe), 0.3))
  # identical experts merge to themselves (keep=1.0: nothing trimmed)
  same = tree({"encoder/q": ([A0] * 3, [B0] * 3)})
  merged_same = merging.ties_merge_experts(same, keep=1.0)
  np.testing.assert_array_equal(merged_same["encoder"]["q"]["lora_a"], [A0])
  np.testing.assert_array_equal(merged_same["encoder"]["q"]["lora_b"], [B0])
