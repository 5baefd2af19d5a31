"""PHATGOOSE routing diagnostics (own-expert share, routing entropy, oracle gap) on shares written by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from moe_jax.methods.routing import comparison_markdown, diagnostics_markdown, router_agreement, routing_diagnostics
from moe_jax.plots import plot_routing_diagnostics

EXPERTS = ["synthetic_a", "synthetic_b", "synthetic_c"]
TASKS = ["synthetic_a", "synthetic_b_heldout", "synthetic_d"]  # own expert 0, 1 (its skill's), none
ENCODER, CROSS_KEY, MLP = "encoder/layers_0/attention/query", "decoder/layers_0/encoder_decoder_attention/key", \
    "decoder/layers_0/mlp/wi"
# top-2 routing: each row (a task) sums to 2 over the 3 experts
SHARES = {
    ENCODER: np.array([[1.5, 0.25, 0.25], [0.5, 1.0, 0.5], [0.0, 1.0, 1.0]]),
    CROSS_KEY: np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]),
    MLP: np.array([[1.0, 0.5, 0.5], [0.2, 1.6, 0.2], [2 / 3, 2 / 3, 2 / 3]]),
}
# shares[task, own] / 2, by hand
OWN = {ENCODER: [0.75, 0.5], CROSS_KEY: [0.5, 0.5], MLP: [0.5, 0.8]}


@pytest.fixture(name="diagnostics")
def diagnostics_fixture():
  return routing_diagnostics(SHARES, TASKS, EXPERTS, top_k=2)


def test_per_module_own_share_and_entropy(diagnostics):
  assert diagnostics["chance_share"] == pytest.approx(1 / 3)
  assert diagnostics["max_entropy"] == pytest.approx(math.log2(3))
  assert set(diagnostics["modules"]) == set(SHARES)
  for path, value in SHARES.items():
    measures = diagnostics["modules"][path]
    for i, task in enumerate(TASKS):
      assert measures["entropy"][task] == pytest.approx(stats.entropy(value[i], base=2), abs=1e-12)
    assert [measures["own_share"][t] for t in TASKS[:2]] == pytest.approx(OWN[path], abs=1e-12)
    assert math.isnan(measures["own_share"]["synthetic_d"])
  # by hand: [3/4, 1/8, 1/8] -> 3/4 log2(4/3) + 2/8 * 3; [0, 1/2, 1/2] -> 1 bit (0 log 0 = 0); uniform -> log2 3
  assert diagnostics["modules"][ENCODER]["entropy"]["synthetic_a"] == pytest.approx(0.75 * math.log2(4 / 3) + 0.75)
  assert diagnostics["modules"][ENCODER]["entropy"]["synthetic_d"] == pytest.approx(1.0)
  assert diagnostics["modules"][MLP]["entropy"]["synthetic_d"] == pytest.approx(math.log2(3))


def test_summary_sides(diagnostics):
  """Cross-attention key routes encoder positions, so it counts on the encoder side."""
  summary = diagnostics["summary"]
  assert summary["encoder"]["own_share"]["synthetic_a"] == pytest.approx((0.75 + 0.5) / 2)
  assert summary["decoder"]["own_share"]["synthetic_b_heldout"] == pytest.approx(0.8)
  assert summary["all"]["own_share"]["synthetic_b_heldout"] == pytest.approx((0.5 + 0.5 + 0.8) / 3)
  for side in ("encoder", "decoder", "all"):
    assert math.isnan(summary[side]["own_share"]["synthetic_d"])
  paths = {"encoder": [ENCODER, CROSS_KEY], "decoder": [MLP], "all": list(SHARES)}
  for side, members in paths.items():
    for i, task in enumerate(TASKS):
      expected = np.mean([stats.entropy(SHARES[p][i], base=2) for p in members])
      assert summary[side]["entropy"][task] == pytest.approx(expected, abs=1e-12)


def test_side_without_modules_is_nan():
  summary = routing_diagnostics({MLP: SHARES[MLP]}, TASKS, EXPERTS, top_k=2)["summary"]
  assert math.isnan(summary["encoder"]["entropy"]["synthetic_a"])
  assert summary["all"]["own_share"]["synthetic_a"] == pytest.approx(0.5)


def test_own_expert_callable():
  own = routing_diagnostics(SHARES, TASKS, EXPERTS, top_k=2, own_expert=lambda t: 2)["modules"][ENCODER]["own_share"]
  assert [own[t] for t in TASKS] == pytest.approx([0.125, 0.25, 0.5])


def test_markdown(diagnostics):
  table = {"phatgoose": {"synthetic_a": 70.0, "synthetic_b_heldout": 40.0, "synthetic_d": 10.0},
           "oracle": {"synthetic_a": 90.0, "synthetic_b_heldout": 35.5, "synthetic_d": 12.0}}
  text = diagnostics_markdown(diagnostics, table, TASKS)
  lines = text.splitlines()
  header = next(line for line in lines if line.startswith("| task"))
  assert "max 1.58" in header and "oracle gap" in header
  entropy_a = np.mean([stats.entropy(v[0], base=2) for v in SHARES.values()])
  # encoder (0.75 + 0.5) / 2, decoder 0.5, all (0.75 + 0.5 + 0.5) / 3; gap 90 - 70
  assert f"| a | 62.5 | 50.0 | 58.3 | {entropy_a:.2f} | +20.0 |" in lines
  assert "| b_heldout | 50.0 | 80.0 | 60.0 |" in text and "| -4.5 |" in text
  assert any(line.startswith("| d | n/a | n/a | n/a |") and line.endswith("| +2.0 |") for line in lines)
  assert "Chance share 1/E = 33.3%" in text and "log2(E) = 1.58 bits" in text

  without_oracle = diagnostics_markdown(diagnostics, {"phatgoose": table["phatgoose"]}, TASKS)
  assert "oracle gap" not in without_oracle
  assert f"| a | 62.5 | 50.0 | 58.3 | {entropy_a:.2f} |" in without_oracle.splitlines()


def test_plot_written(diagnostics, tmp_path):
  path = str(tmp_path / "plots" / "routing_diagnostics.png")
  assert plot_routing_diagnostics(diagnostics, TASKS, path) == path
  with open(path, "rb") as f:
    data = f.read()
  assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")
  assert not list((tmp_path / "plots").glob("*.tmp-*"))


def test_router_agreement_is_the_correlation_of_the_vectors():
  """Per module and expert, the Pearson correlation of the two router vectors (scipy as the reference); a vector
  and a scaled, shifted copy agree fully, whatever the scale PHATGOOSE's standardisation removes."""
  rng = np.random.default_rng(0)
  gates = rng.normal(size=(3, 8))
  other = np.stack([2.0 * gates[0] + 1.0, -gates[1], rng.normal(size=8)])
  tree = lambda v: {"encoder": {"layers_0": {"attention": {"query": {"router": v, "lora_a": np.zeros((3, 8, 2))}}}}}
  agreement = router_agreement(tree(gates), tree(other))
  assert list(agreement) == [ENCODER]
  expected = [stats.pearsonr(gates[i], other[i])[0] for i in range(3)]
  np.testing.assert_allclose(agreement[ENCODER], expected, rtol=0, atol=1e-6)  # float32 vectors
  np.testing.assert_allclose(agreement[ENCODER][:2], [1.0, -1.0], rtol=0, atol=1e-6)


def test_comparison_markdown(diagnostics):
  other = routing_diagnostics({k: v[:, ::-1] for k, v in SHARES.items()}, TASKS, EXPERTS, top_k=2)
  text = comparison_markdown(["phatgoose", "average_activation", "arrow"], [diagnostics, other, other], ["synthetic_a"],
                             {"average_activation": {ENCODER: np.array([0.5, 0.3, 0.1]), MLP: np.array([1.0, 1.0, 1.0])},
                              "arrow": {MLP: np.array([0.2, 0.2, 0.2])}})
  # synthetic_a's own expert is 0: encoder side (ENCODER, CROSS_KEY) 0.75, 0.5; decoder side (MLP) 0.5
  assert "| phatgoose | 62.5 | 50.0 | 58.3 |" in text
  # reversed columns: expert 0 gets what expert 2 got: 0.25/2, 1/2 | 0.5/2
  assert "| average_activation | 31.2 | 25.0 | 29.2 |" in text
  assert "its average_activation vector: encoder 0.30, decoder 1.00, all 0.65" in text
  assert "| arrow | 31.2 | 25.0 | 29.2 |" in text and "its arrow vector: encoder n/a, decoder 0.20, all 0.20" in text
