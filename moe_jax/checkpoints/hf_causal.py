"""Load Hugging Face decoder-only checkpoints (BLOOM, Llama, Mistral, Qwen2) into `CausalLM`'s parameter tree.

As `moe_jax.checkpoints.hf` for T5: config.json plus `model.safetensors` or a sharded index, read with safetensors'
NumPy API (bf16 via ml_dtypes), no PyTorch and no network; every tensor's shape is checked against the model's
before any data is read, with the same first-mismatch / missing / unexpected messages.

Layouts: HF linears are [d_out, d_in] (ours [d_in, d_out]: transposed). BLOOM's fused `query_key_value` rows are
ordered [heads, 3, head_dim] (per head: query, key, value), split here into our `query`/`key`/`value`. Llama's
q_proj/k_proj rows are in HF's rotate_half layout, which our RoPE uses too, so they load unpermuted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy, which safetensors' NumPy API needs for bf16 files
import numpy as np
from flax import linen as nn

from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models.causal import CausalLM, CausalLMConfig

Params = dict[str, Any]
LLAMA_TYPES = ("llama", "mistral", "qwen2")
MODEL_TYPES = ("bloom",) + LLAMA_TYPES
# Tensors some checkpoints carry that the model recomputes (old Llama exports store RoPE's inverse frequencies).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _hf():
  """`moe_jax.checkpoints.hf`, imported late: it re-exports `load_hf_causal_lm` from this module at its end, so a
  module-level import here would be circular whichever of the two is imported first."""
  from moe_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  return hf


def _rope_theta(hf: dict[str, Any], source: str) -> float:
  """RoPE base from transformers >= 5's `rope_parameters` or older configs' `rope_theta`/`rope_scaling`; only
  unscaled ("default") RoPE is implemented."""
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise ConfigError(f"{source}: rope type {kind!r} is not supported; only unscaled ('default') RoPE is")
  if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf_causal(path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> CausalLMConfig:
  """CausalLMConfig from a HF `config.json` (a file, its directory, or the parsed dict); `overrides` win.

  model_type bloom, llama, mistral or qwen2 (ConfigError otherwise, and for features not implemented: rope
  scaling, BLOOM's post-LayerNorm residual, an activation other than SiLU). Mistral's and Qwen2's sliding windows
  are dropped: logits are exact for sequences that fit in the window.
  """
  hf, source = _hf()._read_hf_config(path_or_dict)  # pylint: disable=protected-access
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"{source}: model_type={model_type!r}; only {MODEL_TYPES} causal LMs are supported")
  name = f"hf_{model_type}" if isinstance(path_or_dict, dict) else Path(source).resolve().parent.name
  if model_type == "bloom":
    if hf.get("apply_residual_connection_post_layernorm", False):
      raise ConfigError(f"{source}: apply_residual_connection_post_layernorm=True is not supported")
    d_model = hf.get("hidden_size", hf.get("n_embed"))
    heads = hf.get("n_head", hf.get("num_attention_heads"))
    layers = hf.get("n_layer", hf.get("num_hidden_layers"))
    if None in (d_model, heads, layers) or "vocab_size" not in hf:
      raise MismatchError(f"{source}: missing hidden_size (n_embed), n_head, n_layer or vocab_size")
    fields = dict(family="bloom", vocab_size=hf["vocab_size"], d_model=d_model, num_layers=layers, num_heads=heads,
                  num_kv_heads=heads, head_dim=d_model // heads, d_ff=4 * d_model,
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))
  else:
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise MismatchError(f"{source}: missing field(s) {missing}")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
    heads = hf["num_attention_heads"]
    qwen2 = model_type == "qwen2"
    attention_bias = True if qwen2 else bool(hf.get("attention_bias", False))  # Qwen2 always has q/k/v biases
    fields = dict(family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                  num_layers=hf["num_hidden_layers"], num_heads=heads,
                  num_kv_heads=hf.get("num_key_value_heads") or heads,
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
                  norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf, source),
                  attention_bias=attention_bias, attention_out_bias=False if qwen2 else attention_bias,
                  mlp_bias=False if model_type != "llama" else bool(hf.get("mlp_bias", False)),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return CausalLMConfig(**(fields | {"name": name} | overrides))


class Source(NamedTuple):
  """Where one of our parameters comes from: HF tensor `name`, transposed or not, and for BLOOM's fused q/k/v the
  `part` (0 query, 1 key, 2 value) of its [heads, 3, head_dim] rows."""

  name: str
  transpose: bool
  part: int | None = None


def name_map(cfg: CausalLMConfig, prefix: str | None = None) -> dict[tuple[str, ...], Source]:
  """Our parameter path -> its HF source, in model order (so "first" reads naturally). `prefix` is the HF base
  model's ("transformer." for BLOOM, "model." for Llama; "" for checkpoints saved from the base model)."""
  names: dict[tuple[str, ...], Source] = {}
  linear = lambda ours, hf, bias, part=None: names.update(
      {ours + ("kernel",): Source(f"{hf}.weight", True, part)} |
      ({ours + ("bias",): Source(f"{hf}.bias", False, part)} if bias else {}))
  if cfg.is_bloom:
    p = "transformer." if prefix is None else prefix
    names[("token_embedder", "embedding")] = Source(f"{p}word_embeddings.weight", False)
    norm = lambda ours, hf: names.update({(ours, "scale"): Source(f"{hf}.weight", False),
                                          (ours, "bias"): Source(f"{hf}.bias", False)})
    norm("embedding_norm", f"{p}word_embeddings_layernorm")
    for i in range(cfg.num_layers):
      ours, hf = f"layers_{i}", f"{p}h.{i}"
      names[(ours, "pre_attention_layer_norm", "scale")] = Source(f"{hf}.input_layernorm.weight", False)
      names[(ours, "pre_attention_layer_norm", "bias")] = Source(f"{hf}.input_layernorm.bias", False)
      for part, proj in enumerate(("query", "key", "value")):
        linear((ours, "attention", proj), f"{hf}.self_attention.query_key_value", True, part)
      linear((ours, "attention", "out"), f"{hf}.self_attention.dense", True)
      names[(ours, "pre_mlp_layer_norm", "scale")] = Source(f"{hf}.post_attention_layernorm.weight", False)
      names[(ours, "pre_mlp_layer_norm", "bias")] = Source(f"{hf}.post_attention_layernorm.bias", False)
      linear((ours, "mlp", "wi"), f"{hf}.mlp.dense_h_to_4h", True)
      linear((ours, "mlp", "wo"), f"{hf}.mlp.dense_4h_to_h", True)
    norm("final_norm", f"{p}ln_f")
    return names
  p = "model." if prefix is None else prefix
  names[("token_embedder", "embedding")] = Source(f"{p}embed_tokens.weight", False)
  for i in range(cfg.num_layers):
    ours, hf = f"layers_{i}", f"{p}layers.{i}"
    names[(ours, "pre_attention_layer_norm", "scale")] = Source(f"{hf}.input_layernorm.weight", False)
    for proj, hf_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      linear((ours, "attention", proj), f"{hf}.self_attn.{hf_proj}", cfg.attention_bias)
    linear((ours, "attention", "out"), f"{hf}.self_attn.o_proj", cfg.attention_out_bias)
    names[(ours, "pre_mlp_layer_norm", "scale")] = Source(f"{hf}.post_attention_layernorm.weight", False)
    for proj, hf_proj in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
      linear((ours, "mlp", proj), f"{hf}.mlp.{hf_proj}", cfg.mlp_bias)
  names[("final_norm", "scale")] = Source(f"{p}norm.weight", False)
  if not cfg.tie_word_embeddings:
    names[("logits_dense", "kernel")] = Source("lm_head.weight", True)
  return names


def expected_shapes(cfg: CausalLMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Leaf shapes of `CausalLM(cfg).init` (abstractly evaluated; the XLA attention path traces anywhere)."""
  tokens = np.ones((1, 1), np.int32)
  init = lambda: CausalLM(dataclasses.replace(cfg, attention_impl="xla", remat=False)).init(
      jax.random.PRNGKey(0), tokens)
  params = nn.meta.unbox(jax.eval_shape(init))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _as_ours(shape: tuple[int, ...], src: Source) -> tuple[int, ...]:
  """The shape a HF tensor gives our parameter (before the check, from the stored shape alone)."""
  if src.part is not None and shape and shape[0] % 3 == 0:
    shape = (shape[0] // 3,) + shape[1:]
  return shape[::-1] if src.transpose else shape


def _take(array: np.ndarray, src: Source, num_heads: int) -> np.ndarray:
  if src.part is not None:  # rows [heads, 3, head_dim]: keep this part's [heads, head_dim] rows
    rows = array.reshape((num_heads, 3, -1) + array.shape[1:])[:, src.part]
    array = rows.reshape((-1,) + array.shape[1:])
  return array.T if src.transpose else array


def _base_prefix(cfg: CausalLMConfig, tensors: set[str]) -> str:
  """"transformer."/"model." as `*ForCausalLM.save_pretrained` writes, or "" for a base-model checkpoint (the
  released BLOOM files name tensors `h.0....`)."""
  standard, embedding = ("transformer.", "word_embeddings.weight") if cfg.is_bloom else ("model.",
                                                                                       "embed_tokens.weight")
  return "" if embedding in tensors and standard + embedding not in tensors else standard


def load_hf_causal_lm(path: str | os.PathLike, config: CausalLMConfig | None = None,
                      params_dtype: str | np.dtype | None = None) -> tuple[CausalLM, Params]:
  """(CausalLM(config), params) for a HF BLOOM/Llama/Mistral/Qwen2 `*ForCausalLM` safetensors directory.

  `params` is the contents of the `params` collection as a nested dict of plain host NumPy arrays, laid out as
  `CausalLM(config).init` makes them, so `model.apply({'params': params}, tokens, attention_mask)` gives float32
  logits [B, L, vocab]. `config` defaults to `config_from_hf_causal(path)` (bf16 compute); arrays are cast to
  `params_dtype`, by default `config.param_dtype`.

  Raises MissingFileError when the directory, config or weights are absent, and MismatchError naming the first
  parameter whose shape differs from `config`'s, or the missing or unexpected tensors.
  """
  t5_loader = _hf()  # pylint: disable=protected-access
  path = Path(path)
  shards = t5_loader._shard_files(path)
  hf = t5_loader._read_hf_config(path)[0] if (path / t5_loader.CONFIG_FILE).is_file() else None
  if config is None:
    if hf is None:
      raise MissingFileError(f"no {t5_loader.CONFIG_FILE} in {path}: pass `config=` to load_hf_causal_lm")
    config = config_from_hf_causal(path)
  dtype = np.dtype(params_dtype if params_dtype is not None else config.param_dtype)
  expected = expected_shapes(config)

  with contextlib.ExitStack() as stack:
    source = t5_loader.open_shards(stack, shards)
    hf_shape = lambda name: t5_loader.stored_shape(source, name)
    # BLOOM's fused q/k/v tensors serve three parameters each: read them once.
    read = functools.lru_cache(maxsize=2)(lambda name: source[name].get_tensor(name))

    names = name_map(config, _base_prefix(config, set(source)))
    if set(names) != set(expected):
      raise ValueError(f"internal: HF name map and model parameters differ: {sorted(set(names) ^ set(expected))}")
    embedding = names[("token_embedder", "embedding")].name
    embedding_copies = ["lm_head.weight"] if config.tie_word_embeddings else []
    if (not config.tie_word_embeddings and "lm_head.weight" not in source
        and hf is not None and hf.get("tie_word_embeddings", config.is_bloom)):
      names[("logits_dense", "kernel")] = Source(embedding, True)  # HF ties a head our config keeps separate

    for ours, src in names.items():
      if src.name not in source:
        continue
      found = _as_ours(hf_shape(src.name), src)
      if found != expected[ours]:
        raise t5_loader.shape_mismatch(ours, expected[ours], found, src.name, hf_shape(src.name), config.name)
    t5_loader.check_tensor_names(path, config.name, {src.name for src in names.values()}, set(source),
                                 set(embedding_copies) | {n for n in source if n.endswith(_IGNORED_SUFFIXES)})
    for name in embedding_copies:
      if name in source and not np.array_equal(read(name), read(embedding)):
        raise MismatchError(f"{name} differs from {embedding}, but {config.name} ties them "
                            "(tie_word_embeddings=True); our model cannot represent the checkpoint")

    params: Params = {}
    for ours, src in names.items():
      node = params
      for key in ours[:-1]:
        node = node.setdefault(key, {})
      node[ours[-1]] = np.ascontiguousarray(_take(read(src.name), src, config.num_heads), dtype=dtype)
  return CausalLM(config), params
