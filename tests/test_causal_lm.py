"""Our decoder-only LMs on Hugging Face weights match transformers' PyTorch BLOOM, Llama, Mistral and Qwen2 (the
independent references) with padding on either side; the loader's errors name what is wrong; experts attach to
every attention/MLP linear; cached decoding equals the uncached forward. Small random models, no network."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from safetensors import safe_open
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from moe_jax.checkpoints import hf as hf_module
from moe_jax.checkpoints.hf_causal import config_from_hf_causal, load_hf_causal_lm
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models import ExpertConfig, Phatgoose
from moe_jax.models.causal import (CAUSAL_LM_MODULES, CausalLM, CausalLMConfig, alibi_slopes, causal_step_fn,
                                   init_cache)

REPO = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 100, 12
RTOL = 1e-4  # max |ours - HF| / max |HF| over real tokens
CACHE_RTOL = 1e-5  # cached vs uncached forward, same model, float32
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

STYLES = {
    # 6 heads: ALiBi slopes for a head count that is not a power of two.
    "bloom": lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6),
    "llama": lambda: transformers.LlamaConfig(**_SMALL, num_key_value_heads=2, rope_theta=500.0),
    # HF Llama's attention_bias puts a bias on q/k/v and o; one key/value head; tied head.
    "llama_bias": lambda: transformers.LlamaConfig(**_SMALL, num_key_value_heads=1, attention_bias=True,
                                                   mlp_bias=True, tie_word_embeddings=True),
    # head_dim 16 with d_model 32 and 4 heads: head_dim is not d_model / heads.
    "mistral": lambda: transformers.MistralConfig(**_SMALL, num_key_value_heads=2, head_dim=16, sliding_window=None),
    # q/k/v biases only; tied head.
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL, num_key_value_heads=2, tie_word_embeddings=True),
}
# Attention and MLP linears per layer, each of which carries experts.
EXPERT_LINEARS = {"bloom": 6, "llama": 7}


def _randomise(model) -> None:
  """Non-trivial values for every weight (norm scales and biases too) so a mis-mapped tensor shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and name.endswith("weight"):  # norm scales
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.3)
      elif "embed" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, p.shape[1]**-0.5)


