"""The teacher's or student's language model, loaded for generation or scoring without TensorFlow: a Hugging Face
directory (a causal LM: BLOOM, Llama, ...; or a T5), a run dir of this package (its `backbone/`, with the
vocabulary it recorded), or a random model (tests), with the `Codec` that turns its text into ids."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import fs
from moe_jax.checkpoints.identity import weights_checksum
from moe_jax.data import vocab
from moe_jax.errors import ConfigError, MissingFileError
from moe_jax.models.interface import build_model, is_decoder_only
from moe_jax.teacher.text import Codec, codec_for
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import BACKBONE_DIR, restore_backbone


def _is_hf_t5(model_path: str) -> bool:
  return json.loads(fs.read_text(fs.join(model_path, vocab.HF_CONFIG))).get("model_type") in ("t5", "mt5")


def model_config_for(model_path: str | None, model_config: Any) -> Any:
  """The bound config (a `CausalLMConfig` or `T5Config`), else a HF directory's own config.json; a moe_jax run dir
  needs the binding."""
  if model_config is not None:
    return model_config
  if model_path and fs.isfile(fs.join(model_path, vocab.HF_CONFIG)):
    if _is_hf_t5(model_path):
      from moe_jax.checkpoints.hf import config_from_hf  # pylint: disable=g-import-not-at-top
      return config_from_hf(model_path)
    from moe_jax.checkpoints.hf_causal import config_from_hf_causal  # pylint: disable=g-import-not-at-top
    return config_from_hf_causal(model_path)
  raise ConfigError(f"model {model_path!r} has no config.json: bind its model config (include a gin/models/*.gin "
                    "file and model_config = @CausalLMConfig() or @T5Config())")


class Loaded(NamedTuple):
  """A language model ready to generate or score: module, parameters on the mesh, their checksum, its codec."""

  model: nn.Module
  params: Any
  weights: str
  codec: Codec


def load_lm(model_path: str | None, config: Any, seed: int = 0, mesh: Any = None) -> Loaded:
  """A HF causal LM or T5 directory, a run dir (or its `backbone/`) of this package, or (None) a random model of
  `seed`, placed on `mesh` (default: `make_mesh()`, every process's devices). Unlike
  `training.backbone.load_backbone` this builds no seqio vocabulary, so generation and scoring run without
  TensorFlow (the GPU machines have none)."""
  model = build_model(config)
  mesh, rules = mesh or part.make_mesh(), part.axis_rules()
  shardings = part.logical_shardings(part.abstract_params(model), mesh, rules)
  if model_path is None:
    tokens = jnp.ones((1, 1), jnp.int32)
    init = lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens))["params"]
    params = jax.jit(init, out_shardings=shardings)()
    spec = vocab.binding()
  elif not fs.exists(model_path):
    raise MissingFileError(f"model {model_path!r} does not exist (a HF causal LM or T5 directory or a run dir)")
  elif fs.isfile(fs.join(model_path, vocab.HF_CONFIG)):
    if is_decoder_only(config):
      from moe_jax.checkpoints.hf_causal import load_hf_causal_lm  # pylint: disable=g-import-not-at-top
      params = jax.device_put(load_hf_causal_lm(model_path, config)[1], shardings)
    else:
      from moe_jax.checkpoints.hf import load_hf_t5  # pylint: disable=g-import-not-at-top
      params = jax.device_put(load_hf_t5(model_path, config), shardings)
    spec = vocab.hf_vocabulary(model_path) or vocab.binding()
  else:
    directory = fs.join(model_path, BACKBONE_DIR) if fs.isdir(fs.join(model_path, BACKBONE_DIR)) else model_path
    params, metadata = restore_backbone(directory, config, shardings)
    record = metadata.get("vocabulary") or {}
    spec = vocab.VocabSpec(record.get("kind", "byte"), metadata.get("vocabulary_path"), record.get("extra_ids"),
                           record.get("eos_id"))
  return Loaded(model, params, weights_checksum(params), codec_for(model_path, spec, is_decoder_only(config)))
