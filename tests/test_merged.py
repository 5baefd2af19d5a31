"""Merged Experts under bf16 and fp32 compute, `average_factors`, and expert layouts taken from a file.

References: uniform routing (in exact arithmetic the mean of the experts' outputs is the output of the mean
update), float64 NumPy, and peft's `add_weighted_adapter` (an independent implementation of both merges).
"""

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.methods import merged
from moe_jax.models import PHATGOOSE_MODULES, ExpertConfig, T5Config, Transformer, Uniform
from moe_jax.models import experts as ex
from moe_jax.models.lora import Linear, module_path

FP32 = T5Config(vocab_size=128, d_model=64, num_heads=4, d_kv=16, d_ff=128, num_encoder_layers=2,
                num_decoder_layers=2, dtype="float32", name="tiny_merged")
BF16 = dataclasses.replace(FP32, dtype="bfloat16")
NUM, RANK = 4, 4
UNIFORM = ExpertConfig(num_experts=NUM, rank=RANK, router=Uniform())
_tokens = np.random.default_rng(3)
ENC = _tokens.integers(2, FP32.vocab_size, (32, 16)).astype(np.int32)
DEC = _tokens.integers(2, FP32.vocab_size, (32, 8)).astype(np.int32)


def logits(config, layout, params):
  return np.asarray(jax.jit(Transformer(config, layout).apply)({"params": params}, ENC, DEC), np.float64)


@pytest.fixture(scope="module")
def backbone():
  """T5X-initialised kernels (N(0, 1/d_in)), put on the bf16 grid as a checkpoint stored in bf16 is."""
  tokens = np.ones((1, 1), np.int32)
  params = nn.meta.unbox(Transformer(FP32).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  return jax.tree.map(lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32), params)


