"""The frozen backbone a run loads, placed once on the mesh, with what identifies it: its weights' checksum and its
vocabulary (`Backbone.record()` is what every product made on it records).

Sources: random (`init_from=None`, seeded), a Hugging Face T5 directory (config.json + safetensors, its
`spiece.model` as the vocabulary), or the `backbone/` of a multitask run (orbax, with the record it was saved with).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from moe_jax import fs
from moe_jax.checkpoints.hf import CONFIG_FILE, load_hf_t5
from moe_jax.checkpoints.identity import weights_checksum
from moe_jax.checkpoints.t5x import is_t5x_checkpoint, load_t5x
from moe_jax.data import vocab
from moe_jax.errors import MismatchError, MissingFileError
from moe_jax.models.config import T5Config
from moe_jax.models.interface import build_model, is_decoder_only
from moe_jax.training import partitioning as part

BACKBONE_DIR = "backbone"


@dataclasses.dataclass(frozen=True)
class Backbone:
  """Backbone parameters on the mesh and their identity."""

  params: Any
  weights: str  # `identity.weights_checksum(params)`
  source: str  # init_from, or "random(seed=S)"
  vocabulary: vocab.VocabSpec
  config: T5Config

  def record(self) -> dict[str, Any]:
    """What a product made on this backbone records, and what a run compares it with."""
    return {"model": self.config.name, "fingerprint": self.config.fingerprint(), "weights": self.weights,
            "source": self.source, "vocabulary": self.vocabulary.record()}


def describe(record: dict[str, Any] | None) -> str:
  """A backbone record as a person reads it in an error."""
  if not record:
    return "an unrecorded backbone (a file written before moe_jax recorded backbones)"
  return f"{record.get('source')} (model {record.get('model')}, weights {record.get('weights')})"


def check_same(found: dict[str, Any] | None, backbone: Backbone, what: str) -> None:
  """Raise MismatchError unless `what` (e.g. "expert file X") was made on exactly this backbone's weights."""
  if not found or found.get("weights") != backbone.weights:
    raise MismatchError(f"{what} was trained on backbone {describe(found)}, but this run's backbone is "
                        f"{describe(backbone.record())}: use the backbone it was trained on")


def load_backbone(init_from: str | None, config: T5Config, shardings: Any, seed: int = 0) -> Backbone:
  """The backbone of `init_from` placed per `shardings` (`partitioning.logical_shardings` of the backbone model),
  with its checksum computed on the devices and its vocabulary resolved (`moe_jax.data.vocab.for_backbone`)."""
  if init_from is None:
    tokens = jnp.ones((1, 1), jnp.int32)
    init = lambda: nn.meta.unbox(build_model(config).init(jax.random.PRNGKey(seed), tokens, tokens))["params"]
    params = jax.jit(init, out_shardings=shardings)()
    spec = vocab.for_backbone(None, "a randomly initialised backbone", config.vocab_size, config.name)
    return Backbone(params, weights_checksum(params), f"random(seed={seed})", spec, config)
  if not fs.exists(init_from):
    raise MissingFileError(f"init_from={init_from!r} does not exist (expected a Hugging Face T5 or causal LM "
                           "directory, a T5X checkpoint_<step> directory or the model_dir of a multitask run)")
  if fs.isfile(fs.join(init_from, CONFIG_FILE)):
    if fs.is_url(init_from):
      raise MissingFileError(f"init_from={init_from!r}: Hugging Face directories are read from local disk; copy "
                             "it to the machine (e.g. gsutil -m cp -r) and point init_from there")
    if is_decoder_only(config):
      from moe_jax.checkpoints.hf_causal import load_hf_causal_lm  # pylint: disable=g-import-not-at-top
      params = jax.device_put(load_hf_causal_lm(init_from, config)[1], shardings)
    else:
      params = jax.device_put(load_hf_t5(init_from, config), shardings)
    spec = vocab.for_backbone(vocab.hf_vocabulary(init_from), init_from, config.vocab_size, config.name)
    return Backbone(params, weights_checksum(params), init_from, spec, config)
  if is_t5x_checkpoint(init_from):  # a T5X checkpoint_<step>/ carries no vocabulary: the gin binding's
    params = jax.device_put(load_t5x(init_from, config), shardings)
    spec = vocab.for_backbone(None, init_from, config.vocab_size, config.name)
    return Backbone(params, weights_checksum(params), init_from, spec, config)
  directory = fs.join(init_from, BACKBONE_DIR) if fs.isdir(fs.join(init_from, BACKBONE_DIR)) else init_from
  params, metadata = restore_backbone(directory, config, shardings)
  spec = vocab.for_backbone(metadata.get("vocabulary"), directory, config.vocab_size, config.name,
                            metadata.get("vocabulary_path"))
  weights = weights_checksum(params)
  if metadata.get("weights") not in (None, weights):
    raise MismatchError(f"backbone checkpoint {directory}: its weights' checksum is {weights}, but it was saved "
                        f"with {metadata['weights']}; the checkpoint is damaged")
  return Backbone(params, weights, fs.absolute(directory), spec, config)


def save_backbone(directory: str, params: Any, config: T5Config, record: dict[str, Any] | None = None) -> None:
  """Orbax save of a backbone with its record (fingerprint, weights checksum, vocabulary, the run that made it);
  atomic: orbax writes a temporary directory and renames it when done."""
  metadata = {"model_name": config.name, "fingerprint": config.fingerprint(), "weights": weights_checksum(params),
              **(record or {})}  # record: task, config, config_hash, parent, vocabulary (+ vocabulary_path, a hint)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(fs.absolute(directory), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)))


def read_backbone_metadata(directory: str) -> dict[str, Any]:
  """The JSON record a `save_backbone` directory carries."""
  path = fs.absolute(directory)
  if not fs.isdir(fs.join(path, "metadata")):
    raise MissingFileError(f"no backbone checkpoint in {directory} (expected a multitask run's {BACKBONE_DIR}/)")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def restore_backbone(directory: str, config: T5Config, shardings: Any) -> tuple[Any, dict[str, Any]]:
  """(params placed per `shardings`, metadata) of a `save_backbone` directory; refuses one of another model."""
  found = read_backbone_metadata(directory)
  if found.get("fingerprint") != config.fingerprint():
    raise MismatchError(f"backbone checkpoint {directory} belongs to model {found.get('model_name')!r} (fingerprint "
                        f"{found.get('fingerprint')}), but this run's model is {config.name!r} "
                        f"(fingerprint {config.fingerprint()})")
  abstract = nn.meta.unbox(part.abstract_params(build_model(config)))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    params = checkpointer.restore(fs.absolute(directory),
                                  args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
  return params, found
