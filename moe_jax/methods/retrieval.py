"""PHATGOOSE's retrieval baseline: send each example to the expert whose stored training instances it most
resembles.

Up to `Experts.retrieval_examples` (the paper: 1000) training instances per expert are embedded and kept in the
expert library; an example goes to the expert holding its most cosine-similar stored instance (max over that
expert's instances, argmax over experts: the top-1 neighbour's expert). By default instances are embedded as the
paper did, "Answer Choices: ..., Instance: ..." through all-MiniLM-L6-v2; `instance_embedding.embedder =
'backbone'` embeds them with the backbone instead (`moe_jax.methods.instances`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_jax.checkpoints import identity
from moe_jax.methods.instances import InstanceIndex, example_embedder, instance_embedding
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models.interface import build_model
from moe_jax.models.routers import Fixed


def stored_instances(experts: Experts, kind: str, count: int) -> tuple[InstanceIndex, object]:
  """(the index of up to `count` embedded training instances of every expert, cached in the library as auxiliary
  data `kind`; the embedder that made it, for queries)."""
  from moe_jax.data.pipeline import mixture_examples  # pylint: disable=g-import-not-at-top  (TensorFlow)

  settings = {**instance_embedding(), "max_examples": count, "feature_lengths": dict(experts.lengths)}
  if settings["embedder"] != "minilm":
    settings["backbone"] = identity.weights_checksum(experts.backbone)
  embed = example_embedder(settings, experts.config, experts.backbone, experts.lengths)
  stored = [experts.auxiliary(i, kind, {**settings, "task": task}, lambda task=task: {
      "embeddings": embed(mixture_examples(task, "train", experts.lengths, count))})["embeddings"]
            for i, task in enumerate(experts.expert_tasks)]
  return InstanceIndex.from_embeddings(stored, settings["search"]), embed


@register("retrieval", auxiliary=("retrieval_embeddings",))
def build_retrieval(experts: Experts) -> Method:
  """One expert per example: the one whose stored training instances its own instance most resembles."""
  index, embed = stored_instances(experts, "retrieval_embeddings", experts.retrieval_examples)

  def route(task: str, examples: Sequence[dict]) -> np.ndarray:
    return index.nearest(embed(examples))[0]

  return experts.method(build_model(experts.config, experts.layout(Fixed())), experts.with_experts, route)