def module_inputs(backbone):
  """Every Linear's input rows [tokens, d_in] in the fp32 backbone, by module path."""
  inputs = {}

  def record(call, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      inputs[module_path(context.module)] = np.asarray(args[0], np.float64).reshape(-1, args[0].shape[-1])
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    Transformer(FP32).apply({"params": backbone}, ENC, DEC)
  return inputs


@pytest.fixture(scope="module")
def experts(backbone):
  """NUM experts per module with ||A_i B_i / r|| = 1e-3 ||W||, A reading the top principal directions of the
  module's inputs as trained LoRA does (random directions give an effect on the logits far below bf16 noise)."""
  rng = np.random.default_rng(10)
  inputs = module_inputs(backbone)
  kernels = flax.traverse_util.flatten_dict(backbone)
  out = {}
  for key in flax.traverse_util.flatten_dict(ex.init_experts(FP32, UNIFORM, jax.random.PRNGKey(1))):
    if key[-1] != "lora_a":
      continue
    module, w = key[:-1], np.asarray(kernels[key[:-1] + ("kernel",)], np.float64)
    top = np.linalg.svd(inputs["/".join(module)], full_matrices=False)[2][:2 * RANK].T
    a = np.einsum("dk,ekr->edr", top, rng.normal(0, 1, (NUM, 2 * RANK, RANK)))
    b = rng.normal(0, 1, (NUM, RANK, w.shape[1]))
    b *= (1e-3 * np.linalg.norm(w) / np.linalg.norm(np.einsum("edr,ero->edo", a, b) / RANK, axis=(1, 2)))[:, None, None]
    out[module + ("lora_a",)], out[module + ("lora_b",)] = a.astype(np.float32), b.astype(np.float32)
    out[module + ("router",)] = np.zeros((NUM, w.shape[0]), np.float32)
  return flax.traverse_util.unflatten_dict(out)


def test_merged_keeps_the_update_under_bf16_compute(backbone, experts):
  config, params = merged.merged_experts(BF16, backbone, experts)
  assert config.fingerprint() == BF16.fingerprint() and config.delta_modules
  flat, kernels = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(backbone)
  assert all(np.array_equal(flat[k], v) for k, v in kernels.items())  # the kernels are untouched
  with_experts = ex.merge(backbone, experts)
  uniform32, uniform16 = logits(FP32, UNIFORM, with_experts), logits(BF16, UNIFORM, with_experts)
  backbone32, backbone16 = logits(FP32, None, backbone), logits(BF16, None, backbone)
  merged16 = logits(config, None, params)
  folded16 = logits(BF16, None, merged.merge_into_backbone(backbone, experts))
  # The update's exact effect on the logits is below bf16 noise (mean |uniform32 - backbone32| = 0.0016 vs mean
  # |uniform16 - uniform32| = 0.0058), so max-norm comparisons mostly see noise: max |merged16 - uniform16| =
  # 0.031 (one bf16 ulp of a logit), max |uniform16 - uniform32| = 0.037, max |uniform16 - backbone16| = 0.047,
  # and the update folded into the kernel (the old `merge_into_backbone` under bf16) max |folded16 - uniform16| =
  # 0.055. Averaged over 131k logits, the share of the exact effect a bf16 model carries is well resolved:
  # uniform 1.01, merged 1.02, folded 0.30 (three other seeds of this setup: 0.94-1.12, 0.94-1.08, 0.30-0.39).
  # Only 8.5% of the folded encoder wo kernel's entries change in bf16; the others round back to W. (With kernels
  # off the bf16 grid the folded update survives in expectation, as stochastic rounding of W + delta.)
  effect = uniform32 - backbone32
  carried = lambda model16: float(np.sum((model16 - backbone16) * effect) / np.sum(effect * effect))
  assert 0.8 < carried(uniform16) < 1.2 and abs(carried(merged16) - carried(uniform16)) < 0.15
  assert carried(folded16) < 0.6
  # And merged is as close to the exact function as uniform routing is (0.00578 vs 0.00580 mean).
  assert np.abs(merged16 - uniform32).mean() <= 1.1 * np.abs(uniform16 - uniform32).mean()


def test_merged_equals_uniform_in_fp32_folded_or_kept_apart(backbone, experts):
  config, folded = merged.merged_experts(FP32, backbone, experts)
  assert config == FP32 and not any(k[-1] == "delta" for k in flax.traverse_util.flatten_dict(folded))
  uniform = logits(FP32, UNIFORM, ex.merge(backbone, experts))
  np.testing.assert_allclose(logits(FP32, None, folded), uniform, rtol=1e-5, atol=1e-5)
  apart = merged.merge_into_backbone(backbone, experts, keep_delta=True)
  np.testing.assert_allclose(logits(merged.delta_config(FP32, apart), None, apart), logits(FP32, None, folded),
                             rtol=1e-5, atol=1e-5)
  # Weighted: the delta leaf is sum_i w_i A_i B_i / r in float64.
  weights = [0.1, 0.2, 0.3, 0.4]
  module = ("decoder", "layers_1", "encoder_decoder_attention", "value")
  flat = flax.traverse_util.flatten_dict(experts)
  a, b = flat[module + ("lora_a",)].astype(np.float64), flat[module + ("lora_b",)].astype(np.float64)
  delta = flax.traverse_util.flatten_dict(merged.merge_into_backbone(backbone, experts, weights, keep_delta=True))
  np.testing.assert_allclose(delta[module + ("delta",)], np.einsum("e,edr,ero->do", weights, a, b) / RANK,
                             rtol=1e-5, atol=1e-9)


def test_delta_modules_declare_zero_deltas_and_leave_the_fingerprint():
  config = dataclasses.replace(FP32, delta_modules=r"encoder/layers_0/mlp/wo|decoder/layers_1/self_attention/key")
  assert config.fingerprint() == FP32.fingerprint()
  tokens = np.ones((1, 1), np.int32)
  boxed = Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens)["params"]
  deltas = {k: v for k, v in flax.traverse_util.flatten_dict(boxed).items() if k[-1] == "delta"}
  assert set(deltas) == {("encoder", "layers_0", "mlp", "wo", "delta"),
                         ("decoder", "layers_1", "self_attention", "key", "delta")}
  assert deltas[("encoder", "layers_0", "mlp", "wo", "delta")].names == ("mlp", "embed")
  assert all(v.value.dtype == jnp.float32 and not np.any(v.value) for v in deltas.values())
  params = nn.meta.unbox(boxed)
  without = {k: v for k, v in flax.traverse_util.flatten_dict(params).items() if k[-1] != "delta"}
  np.testing.assert_array_equal(logits(config, None, params),
                                logits(FP32, None, flax.traverse_util.unflatten_dict(without)))


# Module level: one Linear at path "lin" (x [T, D_IN] -> [T, D_OUT]) against float64 NumPy and peft.
D_IN, D_OUT = 24, 20
ONE = T5Config(dtype="float32", name="one_linear")


class One(nn.Module):
  config: T5Config
  experts: ExpertConfig | None = None

  @nn.compact
  def __call__(self, x):
    return Linear(D_OUT, ("embed", "mlp"), self.config, self.experts, name="lin")(x)


def one_expert_set(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(0, D_IN**-0.5, (D_IN, D_OUT))
  a, b = rng.normal(0, 0.3, (NUM, D_IN, RANK)), rng.normal(0, 0.3, (NUM, RANK, D_OUT))
  x = rng.normal(0, 1, (7, D_IN))
  tree = {"lin": {"kernel": w.astype(np.float32), "lora_a": a.astype(np.float32), "lora_b": b.astype(np.float32),
                  "router": np.zeros((NUM, D_IN), np.float32)}}
  return w, a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64), x, tree


