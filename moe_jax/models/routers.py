"""Routers: per token, per expert module, which experts to use and with what weight.

A router maps the module's input x [..., d_in], the experts' router vectors at that module [E, d_in] and optional
per-example routing ids [B] to a `Routing`. Routers are frozen dataclasses (hashable, so they are static under jit
and bindable from gin, e.g. `ExpertConfig.router = @Phatgoose()`). New methods (Arrow, task-level routing, ...) are
new subclasses: anything that can say "these k experts, these weights" per token plugs in.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp

from moe_jax.errors import ConfigError

Array = jax.Array


class Routing(NamedTuple):
  """Per-token expert choice. `experts` [..., k] int32, `weights` [..., k] float32.

  `experts=None` means every expert, in order: `weights` is then [..., E] and the routed computation can use the
  dense formulation without any gather.
  """

  experts: Array | None
  weights: Array


@dataclasses.dataclass(frozen=True)
class Router:
  """Base class. `uses_vectors`: whether the router reads the per-expert router vectors."""

  uses_vectors = False

  def __call__(self, x: Array, vectors: Array, routing_ids: Array | None) -> Routing:
    raise NotImplementedError


def top_k(scores: Array, k: int) -> tuple[Array, Array]:
  """`jax.lax.top_k(scores, k)` over the last axis (values, int32 indices; ties to the lower index). On a CPU, for
  float32 scores, the indices come from the C++ kernel of `moe_jax.models.routed_cpu` when it builds (XLA:CPU's TopK
  cost as much as a module's routed LoRA) and the values are gathered from `scores`, so gradients flow as through
  `jax.lax.top_k`."""
  if jax.default_backend() == "cpu" and scores.dtype == jnp.float32:
    from moe_jax.models import routed_cpu  # pylint: disable=g-import-not-at-top
    if routed_cpu.available():
      indices = routed_cpu.top_k_indices(scores, k)
      return jnp.take_along_axis(scores, indices, axis=-1), indices
  return jax.lax.top_k(scores, k)


def standardize(x: Array, eps: float = 1e-5) -> Array:
  """Zero mean, unit variance over the last axis, no affine (LayerNorm without scale/bias), in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Phatgoose(Router):
  """PHATGOOSE: s_i = <std(x), std(g_i)> / sqrt(d_in); top-k; softmax over the k kept scores.

  The reference code renormalises the kept softmax probabilities as p / (sum p + 1e-6); that differs from this by
  a relative 1e-6 / (kept probability mass), under 1e-5 unless the kept mass is below 0.1.

  std(x) sums to zero over d_in, so <std(x), std(g_i)> = <std(x), g_i> / sigma(g_i): the scores are the matmul with
  the raw router vectors, scaled per expert, and no standardised [E, d_in] copy of them is written per call (one
  pass fewer per module: ~0.2 ms of a routed `cpu` benchmark layer's ~8.5 ms).
  """

  k: int = 2
  eps: float = 1e-5
  uses_vectors = True

  def __call__(self, x, vectors, routing_ids=None):
    num_experts, d_in = vectors.shape
    if not 1 <= self.k <= num_experts:
      raise ConfigError(f"Phatgoose router: k={self.k} but the module has {num_experts} experts")
    vectors = vectors.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.var(vectors, axis=-1) + self.eps) / jnp.sqrt(jnp.float32(d_in))
    scores = jnp.einsum("...d,ed->...e", standardize(x, self.eps), vectors,
                        precision=jax.lax.Precision.HIGHEST) * scale
    top_scores, top_experts = top_k(scores, self.k)
    return Routing(top_experts.astype(jnp.int32), jax.nn.softmax(top_scores, axis=-1))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SigmoidGate(Router):
  """Gate training: every expert contributes sigmoid(<v_i, x>) times its update (no normalisation)."""

  uses_vectors = True

  def __call__(self, x, vectors, routing_ids=None):
    logits = jnp.einsum("...d,ed->...e", x.astype(jnp.float32), vectors.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return Routing(None, jax.nn.sigmoid(logits))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Uniform(Router):
  """Mean of all experts (weight 1/E each). With one expert this is plain LoRA, used for expert training."""

  def __call__(self, x, vectors, routing_ids=None):
    num_experts = vectors.shape[0]
    return Routing(None, jnp.full(x.shape[:-1] + (num_experts,), 1.0 / num_experts, jnp.float32))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Fixed(Router):
  """One expert per example: `expert` for all, or the model call's `routing_ids` [batch] when given.

  Covers single-expert, oracle (routing_ids = the example's task expert) and retrieval (routing_ids = the
  retrieved expert) evaluation.
  """

  expert: int | None = None

  def __call__(self, x, vectors, routing_ids=None):
    num_experts = vectors.shape[0]
    if routing_ids is None:
      if self.expert is None:
        raise ValueError("Fixed router needs `expert` or per-example `routing_ids`")
      if not 0 <= self.expert < num_experts:
        raise ConfigError(f"Fixed router: expert={self.expert} but the module has {num_experts} experts")
      ids = jnp.full(x.shape[:1], self.expert, jnp.int32)
    else:
      ids = jnp.asarray(routing_ids, jnp.int32)
    experts = jnp.broadcast_to(ids.reshape(ids.shape + (1,) * (x.ndim - 1)), x.shape[:-1] + (1,))
    return Routing(experts, jnp.ones(experts.shape, jnp.float32))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Arrow(Router):
  """Arrow (MTTL's `arrow_router`): s_i = |<x, v_i>| / temperature; top-k; softmax over the k kept scores.

  v_i is expert i's prototype at this module (`moe_jax.methods.arrow.arrow_routers`: the unit input direction its
  LoRA update stretches most). x is not normalised, so the scores scale with |x| and the temperature sets how
  peaked the softmax is. The absolute value makes the score blind to the prototype's sign, which the SVD leaves
  undetermined. `k=None` keeps every expert (a dense softmax, `Routing.experts=None`), MTTL's `top_k=-1`. Ties go
  to the lower expert index (`jax.lax.top_k`, as in `Phatgoose`). MTTL reads a temperature <= 0 as sqrt(d_in);
  here it is an error, so a typo cannot silently change the routing.
  """

  k: int | None = 2
  temperature: float = 1.0
  uses_vectors = True

  def __call__(self, x, vectors, routing_ids=None):
    num_experts = vectors.shape[0]
    if self.k is not None and not 1 <= self.k <= num_experts:
      raise ConfigError(f"Arrow router: k={self.k} but the module has {num_experts} experts")
    if not self.temperature > 0:
      raise ConfigError(f"Arrow router: temperature={self.temperature}; it must be positive")
    scores = jnp.abs(jnp.einsum("...d,ed->...e", x.astype(jnp.float32), vectors.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)) / jnp.float32(self.temperature)
    if self.k is None:
      return Routing(None, jax.nn.softmax(scores, axis=-1))
    top_scores, top_experts = top_k(scores, self.k)
    return Routing(top_experts.astype(jnp.int32), jax.nn.softmax(top_scores, axis=-1))
