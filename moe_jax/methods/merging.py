"""Merging N LoRA experts into one (MTTL's library merges), each a plain function of an expert tree.

An expert tree is {module path parts: {"lora_a": [E, d_in, r], "lora_b": [E, r, d_out], "router": [E, d_in]}}
(`moe_jax.models.experts`). Merges either give a one-expert tree (E = 1, zero router vectors), run as plain LoRA
with `ExpertConfig(num_experts=1, router=Uniform())` on the same modules and rank, or fold an update into the
backbone:

- `uniform_parameters`: the (weighted) mean of the A's and, separately, of the B's (MTTL's `uniform` merge and the
  released PHATGOOSE code's `average_lora_weights`). mean(A) mean(B) is not the mean of the updates.
- `uniform_updates`: the (weighted) mean of the updates A_i B_i / r, folded into the backbone; this is
  `moe_jax.methods.merged.merged_experts` (the paper's Merged Experts), with the weights normalised here.
- Weighted merging: both of the above take `weights`, normalised to sum 1; `router_weights` turns a trained
  router's routing shares over a task's tokens into such weights.
- `ties_merge` / `ties_merge_experts`: TIES (trim, elect sign, disjoint mean) over each expert's flattened factors.

Flattening (`flatten_experts`), shared with Model-Based Clustering (`moe_jax.methods.mbc`): per expert, the modules
in sorted order of their "/"-joined paths, and per module lora_a then lora_b, each raveled in C order. Router
vectors are not part of an expert's LoRA parameters and are left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from moe_jax.errors import ConfigError, MismatchError
from moe_jax.methods import merged
from moe_jax.models import experts as ex
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.methods.routing import routing_shares
from moe_jax.models.interface import build_model
from moe_jax.models.config import T5Config
from moe_jax.models.routers import Phatgoose
from moe_jax.training import partitioning as part

Params = dict[str, Any]
_FACTORS = ("lora_a", "lora_b")


def normalise_weights(weights: Sequence[float] | np.ndarray, num_experts: int) -> np.ndarray:
  """float64 [E] `weights` divided by their sum. They must be finite and non-negative with a positive sum: a merge
  is a convex combination, so a weight vector that is not one is a mistake, not a request."""
  w = np.asarray(weights, np.float64).reshape(-1)
  if w.shape != (num_experts,):
    raise ConfigError(f"{w.size} merge weights for {num_experts} experts")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ConfigError(f"merge weights must be finite, non-negative and not all zero; got {w.tolist()}")
  return w / w.sum()


def uniform_parameters(moe_tree: Params, weights: Sequence[float] | None = None) -> Params:
  """A one-expert tree with A = sum_i w_i A_i and B = sum_i w_i B_i per module and zero router vectors; `weights`
  (normalised to sum 1) default to 1/E. MTTL's `uniform` (and weighted) merge. The one implementation is
  `merged.average_factors` (float32 sum, cast back to each factor's dtype); this adds the normalisation."""
  if weights is None:
    return merged.average_factors(moe_tree)
  _, num_experts, _ = ex.layout(moe_tree)
  return merged.average_factors(moe_tree, normalise_weights(weights, num_experts))


def uniform_updates(config: T5Config, backbone: Params, moe_tree: Params,
                    weights: Sequence[float] | None = None) -> tuple[T5Config, Params]:
  """(config, params) with the update sum_i w_i A_i B_i / r merged into the backbone (`weights` normalised to sum
  1, default 1/E): `moe_jax.methods.merged.merged_experts`, which folds the update into the kernels in float32
  compute and keeps it as a float32 `delta` beside them in narrower compute. Equal to uniform routing."""
  if weights is not None:
    weights = normalise_weights(weights, ex.layout(moe_tree)[1])
  return merged.merged_experts(config, backbone, moe_tree, weights)


def router_weights(shares: Mapping[str, Any] | Any, task: int | None = None) -> np.ndarray:
  """float64 [E] merge weights from a trained router: its routing shares for one task averaged over modules, then
  normalised to sum 1 (a top-k router's shares sum to k per module).

  `shares` is `moe_jax.methods.routing.routing_shares`'s {module path: [tasks, E]} with `task` the row to use, or
  {module path: [E]} (one task's rows), or an array [..., E] averaged over all its leading axes.
  """
  if isinstance(shares, Mapping):
    if not shares:
      raise ConfigError("router_weights: no routing shares given")
    rows = [np.asarray(v, np.float64) if task is None else np.asarray(v, np.float64)[task] for v in shares.values()]
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
      raise MismatchError(f"router_weights: each module must give one [E] row; got shapes "
                          f"{sorted({r.shape for r in rows})} (pass `task` for [tasks, E] shares)")
    mean = np.mean(np.stack(rows), axis=0)
  else:
    array = np.asarray(shares, np.float64)
    mean = array.reshape(-1, array.shape[-1]).mean(axis=0)
  return normalise_weights(mean, mean.shape[0])


def trim(flat: Any, keep: float) -> np.ndarray:
  """float64 [E, P]: per expert (row), the entries whose magnitude is among the top `keep` fraction of that row,
  the rest zeroed. The row keeps every non-zero entry with |x| >= t, where t is the n-th largest magnitude of the
  row and n = ceil(keep * P) (keep * P rounded to 6 decimals first, so 0.7 * 10 keeps 7; at least 1). Ties at t are
  all kept, so a row with repeated magnitudes may keep more than n entries; zeros are never "kept".
  MTTL thresholds at an interpolated quantile q of |x| instead (TIES keeps |x| >= q, MBC keeps |x| > q), which can
  keep one entry more or fewer at the boundary. Shared by TIES and Model-Based Clustering."""
  x = np.asarray(flat, np.float64)
  if x.ndim != 2 or x.shape[1] == 0:
    raise ConfigError(f"trim: expected [experts, parameters], got shape {list(x.shape)}")
  if not 0.0 < keep <= 1.0:
    raise ConfigError(f"trim: keep={keep} must be in (0, 1]")
  num = x.shape[1]
  count = min(num, max(1, math.ceil(round(keep * num, 6))))
  magnitude = np.abs(x)
  threshold = np.partition(magnitude, num - count, axis=1)[:, num - count:num - count + 1]
  return np.where((magnitude >= threshold) & (magnitude > 0), x, 0.0)


def ties_merge(flat: Any, keep: float = 0.2) -> np.ndarray:
  """TIES-merge E flattened experts `flat` [E, P] into one float32 vector [P] (computed in float64).

  1. Trim: per expert, keep the entries whose magnitude is in the top `keep` fraction over that whole flattened
     expert, zero the rest (`trim`: n = ceil(keep * P) per expert, ties at the n-th largest magnitude all kept).
  2. Elect: each entry's sign is the sign of the sum of its trimmed values over experts; an entry whose sum is 0
     (all trimmed, or exact cancellation) is merged to 0.
  3. Disjoint mean: each entry is the mean of the trimmed values that are non-zero and have the elected sign;
     with no such value it is 0.
  Float64 NumPy in, float32 out: the merged vector goes back into float32 (or narrower) factors.
  No scaling factor (lambda) is applied, as in MTTL's library merge (`TiesMerge`), which also gives 0 where the sum
  is 0 (it averages the zeros there); MTTL's newer `TiesMergeSimple` instead resolves such entries to the majority
  sign over all entries.
  """
  trimmed = trim(flat, keep)
  sign = np.sign(trimmed.sum(axis=0))
  agree = (np.sign(trimmed) == sign) & (trimmed != 0)
  count = agree.sum(axis=0)
  total = np.where(agree, trimmed, 0.0).sum(axis=0)
  return (total / np.maximum(count, 1)).astype(np.float32)


def flatten_experts(moe_tree: Params) -> np.ndarray:
  """float64 [E, P]: each expert's LoRA factors as one vector (modules in sorted path order, lora_a then lora_b per
  module, each raveled in C order), as MTTL flattens an expert's parameters. `unflatten_expert` inverts it."""
  flat = flax.traverse_util.flatten_dict(moe_tree)
  modules, num_experts, _ = ex.layout(moe_tree)
  parts = [np.asarray(flat[tuple(m.split("/")) + (leaf,)]).astype(np.float64).reshape(num_experts, -1)
           for m in modules for leaf in _FACTORS]
  return np.concatenate(parts, axis=1)


def unflatten_expert(vector: Any, like: Params) -> Params:
  """A one-expert tree from a vector [P] laid out as `flatten_experts(like)` lays out one expert: lora_a
  [1, d_in, r] and lora_b [1, r, d_out] in `like`'s dtypes, zero router vectors [1, d_in]."""
  flat = flax.traverse_util.flatten_dict(like)
  modules, _, _ = ex.layout(like)
  vector = np.asarray(vector).reshape(-1)
  sources = [(tuple(m.split("/")), leaf, np.asarray(flat[tuple(m.split("/")) + (leaf,)]))
             for m in modules for leaf in _FACTORS]
  total = sum(math.prod(source.shape[1:]) for _, _, source in sources)
  if total != vector.size:
    raise MismatchError(f"unflatten_expert: a vector of {vector.size} values for experts of {total} parameters")
  out, offset = {}, 0
  for key, leaf, source in sources:
    size = math.prod(source.shape[1:])
    out[key + (leaf,)] = vector[offset:offset + size].reshape((1,) + source.shape[1:]).astype(source.dtype)
    offset += size
    if leaf == "lora_a":
      out[key + ("router",)] = np.zeros((1, source.shape[1]), source.dtype)
  return flax.traverse_util.unflatten_dict(out)


def ties_merge_experts(moe_tree: Params, keep: float = 0.2) -> Params:
  """A one-expert tree: `ties_merge` over each expert's flattened LoRA factors (`flatten_experts`: all modules'
  A and B in one vector per expert, so the top-`keep` trimming is over the whole expert), unflattened into A and B
  in the factors' dtypes, with zero router vectors.

  This is TIES on the factors, as MTTL does it; it is not TIES on the updates A_i B_i (which would trim, elect and
  average the [d_in, d_out] products), and the merged A and B do not multiply to any average of updates."""
  return unflatten_expert(ties_merge(flatten_experts(moe_tree), keep), moe_tree)


@register("ties")
def build_ties(experts: Experts) -> Method:
  """TIES on each expert's flattened factors (top 20% kept, sign election, disjoint mean), one LoRA."""
  merged = ties_merge_experts(jax.tree.map(np.asarray, experts.moe_tree))
  return experts.method(build_model(experts.config, experts.single()), ex.merge(experts.backbone, merged))


@register("phatgoose_merged")
def build_phatgoose_merged(experts: Experts) -> Method:
  """Weighted merging with weights read from the trained gates, one merged model per evaluation task: PHATGOOSE's
  routing shares over the task's inputs (no labels: `routing_shares(inputs_only=True)`), averaged over modules
  (`router_weights`), weight the mean of the updates (`uniform_updates`). Between PHATGOOSE (per token, per
  module) and Merged Experts (one set of weights for every task)."""
  gates = experts.routed(Phatgoose(k=experts.top_k))
  config, uniform = uniform_updates(experts.config, experts.backbone, experts.moe_tree)
  model = build_model(config)

  def task_params(task: str) -> Params:
    shares = routing_shares(gates.model, gates.params, [task], experts.eval_split, experts.lengths,
                            experts.max_eval_examples, inputs_only=True)
    _, params = uniform_updates(experts.config, experts.backbone, experts.moe_tree, router_weights(shares, 0))
    return part.place(model, params, experts.mesh, experts.rules)

  return dataclasses.replace(experts.method(model, uniform), task_params=task_params)