def peft_merge(w, a, b, x, weights, combination_type):
  """peft's merge of NUM adapters (lora_alpha = 1: each adapter's scaling is 1/r, as ours) applied to x."""
  import peft
  import torch

  class Base(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = torch.nn.Linear(D_IN, D_OUT, bias=False, dtype=torch.float64)

    def forward(self, x):
      return self.lin(x)

  base = Base()
  base.lin.weight.data = torch.tensor(w.T)
  lora = lambda: peft.LoraConfig(r=RANK, lora_alpha=1, lora_dropout=0.0, target_modules=["lin"])
  model = peft.get_peft_model(base, lora(), adapter_name="e0")
  for i in range(1, NUM):
    model.add_adapter(f"e{i}", lora())
  lin = model.base_model.model.lin
  for i in range(NUM):
    lin.lora_A[f"e{i}"].weight.data = torch.tensor(a[i].T)  # torch weights are [out, in]
    lin.lora_B[f"e{i}"].weight.data = torch.tensor(b[i].T)
  model.add_weighted_adapter([f"e{i}" for i in range(NUM)], list(weights), "merged", combination_type=combination_type)
  model.set_adapter("merged")
  with torch.no_grad():
    return model(torch.tensor(x)).numpy()


def test_average_factors_matches_numpy_and_peft_linear():
  w, a, b, x, tree = one_expert_set()
  weights = np.array([0.1, 0.2, 0.3, 0.4])
  for wts in (None, weights):
    wv = np.full(NUM, 1 / NUM) if wts is None else wts
    single = merged.average_factors({"lin": {k: tree["lin"][k] for k in ("lora_a", "lora_b", "router")}}, wts)
    a_mean, b_mean = np.einsum("e,edr->dr", wv, a), np.einsum("e,ero->ro", wv, b)
    np.testing.assert_allclose(single["lin"]["lora_a"][0], a_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(single["lin"]["lora_b"][0], b_mean, rtol=1e-6, atol=1e-7)
    assert single["lin"]["lora_a"].shape == (1, D_IN, RANK) and not np.any(single["lin"]["router"])
    reference = x @ w + x @ a_mean @ b_mean / RANK
    layout = ExpertConfig(num_experts=1, rank=RANK, modules="lin", router=Uniform())
    ours = One(ONE, layout).apply({"params": {"lin": {"kernel": tree["lin"]["kernel"], **single["lin"]}}},
                                  x.astype(np.float32))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    # peft "linear" scales both factors by sqrt(w_i * scaling_i) and gives the result scaling 1, so its delta is
    # (sum_i sqrt(w_i / r) B_i)(sum_i sqrt(w_i / r) A_i): our weights w_i are peft's w_i^2 (w_i >= 0). peft holds
    # those sqrt factors in a float32 tensor, hence 1e-6, not float64 agreement.
    np.testing.assert_allclose(peft_merge(w, a, b, x, wv**2, "linear"), reference, rtol=1e-6, atol=1e-7)
  # Not the mean of the products.
  products = x @ np.einsum("edr,ero->do", a, b) / NUM / RANK
  assert np.abs(x @ a.mean(0) @ b.mean(0) / RANK - products).max() > 0.1 * np.abs(products).max()


def test_mean_of_products_matches_peft_cat():
  w, a, b, x, tree = one_expert_set(1)
  weights = np.array([0.1, 0.2, 0.3, 0.4])
  experts = {"lin": {k: tree["lin"][k] for k in ("lora_a", "lora_b", "router")}}
  backbone = {"lin": {"kernel": tree["lin"]["kernel"]}}
  for wts in (None, weights):
    wv = np.full(NUM, 1 / NUM) if wts is None else wts
    # peft "cat" stacks w_i * scaling_i * A_i and B_i on the rank axis (result scaling 1): sum_i w_i B_i A_i / r.
    reference = peft_merge(w, a, b, x, wv, "cat")
    np.testing.assert_allclose(reference, x @ w + x @ np.einsum("e,edr,ero->do", wv, a, b) / RANK, rtol=1e-10)
    folded = merged.merge_into_backbone(backbone, experts, wts)
    np.testing.assert_allclose(One(ONE).apply({"params": folded}, x.astype(np.float32)), reference, rtol=1e-5,
                               atol=1e-5)
    apart = merged.merge_into_backbone(backbone, experts, wts, keep_delta=True)
    config = merged.delta_config(ONE, apart)
    assert config.delta_modules == "lin"
    np.testing.assert_allclose(One(config).apply({"params": apart}, x.astype(np.float32)), reference, rtol=1e-5,
                               atol=1e-5)


def test_layout_config_recreates_the_files_modules():
  tiny = T5Config(vocab_size=64, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=1,
                  num_decoder_layers=1, dtype="float32", name="tiny_layout")
  on_file = ex.init_experts(tiny, ExpertConfig(num_experts=3, rank=2, modules=PHATGOOSE_MODULES),
                            jax.random.PRNGKey(0))
  modules, num_experts, rank = ex.layout(on_file)
  base = ExpertConfig(num_experts=8, rank=16, modules=r".*attention/query", init_std=0.02, router=Uniform(),
                      impl="dense")
  config = ex.layout_config(modules, num_experts, rank, base)
  assert (config.router, config.impl, config.init_std) == (Uniform(), "dense", 0.02)
  assert ex.layout(ex.init_experts(tiny, config, jax.random.PRNGKey(1))) == (modules, 3, 2)
  two = ["decoder/layers_0/mlp/wo", "encoder/layers_0/attention/query"]
  assert ex.layout(ex.init_experts(tiny, ex.layout_config(two, 1, 4), jax.random.PRNGKey(1)))[0] == two
  with pytest.raises(ValueError, match="no modules"):
    ex.layout_config([], 1, 4)
