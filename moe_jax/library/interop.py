"""Experts in and out of the Hugging Face ecosystem: a PEFT LoRA adapter directory becomes a library expert, and a
library expert becomes a PEFT adapter (`moe_jax.checkpoints.peft` does the tensor conversion).

With the Hugging Face T5 directory the adapter belongs to (`backbone`), the expert records that backbone as every
expert this library trains does (weights checksum, vocabulary), so it stacks and routes with them; without it, it
records only the adapter's `base_model_name_or_path` and no run will take it as trained on its backbone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from moe_jax import fs
from moe_jax.checkpoints import peft
from moe_jax.library.expert import ExpertInfo, make_expert
from moe_jax.library.library import ExpertLibrary


def hf_backbone(directory: str) -> tuple[Any, dict[str, Any]]:
  """(T5Config, backbone record) of a Hugging Face T5 directory: what a run on it records as its backbone
  (`moe_jax.training.backbone.Backbone.record`), computed on the host without TensorFlow."""
  from moe_jax.checkpoints.hf import config_from_hf, load_hf_t5  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints.identity import weights_checksum  # pylint: disable=g-import-not-at-top
  from moe_jax.data import vocab  # pylint: disable=g-import-not-at-top

  config = config_from_hf(directory)
  spec = vocab.hf_vocabulary(directory) or vocab.VocabSpec()  # no spiece.model: a byte-level model
  return config, {"model": config.name, "fingerprint": config.fingerprint(),
                  "weights": weights_checksum(load_hf_t5(directory, config)), "source": fs.absolute(directory),
                  "vocabulary": spec.record()}


def import_peft_expert(adapter_dir: str, library: ExpertLibrary, name: str, backbone: str | None = None,
                       tasks: Sequence[str] = (), tags: Sequence[str] = ()) -> ExpertInfo:
  """Add the PEFT LoRA adapter in `adapter_dir` to `library` as expert `name`; returns its info."""
  config, record = hf_backbone(backbone) if backbone else (None, None)
  tree, info = peft.import_peft(adapter_dir, config)
  if record is None:
    record = {"model": info.get("base_model"), "source": info.get("base_model")}
  expert = make_expert(ExpertInfo(
      name=name, tasks=list(tasks), backbone=record,
      config={"peft": info["peft_config"]}, source=f"peft:{fs.absolute(os.fspath(adapter_dir))}",
      tags=["peft", *tags]), tree)
  library.add(expert)
  return expert.info


def export_peft_expert(library: ExpertLibrary, name: str, adapter_dir: str, backbone: str | None = None) -> None:
  """Write library expert `name` as a PEFT LoRA adapter directory (its router vectors in a side file)."""
  from moe_jax.checkpoints.hf import config_from_hf  # pylint: disable=g-import-not-at-top

  expert = library.get(name)
  config = config_from_hf(backbone) if backbone else None
  base = (expert.info.backbone or {}).get("source")
  peft.export_peft(expert.weights, adapter_dir, base_model_name_or_path=base, config=config)