def _build(style: str, seed: int = 0):
  cfg = STYLES[style]()
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  _randomise(model)
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple]:
  out = {}
  for style in STYLES:
    model = _build(style)
    path = tmp_path_factory.mktemp(style)
    model.save_pretrained(path, safe_serialization=True)
    out[style] = (model, path)
  return out


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[str, tuple]:
  """style -> (float32 model, params)."""
  return {style: load_hf_causal_lm(path, config_from_hf_causal(path, dtype="float32"))
          for style, (_, path) in checkpoints.items()}


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Rows: no padding, right padding, left padding."""
  tokens = np.random.default_rng(seed).integers(1, VOCAB, (3, LENGTH)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, -4:] = 0
  mask[2, :5] = 0
  return np.where(mask > 0, tokens, 0).astype(np.int32), mask


def _rel_err(ours, ref, mask: np.ndarray | None = None) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    ours, ref = ours[mask > 0], ref[mask > 0]
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _hf_logits(hf_model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long())
  return out.logits.float().numpy()


@pytest.mark.parametrize("style", list(STYLES))
def test_matches_transformers(checkpoints, loaded, style):
  hf_model, _ = checkpoints[style]
  model, params = loaded[style]
  tokens, mask = _inputs()
  ours = model.apply({"params": params}, tokens, mask)
  assert ours.dtype == jnp.float32 and ours.shape == (3, LENGTH, VOCAB)
  ref = _hf_logits(hf_model, tokens, mask)
  errors = [_rel_err(ours[i], ref[i], mask[i]) for i in range(3)]
  print(f"{style}: max rel err (no / right / left padding) " + " / ".join(f"{e:.1e}" for e in errors))
  assert max(errors) < RTOL
  # Each padded row equals the same tokens alone, unpadded.
  for row in (1, 2):
    alone = model.apply({"params": params}, tokens[row:row + 1, mask[row] > 0])
    assert _rel_err(ours[row][mask[row] > 0], alone[0]) < 1e-5


def test_config_from_hf(checkpoints):
  bloom = config_from_hf_causal(checkpoints["bloom"][1])
  assert (bloom.family, bloom.d_model, bloom.num_heads, bloom.num_kv_heads, bloom.head_dim, bloom.d_ff) == (
      "bloom", 48, 6, 6, 8, 192)
  assert bloom.attention_bias and bloom.attention_out_bias and bloom.mlp_bias and bloom.tie_word_embeddings
  assert bloom.dtype == "bfloat16" and bloom.name == checkpoints["bloom"][1].name
  llama = config_from_hf_causal(checkpoints["llama"][1])
  assert (llama.family, llama.num_kv_heads, llama.head_dim, llama.rope_theta, llama.tie_word_embeddings) == (
      "llama", 2, 8, 500.0, False)
  assert not (llama.attention_bias or llama.attention_out_bias or llama.mlp_bias)
  biased = config_from_hf_causal(checkpoints["llama_bias"][1])
  assert biased.attention_bias and biased.attention_out_bias and biased.mlp_bias and biased.num_kv_heads == 1
  assert config_from_hf_causal(checkpoints["mistral"][1]).head_dim == 16
  qwen2 = config_from_hf_causal(checkpoints["qwen2"][1])
  assert qwen2.attention_bias and not qwen2.attention_out_bias and not qwen2.mlp_bias and qwen2.tie_word_embeddings
  # Pre-v5 configs: rope_theta at the top level, BLOOM's n_embed.
  old = config_from_hf_causal({"model_type": "llama", "rope_theta": 1e6, "rope_scaling": None} | _SMALL)
  assert old.rope_theta == 1e6 and old.num_kv_heads == 4
  assert config_from_hf_causal({"model_type": "bloom", "n_embed": 64, "n_head": 8, "n_layer": 2,
                                "vocab_size": 10}).d_model == 64


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_hf_config(checkpoints, tmp_path, change, message):
  _, path = checkpoints["llama"]
  (tmp_path / "config.json").write_text(json.dumps(json.loads((path / "config.json").read_text()) | change))
  with pytest.raises(ConfigError, match=message):
    config_from_hf_causal(tmp_path)


@pytest.mark.parametrize("fields,message", [
    (dict(family="gpt2"), "family='gpt2'"),
    (dict(num_heads=4, num_kv_heads=3, head_dim=8), "not a multiple of num_kv_heads=3"),
    (dict(family="bloom", d_model=32, num_heads=4, d_ff=128, mlp_bias=False), "mlp_bias=False"),
    (dict(family="bloom", d_model=32, num_heads=4, num_kv_heads=2, d_ff=128), "no grouped-query attention"),
    (dict(family="bloom", d_model=32, num_heads=4, d_ff=64), "d_ff = 4 d_model"),
    (dict(d_model=32, num_heads=4, head_dim=7), "even head_dim"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(num_layers=0), "num_layers must be positive"),
])
def test_config_validation(fields, message):
  with pytest.raises(ConfigError, match=message):
    CausalLMConfig(**fields)


def test_fingerprint():
  base = CausalLMConfig(d_model=32, num_heads=4, d_ff=64)
  explicit = CausalLMConfig(d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64, attention_bias=False)
  assert base == explicit and base.fingerprint() == explicit.fingerprint()
  assert base.fingerprint() == CausalLMConfig(d_model=32, num_heads=4, d_ff=64, dtype="float32", remat=True,
                                              name="x").fingerprint()
  assert base.fingerprint() != CausalLMConfig(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64).fingerprint()
  bloom = lambda **kw: CausalLMConfig(family="bloom", d_model=32, num_heads=4, d_ff=128, **kw)
  assert bloom().fingerprint() == bloom(rope_theta=1.0).fingerprint()  # unused by BLOOM


def test_alibi_slopes_match_transformers():
  for heads in range(1, 41):
    np.testing.assert_allclose(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")).numpy(),
                               rtol=1e-6)


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_bf16_and_unprefixed_checkpoints(checkpoints, tmp_path):
  hf_model, path = checkpoints["bloom"]
  cfg = config_from_hf_causal(path, dtype="float32")
  reference = _leaves(load_hf_causal_lm(path, cfg)[1])
  model, defaults = load_hf_causal_lm(path)  # config from the directory: bf16 compute, float32 params
  assert model.config == config_from_hf_causal(path) and model.config.dtype == "bfloat16"
  defaults = _leaves(defaults)
  assert defaults.keys() == reference.keys() and all(np.array_equal(defaults[k], reference[k]) for k in reference)

  hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  sharded = _leaves(load_hf_causal_lm(tmp_path / "sharded", cfg)[1])
  assert sharded.keys() == reference.keys() and all(np.array_equal(sharded[k], reference[k]) for k in reference)

  copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
  as_f32 = _leaves(load_hf_causal_lm(tmp_path / "bf16", cfg)[1])
  as_bf16 = _leaves(load_hf_causal_lm(tmp_path / "bf16", cfg, params_dtype="bfloat16")[1])
  for k, v in reference.items():
    rounded = v.astype(ml_dtypes.bfloat16)
    assert as_f32[k].dtype == np.float32 and np.array_equal(as_f32[k], rounded.astype(np.float32)), k
    assert as_bf16[k].dtype == ml_dtypes.bfloat16 and np.array_equal(as_bf16[k], rounded), k

  # The released BLOOM files were saved from the base model: tensor names without "transformer.".
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "config.json").write_text((path / "config.json").read_text())
  with safe_open(str(path / "model.safetensors"), framework="np") as f:
    tensors = {name.removeprefix("transformer."): f.get_tensor(name) for name in f.keys()}
  assert "word_embeddings.weight" in tensors
  save_file(tensors, str(tmp_path / "bare" / "model.safetensors"))
  bare = _leaves(load_hf_causal_lm(tmp_path / "bare", cfg)[1])
  assert bare.keys() == reference.keys() and all(np.array_equal(bare[k], reference[k]) for k in reference)


def test_public_loader_default_dtype(checkpoints):
  """`moe_jax.checkpoints.hf.load_hf_causal_lm(path)`: the config's bf16 compute, float32 logits near HF's."""
  hf_model, path = checkpoints["llama"]
  model, params = hf_module.load_hf_causal_lm(path)
  tokens, mask = _inputs()
  logits = model.apply({"params": params}, tokens, mask)
  assert logits.dtype == jnp.float32 and logits.shape == (3, LENGTH, VOCAB)
  assert _rel_err(logits, _hf_logits(hf_model, tokens, mask), np.broadcast_to(mask[..., None], logits.shape)) < 0.05


def test_shape_mismatch_names_first_parameter(checkpoints):
  _, path = checkpoints["llama"]
  with pytest.raises(MismatchError) as e:
    load_hf_causal_lm(path, config_from_hf_causal(path, d_ff=128))
  for part in ("layers_0/mlp/wi_0/kernel", "(32, 128)", "(32, 64)", "model.layers.0.mlp.gate_proj.weight"):
    assert part in str(e.value)
  _, path = checkpoints["bloom"]
  with pytest.raises(MismatchError, match=r"token_embedder/embedding: expected shape \(120, 48\).*\(100, 48\)"):
    load_hf_causal_lm(path, config_from_hf_causal(path, vocab_size=120))


def test_fused_qkv_mismatch_names_query(checkpoints, tmp_path):
  """BLOOM's fused q/k/v tensor serves three parameters: a wrong one is reported at the first, in our layout."""
  _, path = checkpoints["bloom"]
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  name = "transformer.h.0.self_attention.query_key_value.weight"
  with safe_open(str(path / "model.safetensors"), framework="np") as f:
    tensors = {n: f.get_tensor(n) for n in f.keys()}
  tensors[name] = tensors[name][:3 * 40]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(MismatchError, match=r"layers_0/attention/query/kernel: expected shape \(48, 48\).*found "
                     r"\(48, 40\).*query_key_value\.weight, stored as \(120, 48\)"):
    load_hf_causal_lm(tmp_path, config_from_hf_causal(path))


