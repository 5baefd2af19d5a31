"""Load Hugging Face T5 checkpoints (config.json + safetensors) into our T5X-named parameter tree.

Tensors are read with safetensors' NumPy API, so loading needs neither PyTorch nor a network: a released model is
used from a local directory (a `save_pretrained` or hub snapshot). Every tensor is checked against the shapes
`Transformer(config).init` would create before any data is read, so a checkpoint for another model size fails fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy, which safetensors' NumPy API needs for bf16 files
import numpy as np
from flax import linen as nn
from safetensors import safe_open

from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models.config import FEED_FORWARDS, T5Config
from moe_jax.models.t5 import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SHAPE_FIELDS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers")
# Copies of `shared.weight` that some checkpoints store; HF ties them, so they must equal it.
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old checkpoints carry a bias HF never uses (cross-attention has no relative positions).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

Params = dict[str, Any]


def _read_hf_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
  """The config dict and a name for it in error messages."""
  if isinstance(path_or_dict, dict):
    return path_or_dict, "the given config dict"
  path = Path(path_or_dict)
  if path.is_dir():
    path = path / CONFIG_FILE
  if not path.is_file():
    raise MissingFileError(f"no Hugging Face {CONFIG_FILE} at {path}")
  with open(path) as f:
    return json.load(f), str(path)


def _hf_ties_lm_head(hf: dict[str, Any]) -> bool:
  """Whether HF computes logits with `shared.weight` (no `lm_head.weight` needed); HF's default is to tie."""
  return bool(hf.get("tie_word_embeddings", True))


def config_from_hf(path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> T5Config:
  """T5Config from a HF T5 `config.json` (a file, its directory, or the parsed dict); `overrides` win.

  Our `tie_word_embeddings` means "logits from the embedding, scaled by d_model**-0.5" (T5 1.0). transformers >= 5
  always ties and saves `tie_word_embeddings: true`, recording the scaling as `scale_decoder_outputs`; an unscaled
  but tied HF model becomes our untied one and `load_hf_t5` copies the embedding into `logits_dense`.
  """
  hf, source = _read_hf_config(path_or_dict)
  model_type = hf.get("model_type", "t5")
  if model_type != "t5":
    raise ConfigError(f"{source}: model_type={model_type!r}; only 't5' checkpoints are supported")
  proj = hf.get("feed_forward_proj", "relu")  # HF's names and defaults; ours use the same names
  if proj not in FEED_FORWARDS:
    raise ConfigError(f"{source}: feed_forward_proj={proj!r} is not supported; expected one of {FEED_FORWARDS}")
  missing = [k for k in _SHAPE_FIELDS if k not in hf]
  if missing:
    raise MismatchError(f"{source}: missing field(s) {missing}")
  name = "hf_t5" if isinstance(path_or_dict, dict) else Path(source).resolve().parent.name
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
      num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      feed_forward=proj,
      tie_word_embeddings=bool(hf.get("scale_decoder_outputs", _hf_ties_lm_head(hf))),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      dropout_rate=hf.get("dropout_rate", 0.1),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      name=name)
  return T5Config(**(fields | overrides))


def name_map(cfg: T5Config) -> dict[tuple[str, ...], tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, whether to transpose), in model order (so "first" reads naturally)."""
  mlp = ("wi_0", "wi_1", "wo") if cfg.feed_forward == "gated-gelu" else ("wi", "wo")
  attn = {"query": "q", "key": "k", "value": "v", "out": "o"}
  names: dict[tuple[str, ...], tuple[str, bool]] = {("token_embedder", "embedding"): ("shared.weight", False)}

  def attention(ours: tuple[str, ...], hf: str) -> None:
    for our_name, hf_name in attn.items():
      names[ours + (our_name, "kernel")] = (f"{hf}.{hf_name}.weight", True)

  def block(stack: str, layers: int, norms: tuple[str, ...], attentions: tuple[tuple[str, str], ...]) -> None:
    # HF stores [buckets, heads] in block 0 only, since the bias is shared by the whole stack.
    names[(stack, "relpos_bias", "rel_embedding")] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
    for i in range(layers):
      ours, hf = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
      for j, norm in enumerate(norms):
        names[ours + (norm, "scale")] = (f"{hf}.{j}.layer_norm.weight", False)
      for j, (our_attn, hf_attn) in enumerate(attentions):
        attention(ours + (our_attn,), f"{hf}.{j}.{hf_attn}")
      for w in mlp:
        names[ours + ("mlp", w, "kernel")] = (f"{hf}.{len(norms) - 1}.DenseReluDense.{w}.weight", True)

  block("encoder", cfg.num_encoder_layers, ("pre_attention_layer_norm", "pre_mlp_layer_norm"),
        (("attention", "SelfAttention"),))
  names[("encoder", "encoder_norm", "scale")] = ("encoder.final_layer_norm.weight", False)
  block("decoder", cfg.num_decoder_layers,
        ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"),
        (("self_attention", "SelfAttention"), ("encoder_decoder_attention", "EncDecAttention")))
  names[("decoder", "decoder_norm", "scale")] = ("decoder.final_layer_norm.weight", False)
  if not cfg.tie_word_embeddings:
    names[("decoder", "logits_dense", "kernel")] = ("lm_head.weight", True)
  return names


def expected_shapes(cfg: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Leaf shapes of `Transformer(cfg).init` (abstractly evaluated; the XLA attention path traces anywhere)."""
  tokens = np.ones((1, 1), np.int32)
  init = lambda: Transformer(dataclasses.replace(cfg, attention_impl="xla", remat=False)).init(
      jax.random.PRNGKey(0), tokens, tokens)
  params = nn.meta.unbox(jax.eval_shape(init))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _shard_files(path: Path) -> list[Path]:
  if not path.is_dir():
    raise MissingFileError(f"Hugging Face checkpoint directory {path} does not exist")
  if (path / WEIGHTS_FILE).is_file():
    return [path / WEIGHTS_FILE]
  if (path / INDEX_FILE).is_file():
    with open(path / INDEX_FILE) as f:
      shards = [path / name for name in sorted(set(json.load(f)["weight_map"].values()))]
    absent = [str(s) for s in shards if not s.is_file()]
    if absent:
      raise MissingFileError(f"{path / INDEX_FILE} lists shard(s) that do not exist: {absent}")
    return shards
  found = sorted(p.name for p in path.iterdir())
  raise MissingFileError(f"neither {WEIGHTS_FILE} nor {INDEX_FILE} in {path} (found {found}); only safetensors "
                         "checkpoints are supported")


