"""Formulas against values computed outside this codebase.

PHATGOOSE routing and routed LoRA against the PyTorch reference dispatch in `shared/bench/phatgoose_reference_layer.py`
(token-level top-k, sorted dispatch, index_add), and one LoRA expert against peft. Elsewhere: the T5 forward pass and
relative position buckets against transformers (test_hf_t5.py), rank classification against t5.evaluation.metrics
(test_evaluation.py), the average activation against a NumPy RMSNorm of the embeddings (test_methods.py), metrics on
hand-labelled examples (test_evaluation.py, test_real_data.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from moe_jax.models import ExpertConfig, T5Config
from moe_jax.models.lora import Linear
from moe_jax.models.routers import Phatgoose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "bench", "phatgoose_reference_layer.py")
CFG = T5Config(vocab_size=32, d_model=16, num_heads=2, d_kv=8, d_ff=24, num_encoder_layers=1, num_decoder_layers=1,
               dtype="float32")
# The reference's shapes: T tokens (a multiple of L), d_model, d_ff, E experts of rank r, top-k.
T, L, D, FF, E, R, K = 12, 4, 16, 24, 5, 3, 2


def _reference() -> ModuleType:
  """The reference script as a module, run once with small CPU shapes (it benchmarks itself on import)."""
  if not os.path.isfile(REFERENCE):
    pytest.fail(f"the PyTorch PHATGOOSE reference {REFERENCE} is missing: it ships in the project's shared/bench "
                "folder beside the repository")
  spec = importlib.util.spec_from_file_location("phatgoose_reference_layer", REFERENCE)
  module = importlib.util.module_from_spec(spec)
  argv = sys.argv
  sys.argv = [REFERENCE, "dev=cpu", f"T={T}", f"L={L}", f"d={D}", f"ff={FF}", "H=2", f"E={E}", f"r={R}", f"k={K}",
              "iters=1"]
  try:
    spec.loader.exec_module(module)
  finally:
    sys.argv = argv
  return module


@pytest.fixture(scope="module")
def reference() -> ModuleType:
  return _reference()


def _linear(experts: ExpertConfig, features: int) -> Linear:
  return Linear(features, ("embed", "mlp"), CFG, experts)


@pytest.mark.parametrize("name", ["q", "wo"])  # d_model -> d_model, d_ff -> d_model
def test_phatgoose_linear_matches_the_pytorch_reference_dispatch(reference, name):
  """Our `Linear` with E experts and the `Phatgoose(k)` router equals x W + the reference's `routed(x, name)` on
  the reference's own random weights. The reference renormalises the kept probabilities as p / (sum p + 1e-6), we
  take a softmax over the k kept scores: a documented relative difference of 1e-6 / (kept mass), here under 1e-5
  (with E = 5 and k = 2 the kept mass is at least 0.4)."""
  kernel, lora_a, lora_b, vectors = (getattr(reference, n)[name].numpy() for n in ("W", "LA", "LB", "R"))
  d_in, d_out = kernel.shape
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(T, d_in)) * 2.0 + 0.5).astype(np.float32)  # a mean and scale that standardising removes
  with torch.no_grad():
    expected = (torch.from_numpy(x) @ reference.W[name] + reference.routed(torch.from_numpy(x), name)).numpy()
  experts = ExpertConfig(num_experts=E, rank=R, modules=".*", router=Phatgoose(K))
  params = {"kernel": kernel, "lora_a": lora_a, "lora_b": lora_b, "router": vectors}
  got = np.asarray(jax.jit(_linear(experts, d_out).apply)({"params": params}, jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # The routing itself: the reference's top-k experts and its renormalised weights.
  with torch.no_grad():
    xs = torch.nn.functional.layer_norm(torch.from_numpy(x), (d_in,))
    rs = torch.nn.functional.layer_norm(reference.R[name], (d_in,))
    top, ids = torch.topk(torch.softmax(xs @ rs.T / d_in ** 0.5, -1), K, -1)
    weights = top / (top.sum(-1, keepdim=True) + 1e-6)
  routing = Phatgoose(K)(jnp.asarray(x), jnp.asarray(vectors))
  np.testing.assert_array_equal(np.asarray(routing.experts), ids.numpy())
  np.testing.assert_allclose(np.asarray(routing.weights), weights.numpy(), rtol=1e-5)
  assert (routing.experts[:, 0] != routing.experts[:, 1]).all() and len(np.unique(ids.numpy())) > 2


@pytest.mark.parametrize("rank", [1, 4])
def test_one_lora_expert_matches_peft(rank):
  """One expert (the default router: the mean of one expert, i.e. plain LoRA) scales B A by 1 / r: peft's LoRA with
  lora_alpha = 1 (scaling alpha / r = 1 / r) on a bias-free torch Linear holding the same weights."""
  d_in, d_out = 16, 24
  rng = np.random.default_rng(rank)
  kernel, lora_a, lora_b = (rng.normal(size=s).astype(np.float32) for s in ((d_in, d_out), (d_in, rank),
                                                                              (rank, d_out)))
  x = rng.normal(size=(3, 5, d_in)).astype(np.float32)

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, h):
      return self.proj(h)

  block = Block()
  with torch.no_grad():
    block.proj.weight.copy_(torch.from_numpy(kernel.T))
  lora = peft.get_peft_model(block, peft.LoraConfig(r=rank, lora_alpha=1, lora_dropout=0.0, target_modules=["proj"]))
  layer = lora.base_model.model.proj
  assert layer.scaling["default"] == pytest.approx(1 / rank)
  with torch.no_grad():
    layer.lora_A["default"].weight.copy_(torch.from_numpy(lora_a.T))
    layer.lora_B["default"].weight.copy_(torch.from_numpy(lora_b.T))
    expected = lora(torch.from_numpy(x)).numpy()
  params = {"kernel": kernel, "lora_a": lora_a[None], "lora_b": lora_b[None], "router": np.zeros((1, d_in), np.float32)}
  got = np.asarray(_linear(ExpertConfig(num_experts=1, rank=rank, modules=".*"), d_out).apply({"params": params},
                                                                                               jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, x @ kernel, atol=1e-2)  # the expert changed the output