def test_layer_count_and_head_mismatch_name_tensors(checkpoints):
  _, path = checkpoints["bloom"]
  with pytest.raises(MismatchError, match=r"unexpected.*transformer\.h\.1\.input_layernorm\.bias"):
    load_hf_causal_lm(path, config_from_hf_causal(path, num_layers=1))
  with pytest.raises(MismatchError, match=r"missing.*transformer\.h\.2\.input_layernorm\.bias"):
    load_hf_causal_lm(path, config_from_hf_causal(path, num_layers=3))
  _, path = checkpoints["llama"]
  with pytest.raises(MismatchError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.bias"):
    load_hf_causal_lm(path, config_from_hf_causal(path, attention_bias=True))
  with pytest.raises(MismatchError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
    load_hf_causal_lm(path, config_from_hf_causal(path, tie_word_embeddings=True))


def test_missing_files(checkpoints, tmp_path):
  with pytest.raises(MissingFileError, match="does not exist"):
    load_hf_causal_lm(tmp_path / "nowhere")
  _, path = checkpoints["qwen2"]
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(MissingFileError, match=r"model\.safetensors"):
    load_hf_causal_lm(tmp_path)
  with pytest.raises(MissingFileError, match="config.json"):
    config_from_hf_causal(tmp_path / "nowhere")


def _merge(backbone: dict, init: dict) -> dict:
  """`init`'s tree with every backbone leaf replaced by the checkpoint's."""
  return {k: _merge(backbone.get(k, {}), v) if isinstance(v, dict) else backbone.get(k, v) for k, v in init.items()}


def _expert_paths(params) -> list[str]:
  return sorted("/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                if path[-1].key == "lora_a")


@pytest.mark.parametrize("style", ["bloom", "llama"])
def test_routed_experts(loaded, style):
  model, backbone = loaded[style]
  cfg = model.config
  experts = ExpertConfig(num_experts=2, rank=4, modules=CAUSAL_LM_MODULES, router=Phatgoose(k=1))
  routed = CausalLM(cfg, experts)
  tokens, mask = _inputs()
  # Abstract init (an eager one compiles every small op); the values are set below.
  shapes = nn.meta.unbox(jax.eval_shape(lambda: routed.init(jax.random.PRNGKey(0), tokens, mask)))["params"]
  paths = _expert_paths(shapes)
  assert len(paths) == EXPERT_LINEARS[cfg.family] * cfg.num_layers
  assert all(p.split("/")[1] in ("attention", "mlp") for p in paths)
  assert shapes["layers_0"]["attention"]["key"]["lora_a"].shape == (2, cfg.d_model, 4)
  assert shapes["layers_0"]["attention"]["key"]["lora_b"].shape == (2, 4, cfg.num_kv_heads * cfg.head_dim)

  rng = np.random.default_rng(1)
  # A and the router vectors random (routers then pick different experts for different tokens), B zero.
  stds = {"lora_a": 0.3, "router": 1.0, "lora_b": 0.0}
  fill = lambda path, x: (rng.normal(0, stds[path[-1].key], x.shape) if path[-1].key in stds
                          else np.zeros(x.shape)).astype(x.dtype)
  params = _merge(backbone, jax.tree_util.tree_map_with_path(fill, shapes))
  forward = jax.jit(lambda p: routed.apply({"params": p}, tokens, mask))
  base = model.apply({"params": backbone}, tokens, mask)
  zero_b = forward(params)
  assert _rel_err(zero_b, base) < 1e-6  # experts whose B is zero leave the backbone's logits
  stds["lora_b"] = 0.5
  params = jax.tree_util.tree_map_with_path(lambda path, x: fill(path, x) if path[-1].key == "lora_b" else x, params)
  with_experts = forward(params)
  assert np.all(np.isfinite(with_experts)) and _rel_err(with_experts, base) > 1e-3
  # Routing is per token, so the KV cache routes each new token as the full forward does.
  _check_cached(routed, params)


# The step function is a pytree (parameters as leaves): jit a function of it rather than the object itself.
_run_step = jax.jit(lambda step, cache, tokens, mask: step(cache, tokens, mask))


def _check_cached(model: CausalLM, params, new: int = 6) -> float:
  """Prefill left-padded prompts of different lengths, then feed tokens one at a time (row 0 skips a step with
  mask 0); the logits at real tokens equal the uncached forward over the whole sequence."""
  rng = np.random.default_rng(2)
  lengths = np.array([5, 8, 3])
  width = lengths.max()
  prompt_mask = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int32)
  prompt = np.where(prompt_mask > 0, rng.integers(1, VOCAB, prompt_mask.shape), 0).astype(np.int32)
  cont = rng.integers(1, VOCAB, (3, new)).astype(np.int32)
  cont_mask = np.ones_like(cont)
  cont_mask[0, 2] = 0
  full, full_mask = np.concatenate([prompt, cont], 1), np.concatenate([prompt_mask, cont_mask], 1)
  reference = np.asarray(jax.jit(model.apply)({"params": params}, full, full_mask))

  step = causal_step_fn(model, params)
  cache = init_cache(model, 3, width + new)
  logits, cache = _run_step(step, cache, prompt, prompt_mask)
  outputs = [logits]
  for t in range(new):
    logits, cache = _run_step(step, cache, cont[:, t:t + 1], cont_mask[:, t:t + 1])
    outputs.append(logits)
  cached = np.concatenate(outputs, axis=1)
  assert int(cache["layers_0"]["attention"]["cache_index"]) == width + new
  np.testing.assert_array_equal(cache["layers_0"]["attention"]["cached_mask"], full_mask > 0)
  err = _rel_err(cached, reference, np.broadcast_to(full_mask[..., None], cached.shape))
  assert err < CACHE_RTOL, err
  return err


@pytest.mark.parametrize("style", ["bloom", "llama", "mistral"])
def test_cached_forward_matches_uncached(loaded, style):
  model, params = loaded[style]
  print(f"{style}: cached vs uncached max rel err {_check_cached(model, params):.1e}")


def _greedy_uncached(model, params, prompt, mask, new: int) -> np.ndarray:
  """Greedy decoding by re-running the full forward: the sequence grows into a fixed-width buffer whose unwritten
  tail is padding (mask 0), so the forward compiles once and causality keeps the tail out of the real tokens."""
  batch, width = prompt.shape
  forward = jax.jit(lambda tokens, mask: model.apply({"params": params}, tokens, mask))
  tokens = np.concatenate([prompt, np.zeros((batch, new), np.int32)], 1)
  mask = np.concatenate([mask, np.zeros((batch, new), np.int32)], 1)
  for t in range(new):
    tokens[:, width + t] = np.argmax(np.asarray(forward(tokens, mask))[:, width + t - 1], axis=-1)
    mask[:, width + t] = 1
  return tokens[:, width:]


def _greedy_cached(model, params, prompt, mask, new: int) -> np.ndarray:
  step = causal_step_fn(model, params)
  cache = init_cache(model, prompt.shape[0], prompt.shape[1] + new)
  logits, cache = _run_step(step, cache, prompt, mask)
  out = []
  for _ in range(new):
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    out.append(np.asarray(token))
    logits, cache = _run_step(step, cache, token, jnp.ones_like(token))
  return np.concatenate(out, 1)


def _prompts():
  lengths = np.array([4, 7])
  mask = (np.arange(7)[None, :] >= 7 - lengths[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, np.random.default_rng(3).integers(1, VOCAB, mask.shape), 0).astype(np.int32)
  return tokens, mask


@pytest.mark.parametrize("style", ["bloom", "qwen2"])
def test_greedy_decoding_with_cache_matches_uncached(loaded, style):
  model, params = loaded[style]
  prompt, mask = _prompts()
  ours = _greedy_cached(model, params, prompt, mask, 8)
  np.testing.assert_array_equal(ours, _greedy_uncached(model, params, prompt, mask, 8))


def test_generate_with_causal_step_fn(loaded):
  """The generic loop in `moe_jax.models.decoding` (another module; skipped until it exists) drives our step."""
  decoding = pytest.importorskip("moe_jax.models.decoding")
  model, params = loaded["llama"]
  prompt, mask = _prompts()
  cache = init_cache(model, 2, prompt.shape[1] + 8)
  tokens = decoding.generate(causal_step_fn(model, params), cache, prompt, mask, 8, -1, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(tokens), _greedy_uncached(model, params, prompt, mask, 8))


def test_remat_gives_the_same_logits(loaded):
  model, params = loaded["llama"]
  tokens, mask = _inputs()
  remat = CausalLM(dataclasses.replace(model.config, remat=True))
  np.testing.assert_allclose(remat.apply({"params": params}, tokens, mask),
                             model.apply({"params": params}, tokens, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("style", ["bloom", "llama"])
def test_fused_kernel_branch(loaded, style, monkeypatch):
  """The branch for fused kernels (cuDNN, TPU flash: no GPU or TPU here) folds the mask and ALiBi into one
  [B, H, Tq, Tk] bias and repeats grouped key/value heads; run it through the reference kernel of the same
  signature and compare with the XLA path."""
  from moe_jax.models import attention as attention_module, causal
  model, params = loaded[style]
  tokens, mask = _inputs()
  reference = model.apply({"params": params}, tokens, mask)
  calls = []

  def fake_attention(q, k, v, bias, kv_mask, is_causal, impl):
    calls.append(impl)
    assert bias.shape == (3, q.shape[2], LENGTH, LENGTH) and k.shape == q.shape and kv_mask is None
    return attention_module.xla_attention(q, k, v, bias, kv_mask, is_causal)

  monkeypatch.setattr(causal, "resolve_impl", lambda *args: "fused")
  monkeypatch.setattr(causal, "attention", fake_attention)
  fused = model.apply({"params": params}, tokens, mask)
  assert calls == ["fused"] * model.config.num_layers
  assert _rel_err(fused, reference, np.broadcast_to(mask[..., None], fused.shape)) < 1e-5


# gin file -> parameter count of the released model.
GIN_MODELS = {
    "tiny_causal": None,
    "bloom_560m": 559_214_592,
    "bloom_1b7": 1_722_408_960,
    "bloom_7b1": 7_069_016_064,
    "llama2_7b": 6_738_415_616,
}


@pytest.mark.parametrize("name", list(GIN_MODELS))
def test_gin_models(name):
  gin.clear_config()
  try:
    gin.parse_config_file(str(REPO / "gin" / "models" / f"{name}.gin"))
    cfg = CausalLMConfig()
  finally:
    gin.clear_config()
  assert cfg.name == name
  tokens = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.PRNGKey(0), tokens))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)["params"]))
  if GIN_MODELS[name] is not None:
    assert count == GIN_MODELS[name]
  else:
    assert (cfg.vocab_size, cfg.num_kv_heads, cfg.dtype) == (264, 2, "float32")


def test_loader_does_not_import_torch():
  code = ("import sys, moe_jax.checkpoints.hf_causal, moe_jax.checkpoints.hf; "
          "assert 'torch' not in sys.modules, 'torch imported'; moe_jax.checkpoints.hf.load_hf_causal_lm")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