def open_shards(stack: contextlib.ExitStack, shards: list[Path]) -> dict[str, Any]:
  """Tensor name -> the open safetensors shard holding it (closed with `stack`)."""
  source: dict[str, Any] = {}
  for shard in shards:
    handle = stack.enter_context(safe_open(str(shard), framework="np"))
    source.update({name: handle for name in handle.keys()})
  return source


def stored_shape(source: dict[str, Any], name: str) -> tuple[int, ...]:
  return tuple(source[name].get_slice(name).get_shape())


def shape_mismatch(ours: tuple[str, ...], expected: tuple[int, ...], found: tuple[int, ...], name: str,
                   stored: tuple[int, ...], model: str) -> MismatchError:
  """The first-mismatch error every checkpoint loader raises."""
  return MismatchError(f"parameter {'/'.join(ours)}: expected shape {expected} for {model}, found {found} (HF tensor "
                       f"{name}, stored as {stored}); is the checkpoint for another model size?")


def check_tensor_names(path: Path, model: str, used: set[str], available: set[str], allowed: set[str]) -> None:
  """MismatchError listing the tensors the model needs that `path` lacks, then those it has that nothing reads
  (besides `allowed`)."""
  missing = sorted(used - available)
  if missing:
    raise MismatchError(f"{len(missing)} tensor(s) missing from the checkpoint in {path}: {missing[:8]}"
                        f"{' ...' if len(missing) > 8 else ''}")
  unexpected = sorted(available - used - allowed)
  if unexpected:
    raise MismatchError(f"{len(unexpected)} unexpected tensor(s) in the checkpoint in {path} for {model}: "
                        f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def load_hf_t5(path: str | os.PathLike, config: T5Config | None = None,
               params_dtype: str | np.dtype | None = None) -> Params:
  """Parameters of a HF `T5ForConditionalGeneration` safetensors checkpoint directory, in our tree.

  Returns the contents of the `params` collection as a nested dict of plain (unboxed) host NumPy arrays, laid out
  and named as `Transformer(config).init` makes them, so `Transformer(config).apply({'params': p}, ...)` works and
  callers can `jax.device_put` them with any sharding. `config` defaults to `config_from_hf(path)`; arrays are cast to
  `params_dtype`, by default `config.param_dtype` (bf16 files need no PyTorch: NumPy reads them via ml_dtypes).

  Raises FileNotFoundError when the directory, config or weights are absent, and ValueError naming the first
  parameter whose shape differs from `config`'s, or the missing or unexpected tensors.
  """
  path = Path(path)
  shards = _shard_files(path)
  hf = _read_hf_config(path)[0] if (path / CONFIG_FILE).is_file() else None
  if config is None:
    if hf is None:
      raise MissingFileError(f"no {CONFIG_FILE} in {path}: pass `config=` to load_hf_t5")
    config = config_from_hf(path)
  dtype = np.dtype(params_dtype if params_dtype is not None else config.param_dtype)
  names = name_map(config)
  expected = expected_shapes(config)
  if set(names) != set(expected):
    raise ValueError(f"internal: HF name map and model parameters differ: {sorted(set(names) ^ set(expected))}")

  with contextlib.ExitStack() as stack:
    source = open_shards(stack, shards)
    hf_shape = lambda name: stored_shape(source, name)
    read = lambda name: source[name].get_tensor(name)

    embedding_copies = list(_EMBEDDING_COPIES)
    if config.tie_word_embeddings:
      embedding_copies.append("lm_head.weight")
    elif "lm_head.weight" not in source and hf is not None and _hf_ties_lm_head(hf):
      names[("decoder", "logits_dense", "kernel")] = ("shared.weight", True)  # HF's unscaled tied head

    for ours, (name, transpose) in names.items():
      if name not in source:
        continue
      found = hf_shape(name)
      found = found[::-1] if transpose else found
      if found != expected[ours]:
        raise shape_mismatch(ours, expected[ours], found, name, hf_shape(name), config.name)
    check_tensor_names(path, config.name, {name for name, _ in names.values()}, set(source),
                       set(embedding_copies) | set(_IGNORED))

    shared = read("shared.weight")
    for name in embedding_copies:
      if name in source and not np.array_equal(read(name), shared):
        raise MismatchError(f"{name} differs from shared.weight, but {config.name} ties them "
                            "(tie_word_embeddings=True); our model cannot represent the checkpoint")

    params: Params = {}
    for ours, (name, transpose) in names.items():
      array = shared if name == "shared.weight" else read(name)
      node = params
      for key in ours[:-1]:
        node = node.setdefault(key, {})
      node[ours[-1]] = np.ascontiguousarray(array.T if transpose else array, dtype=dtype)
  return params
from moe_jax.checkpoints.hf_causal import load_hf_causal_lm  # noqa: E402,F401
