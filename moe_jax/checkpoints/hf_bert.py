"""Load Hugging Face BERT checkpoints (a `BertModel` or a sentence-transformers folder) into `Bert`'s parameter tree.

As `moe_jax.checkpoints.hf` for T5: config.json plus `model.safetensors` (or a sharded index), read with
safetensors' NumPy API, no PyTorch and no network; every tensor's shape is checked against the model's before any
data is read, with the same first-mismatch / missing / unexpected messages. Tensors are named as `BertModel` saves
them, bare (`embeddings.word_embeddings.weight`, sentence-transformers) or under `bert.` (`BertFor*` models, whose
heads are ignored, as is the pooler: a sentence embedder pools the hidden states itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from moe_jax.checkpoints import hf
from moe_jax.errors import ConfigError, MismatchError
from moe_jax.models.bert import Bert, BertConfig

Params = dict[str, Any]
# The tensors our model is built from; any other tensor (pooler, task heads) is a part we do not compute.
_ENCODER = ("embeddings.", "encoder.")
# A buffer HF saves beside the weights: the positions 0..max-1 our model computes.
_POSITION_IDS = "embeddings.position_ids"


def config_from_hf_bert(path_or_dict: str | os.PathLike | dict[str, Any]) -> BertConfig:
  """BertConfig from a HF BERT `config.json` (a file, its directory, or the parsed dict). ConfigError for what the
  model does not implement: another model_type, an activation other than exact GELU, relative positions."""
  config, source = hf._read_hf_config(path_or_dict)  # pylint: disable=protected-access
  # field -> (its value, with HF's default where it has one; the only value implemented)
  required = {"model_type": (config.get("model_type"), "bert"),
              "hidden_act": (config.get("hidden_act", "gelu"), "gelu"),
              "position_embedding_type": (config.get("position_embedding_type", "absolute"), "absolute")}
  for field, (found, supported) in required.items():
    if found != supported:
      raise ConfigError(f"{source}: {field}={found!r} is not supported; only {supported!r} BERT models are")
  fields = [f.name for f in dataclasses.fields(BertConfig)]
  missing = [f for f in fields if f not in config]
  if missing:
    raise MismatchError(f"{source}: missing field(s) {missing}")
  return BertConfig(**{f: config[f] for f in fields})


def name_map(cfg: BertConfig, prefix: str = "") -> dict[tuple[str, ...], tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, transposed), in model order (so "first" reads naturally). `prefix`:
  "bert." for `BertFor*` checkpoints, "" for `BertModel` and sentence-transformers ones."""
  names: dict[tuple[str, ...], tuple[str, bool]] = {}
  linear = lambda ours, theirs: names.update({ours + ("kernel",): (f"{theirs}.weight", True),
                                              ours + ("bias",): (f"{theirs}.bias", False)})
  norm = lambda ours, theirs: names.update({ours + ("scale",): (f"{theirs}.weight", False),
                                            ours + ("bias",): (f"{theirs}.bias", False)})
  for ours, theirs in (("word", "word"), ("position", "position"), ("token_type", "token_type")):
    names[("embeddings", ours, "embedding")] = (f"{prefix}embeddings.{theirs}_embeddings.weight", False)
  norm(("embeddings", "norm"), f"{prefix}embeddings.LayerNorm")
  for i in range(cfg.num_hidden_layers):
    ours, theirs = f"layers_{i}", f"{prefix}encoder.layer.{i}"
    for proj in ("query", "key", "value"):
      linear((ours, "attention", proj), f"{theirs}.attention.self.{proj}")
    linear((ours, "attention", "out"), f"{theirs}.attention.output.dense")
    norm((ours, "attention_norm"), f"{theirs}.attention.output.LayerNorm")
    linear((ours, "mlp", "wi"), f"{theirs}.intermediate.dense")
    linear((ours, "mlp", "wo"), f"{theirs}.output.dense")
    norm((ours, "mlp_norm"), f"{theirs}.output.LayerNorm")
  return names


def expected_shapes(cfg: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Leaf shapes of `Bert(cfg).init`, abstractly evaluated."""
  tokens = np.ones((1, 1), np.int32)
  params = nn.meta.unbox(jax.eval_shape(lambda: Bert(cfg).init(jax.random.PRNGKey(0), tokens, tokens)))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def load_hf_bert(path: str | os.PathLike, config: BertConfig | None = None) -> Params:
  """Float32 parameters of the BERT checkpoint in directory `path`, as a nested dict of host NumPy arrays laid out
  as `Bert(config).init` makes them (`config` defaults to `config_from_hf_bert(path)`).

  Raises MissingFileError when the directory, config or weights are absent, and MismatchError naming the first
  parameter whose shape differs from `config`'s, or the missing or unexpected encoder tensors.
  """
  path = Path(path)
  shards = hf._shard_files(path)  # pylint: disable=protected-access
  config = config_from_hf_bert(path) if config is None else config
  expected = expected_shapes(config)
  model = f"BERT {config.num_hidden_layers}x{config.hidden_size}"

  with contextlib.ExitStack() as stack:
    source = hf.open_shards(stack, shards)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in source else ""
    names = name_map(config, prefix)
    if set(names) != set(expected):
      raise ValueError(f"internal: HF name map and model parameters differ: {sorted(set(names) ^ set(expected))}")
    for ours, (name, transpose) in names.items():
      if name not in source:
        continue
      stored = hf.stored_shape(source, name)
      found = stored[::-1] if transpose else stored
      if found != expected[ours]:
        raise hf.shape_mismatch(ours, expected[ours], found, name, stored, model)
    ignored = {n for n in source if not n.startswith(tuple(prefix + part for part in _ENCODER))}
    hf.check_tensor_names(path, model, {name for name, _ in names.values()}, set(source),
                          ignored | {prefix + _POSITION_IDS})

    params: Params = {}
    for ours, (name, transpose) in names.items():
      array = source[name].get_tensor(name)
      node = params
      for key in ours[:-1]:
        node = node.setdefault(key, {})
      node[ours[-1]] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
  return params
