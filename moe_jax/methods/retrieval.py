"""Retrieval routing: send each example to the expert whose stored training inputs it most resembles.

The index keeps up to `max_per_expert` embedded inputs per expert; an example goes to the expert holding its most
cosine-similar stored input (max over that expert's examples, argmax over experts). The ids it returns are
`routing_ids` for the model call with the `Fixed()` router. The embedding is pluggable; the default embeds with
the backbone itself (mean of its final states over the input's real tokens), so it runs offline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import identity
from moe_jax.evaluation.scoring import batch_rows, pad_tokens
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models import interface
from moe_jax.models.routers import Fixed
from moe_jax.models.interface import build_model
from moe_jax.models.t5 import Transformer
from moe_jax.training import partitioning as part

EmbedFn = Callable[[np.ndarray], np.ndarray]  # token batch [B, L] int -> embeddings [B, D] float


def prompt_mean_embedder(config: Any, backbone: Any) -> EmbedFn:
  """Embed a token batch as the mean of the backbone's final states over real tokens (ids > 0): the encoder's
  output for an encoder-decoder, the final norm's output for a decoder-only model reading the input alone.
  Computed where the backbone lies; under `partitioning.activate` the batch goes onto the mesh, so its rows must
  split evenly over the `batch` rule's devices (`moe_jax.evaluation.scoring.batch_rows`)."""
  model = build_model(config)
  decoder_only = interface.is_decoder_only(config)

  @jax.jit
  def embed(params, tokens):
    mask = (tokens > 0).astype(jnp.float32)
    if decoder_only:
      _, state = model.apply({"params": params}, tokens, mask.astype(jnp.int32), mutable=["intermediates"],
                             capture_intermediates=lambda module, method: module.name == "final_norm")
      states = state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)
    else:
      states = model.apply({"params": params}, tokens, method=Transformer.encode).astype(jnp.float32)
    total = jnp.einsum("bld,bl->bd", states, mask, precision=jax.lax.Precision.HIGHEST)
    return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)

  return lambda tokens: part.to_host(embed(backbone, part.place_batch(np.asarray(tokens))))


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class RetrievalIndex:
  """Unit-norm stored embeddings [M, D] with the expert id of each row [M] (rows grouped by expert, in order)."""

  embed_fn: EmbedFn
  embeddings: np.ndarray
  expert_ids: np.ndarray
  num_experts: int

  @classmethod
  def build(cls, embed_fn: EmbedFn, per_expert_inputs: Sequence[np.ndarray | Iterable[np.ndarray]],
            max_per_expert: int = 1000) -> RetrievalIndex:
    """Embed up to `max_per_expert` inputs of each expert. `per_expert_inputs[i]`: expert i's token batches (an
    iterable of [B, L] arrays, or one [n, L] array)."""
    per_expert = []
    for inputs in per_expert_inputs:
      batches = [inputs] if isinstance(inputs, np.ndarray) else inputs
      rows, kept = [], 0
      for tokens in batches:
        if kept >= max_per_expert:
          break
        tokens = np.asarray(tokens)[:max_per_expert - kept]
        rows.append(np.asarray(embed_fn(tokens), np.float32))
        kept += len(tokens)
      per_expert.append(np.concatenate(rows) if rows else np.zeros((0, 1), np.float32))
    return cls.from_embeddings(embed_fn, per_expert)

  @classmethod
  def from_embeddings(cls, embed_fn: EmbedFn, per_expert: Sequence[np.ndarray]) -> RetrievalIndex:
    """An index of already embedded inputs (`per_expert[i]`: expert i's [n_i, D] embeddings, e.g. stored in an
    expert library)."""
    empty = [i for i, e in enumerate(per_expert) if len(e) == 0]
    if empty:
      raise ValueError(f"RetrievalIndex.from_embeddings: expert {empty[0]} has no inputs")
    ids = [np.full((len(e),), i, np.int32) for i, e in enumerate(per_expert)]
    return cls(embed_fn, np.concatenate([_unit(e) for e in per_expert]), np.concatenate(ids), len(per_expert))

  def similarities(self, embeddings: np.ndarray) -> np.ndarray:
    """[Q, N]: per query, the highest cosine similarity to any stored input of each expert."""
    cosine = _unit(embeddings) @ self.embeddings.T
    return np.stack([cosine[:, self.expert_ids == e].max(axis=1) for e in range(self.num_experts)], axis=1)

  def route(self, embeddings: np.ndarray) -> np.ndarray:
    """Expert id [Q] int32 per query embedding (ties: the lower id)."""
    return np.argmax(self.similarities(embeddings), axis=1).astype(np.int32)

  def route_tokens(self, tokens: np.ndarray) -> np.ndarray:
    """`route` of a token batch embedded with this index's `embed_fn`: the model call's `routing_ids`."""
    return self.route(self.embed_fn(tokens))


class FixedShapeEmbedder:
  """An embedding function called on fixed [batch, length] blocks (no recompiles for every query count)."""

  def __init__(self, embed: EmbedFn, length: int, batch: int):
    self.embed, self.length, self.batch = embed, length, batch

  def tokens(self, examples: Sequence[dict]) -> np.ndarray:
    return pad_tokens([e["inputs"] for e in examples], self.length)

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    n = len(tokens)
    padded = np.concatenate([tokens, np.repeat(tokens[:1], -n % self.batch, axis=0)])
    return np.concatenate([self.embed(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch)])[:n]


@register("retrieval", auxiliary=("retrieval_embeddings",))
def build_retrieval(experts: Experts) -> Method:
  """One expert per example: the one whose stored training inputs (embedded by the backbone, cached in the
  library) its input most resembles."""
  from moe_jax.data.pipeline import mixture_examples  # pylint: disable=g-import-not-at-top  (TensorFlow)

  embed = FixedShapeEmbedder(prompt_mean_embedder(experts.config, experts.backbone), experts.lengths["inputs"],
                             batch_rows(32))
  settings = {"max_examples": experts.retrieval_examples, "feature_lengths": dict(experts.lengths),
              "embedder": "backbone prompt mean", "backbone": identity.weights_checksum(experts.backbone)}
  stored = [experts.auxiliary(i, "retrieval_embeddings", {**settings, "task": task}, lambda task=task: {
      "embeddings": embed(embed.tokens(mixture_examples(task, "train", experts.lengths,
                                                        experts.retrieval_examples)))})["embeddings"]
            for i, task in enumerate(experts.expert_tasks)]
  index = RetrievalIndex.from_embeddings(embed, stored)
  route = lambda task, examples: index.route_tokens(embed.tokens(examples))
  return experts.method(build_model(experts.config, experts.layout(Fixed())), experts.with_experts, route)
