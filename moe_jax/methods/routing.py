"""Routing diagnostics: per expert module, the share of each task's tokens that the router sends to each expert.

Routing decisions are recomputed from each module's input with the model's own router (a flax method
interceptor, no hook in the model), counted over real tokens (encoder tokens for modules that read encoder
positions, target positions otherwise), and reduced on device per batch. Under `partitioning.activate` the batches
go onto the mesh as evaluation's do (`moe_jax.evaluation.scoring.fixed_batches`).

`routing_diagnostics` condenses those shares into what says whether routing found each task's expert: the share of
its routing choices that go to its own expert and the entropy of its routing, per module and averaged per side;
`diagnostics_markdown` puts them into results.md beside the oracle gap. A method that routes whole examples
(retrieval) gets the same measures from the experts it picks per example (`example_shares`, one pseudo-module
`EXAMPLE`). `routing_report` does all of it for every routing method of a results table and writes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import fs
from moe_jax.evaluation.scoring import batch_rows, fixed_batches, pad_tokens
from moe_jax.methods.average_activation import reads_encoder_positions
from moe_jax.methods.registry import Method, own_expert as skill_expert
from moe_jax.models.lora import Linear, has_experts, module_path
from moe_jax.models.routers import Uniform
from moe_jax.models import interface
from moe_jax.plots import plot_routing, plot_routing_diagnostics, task_label
from moe_jax.training import partitioning as part

_COLLECTION = "routing_counts"
EXAMPLE = "per example"  # the one pseudo-module of a method that routes whole examples


@functools.partial(jax.jit, static_argnums=0)
def _batch_counts(model: nn.Module, params: Any, encoder_tokens: jax.Array, decoder_tokens: jax.Array,
                  targets: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """{module path: tokens routed to each expert [E] (a token counts once per chosen expert)}; rows not `valid`
  (padding to the fixed batch shape) count for nothing. A decoder-only model reads `decoder_tokens` (its one
  sequence, shifted right) and counts every real position of `targets`."""
  decoder_only = interface.is_decoder_only(model)
  encoder_mask = ((encoder_tokens > 0) & valid[:, None]).astype(jnp.float32)
  decoder_mask = ((targets > 0) & valid[:, None]).astype(jnp.float32)

  def capture(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, Linear) and has_experts(module.experts,
                                                                                        module_path(module)):
      vectors = module.get_variable("params", "router")
      router = module.experts.router or Uniform()
      routing = router(args[0], vectors, args[1] if len(args) > 1 else None)
      weights = routing.weights if routing.experts is None else jnp.sum(
          jax.nn.one_hot(routing.experts, vectors.shape[0], dtype=jnp.float32), axis=-2)
      if routing.experts is None:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
      mask = encoder_mask if reads_encoder_positions(module_path(module)) else decoder_mask
      module.sow(_COLLECTION, "counts", jnp.einsum("ble,bl->e", weights, mask))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    if decoder_only:
      _, state = model.apply({"params": params}, decoder_tokens, (targets > 0).astype(jnp.int32),
                             mutable=[_COLLECTION])
    else:
      _, state = model.apply({"params": params}, encoder_tokens, decoder_tokens, mutable=[_COLLECTION])
  flat = flax.traverse_util.flatten_dict(state[_COLLECTION])
  return {"/".join(key[:-1]): value[0] for key, value in flat.items()}


def routing_shares(model: nn.Module, params: Any, tasks: Sequence[str], split: str,
                   feature_lengths: Mapping[str, int], max_examples: int | None = None,
                   batch_size: int = 32, inputs_only: bool = False) -> dict[str, np.ndarray]:
  """{module path: [len(tasks), E] share of each task's tokens routed to each expert} on the tasks' `split`,
  teacher-forced on the targets. Rows sum to k for top-k routers. A mixture counts as one task (its tasks'
  examples in equal shares).

  `inputs_only`: without the targets, for routing read before any label is seen: only the modules that route
  encoder positions (an encoder-decoder), or every module over the input positions (a decoder-only model)."""
  from moe_jax.data.pipeline import mixture_examples  # pylint: disable=g-import-not-at-top

  shares: dict[str, list[np.ndarray]] = {}
  for task in tasks:
    examples = mixture_examples(task, split, feature_lengths, max_examples)
    inputs = pad_tokens([e["inputs"] for e in examples], feature_lengths["inputs"])
    targets = pad_tokens([e["targets"] for e in examples], feature_lengths["targets"])
    if interface.is_decoder_only(model):  # one sequence: input then target, as the model was trained on them
      targets = pad_tokens([e["inputs"] if inputs_only else np.concatenate([e["inputs"], e["targets"]])
                            for e in examples], feature_lengths["inputs"] + feature_lengths["targets"])
    elif inputs_only:
      targets = np.zeros_like(targets)
    decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    tokens = {"encoder": float(np.sum(inputs > 0)), "decoder": float(np.sum(targets > 0))}
    index = np.arange(-(-len(examples) // batch_rows(batch_size)) * batch_rows(batch_size))
    valid = index < len(examples)  # whole batches: padding rows (copies of row 0) are marked, so they count nothing
    index = np.where(valid, index, 0)
    totals: dict[str, np.ndarray] = {}
    for _, _, batch in fixed_batches(len(index), batch_size, inputs[index], decoder_inputs[index], targets[index],
                                     valid):
      for path, value in part.to_host(_batch_counts(model, params, *batch)).items():
        totals[path] = totals.get(path, 0.0) + np.asarray(value, np.float64)
    for path, value in totals.items():
      side = "encoder" if reads_encoder_positions(path) else "decoder"
      if tokens[side] == 0:  # inputs only: the decoder side of an encoder-decoder saw no token
        continue
      shares.setdefault(path, []).append(value / tokens[side])
  return {path: np.stack(rows) for path, rows in shares.items()}


class Measures(TypedDict):
  """Per evaluation task: `own_share` (fraction of its routing choices sent to its own expert; NaN without one) and
  `entropy` (bits) of its routing distribution over experts."""
  own_share: dict[str, float]
  entropy: dict[str, float]


class Diagnostics(TypedDict):
  """Routing diagnostics of one routed model; plain dicts of floats, so results.json can hold them as they are."""
  chance_share: float  # 1/E: the own-expert share of routing that ignores the task
  max_entropy: float  # log2(E): the entropy of routing spread evenly over all experts
  modules: dict[str, Measures]  # {module path: measures}, in the order of `shares`
  summary: dict[str, Measures]  # {"encoder" | "decoder" | "all": means over those modules (NaN where none)}


def routing_diagnostics(shares: Mapping[str, np.ndarray], tasks: Sequence[str], expert_tasks: Sequence[str],
                        top_k: int, own_expert: Callable[[str], int | None] | None = None) -> Diagnostics:
  """Own-expert share and routing entropy of each task in each module of `shares` (`routing_shares`: [len(tasks), E],
  rows summing to `top_k`), and their means over the encoder side (modules that route encoder positions: the encoder
  and cross-attention key/value, `reads_encoder_positions`), the decoder side and all modules.

  A task's own expert is `own_expert(task)`, by default the expert trained on its skill (a `_heldout` template shares
  its skill's expert); a task with none (a held-out skill) has own share NaN: no choice of routing is right for it.
  """
  own_expert = own_expert or functools.partial(skill_expert, skills=[(t,) for t in expert_tasks])
  owners = [own_expert(task) for task in tasks]
  modules: dict[str, Measures] = {}
  for path, value in shares.items():
    value = np.asarray(value, np.float64)
    own = [math.nan if e is None else float(row[e] / top_k) for row, e in zip(value, owners)]
    modules[path] = Measures(own_share=dict(zip(tasks, own)), entropy=dict(zip(tasks, map(_entropy_bits, value))))
  per_token = [p for p in modules if p != EXAMPLE]
  sides = {"encoder": [p for p in per_token if reads_encoder_positions(p)],
           "decoder": [p for p in per_token if not reads_encoder_positions(p)], "all": list(modules)}
  summary = {side: Measures(**{measure: {task: _mean([modules[p][measure][task] for p in paths]) for task in tasks}
                               for measure in ("own_share", "entropy")})
             for side, paths in sides.items()}
  num_experts = len(expert_tasks)
  return Diagnostics(chance_share=1.0 / num_experts, max_entropy=math.log2(num_experts), modules=modules,
                     summary=summary)


def diagnostics_markdown(diagnostics: Diagnostics, table: Mapping[str, Mapping[str, float]],
                         tasks: Sequence[str], method: str = "phatgoose") -> str:
  """A results.md section on `method`'s routing: per evaluation task, the own-expert share per side (one share for
  a method that routes whole examples), the routing entropy and, when `table` ({method: {task: score}}) holds both
  "oracle" and `method`, the oracle gap, which says how much better routing could do on that task."""
  summary, max_entropy = diagnostics["summary"], diagnostics["max_entropy"]
  gap = "oracle" in table and method in table
  per_example = list(diagnostics["modules"]) == [EXAMPLE]
  sides = ("all",) if per_example else ("encoder", "decoder", "all")
  header = ["task", *(["own share (%)"] if per_example else [f"own share, {side} (%)" for side in sides]),
            f"entropy (bits, max {max_entropy:.2f})", *(["oracle gap (points)"] if gap else [])]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for task in tasks:
    cells = [task_label(task), *(_cell(100 * summary[side]["own_share"][task], ".1f") for side in sides),
             _cell(summary["all"]["entropy"][task], ".2f")]
    if gap:
      cells.append(_cell(table["oracle"].get(task, math.nan) - table[method].get(task, math.nan), "+.1f"))
    rows.append("| " + " | ".join(cells) + " |")
  what = ("the share of its examples sent to its own expert and the entropy of its examples' spread over experts"
          if per_example else "averaged over expert modules: the share of its routing choices (tokens x k) that go "
          "to its own expert (encoder side: modules that route encoder positions, i.e. the encoder and "
          "cross-attention key/value; decoder side: the rest) and the entropy of its routing over experts")
  return (f"## {method} routing diagnostics\n\nPer evaluation task, {what}"
          + (f"; the oracle gap is the oracle's score minus {method}'s" if gap else "") + ". n/a: the task has no "
          "expert of its own.\n\n" + "\n".join(rows) + f"\n\nChance share 1/E = "
          f"{100 * diagnostics['chance_share']:.1f}%; maximum entropy log2(E) = {max_entropy:.2f} bits.\n")


def example_shares(routing_ids_fn: Callable[[str, Sequence[dict]], Sequence[int]], num_experts: int,
                   tasks: Sequence[str], split: str, feature_lengths: Mapping[str, int],
                   max_examples: int | None = None) -> dict[str, np.ndarray]:
  """{EXAMPLE: [len(tasks), E]}: the share of each task's examples that a per-example router (`Method.routing_ids_fn`,
  e.g. retrieval) sends to each expert, on the examples evaluation scores."""
  from moe_jax.data.pipeline import mixture_examples  # pylint: disable=g-import-not-at-top

  rows = []
  for task in tasks:
    ids = np.asarray(routing_ids_fn(task, mixture_examples(task, split, feature_lengths, max_examples)), np.int64)
    rows.append(np.bincount(ids, minlength=num_experts)[:num_experts] / max(len(ids), 1))
  return {EXAMPLE: np.stack(rows)}


def routes_tokens(method: Method) -> bool:
  """Whether a method routes every token by router vectors (PHATGOOSE, Average Activation, Arrow)."""
  router = getattr(getattr(method.model, "experts", None), "router", None)
  return bool(getattr(router, "uses_vectors", False)) and method.routing_ids_fn is None


@dataclasses.dataclass(frozen=True)
class RoutingReport:
  """Routing diagnostics of every routing method of a table: its shares and measures, and the results.md text."""

  shares: dict[str, dict[str, np.ndarray]]  # {method: {module path (or EXAMPLE): [tasks, E]}}
  diagnostics: dict[str, Diagnostics]
  markdown: str


def routing_report(methods: Mapping[str, Method], table: Mapping[str, Mapping[str, float]], tasks: Sequence[str],
                   heldin: Sequence[str], num_experts: int, top_k: int, own_expert: Callable[[str], int | None],
                   split: str, feature_lengths: Mapping[str, int],
                   max_examples: int | None = None) -> RoutingReport:
  """Diagnostics of each method that routes (by tokens: `routing_shares`; by examples: `example_shares`; the
  oracle and methods with `Method.diagnose` False are left out) on every evaluation task, one results.md section
  each, then the token routers compared on the `heldin` tasks (own share, and their router vectors' agreement with
  the first one's: did the gates find more than the mean input or Arrow's prototypes?)."""
  shares, diagnostics, sections = {}, {}, []
  for name, method in methods.items():
    if not method.diagnose:
      continue
    if routes_tokens(method):
      shares[name], k = routing_shares(method.model, method.params, tasks, split, feature_lengths, max_examples), top_k
    elif method.routing_ids_fn is not None:
      shares[name], k = example_shares(method.routing_ids_fn, num_experts, tasks, split, feature_lengths,
                                       max_examples), 1
    else:
      continue
    diagnostics[name] = routing_diagnostics(shares[name], tasks, [str(i) for i in range(num_experts)], k, own_expert)
    sections.append(diagnostics_markdown(diagnostics[name], table, tasks, name))
  token_routers = [n for n in diagnostics if routes_tokens(methods[n])]
  if len(token_routers) > 1 and heldin:
    first = token_routers[0]
    sections.append(comparison_markdown(
        token_routers, [diagnostics[n] for n in token_routers], heldin,
        {n: router_agreement(methods[first].params, methods[n].params) for n in token_routers[1:]}))
  return RoutingReport(shares, diagnostics, "\n".join(sections))


def write_routing_files(report: RoutingReport, run_dir: str, tasks: Sequence[str],
                        expert_labels: Sequence[str]) -> None:
  """`routing_diagnostics.json` ({method: diagnostics}); per routing method its shares (`routing.npz`), their heat
  maps (`routing.png`) and, for token routers, the diagnostics per module (`routing_diagnostics.png`): PHATGOOSE's
  (or the first routing method's) under these names, every other method's as `routing_<method>.npz` etc. Process 0
  writes."""
  if jax.process_index() != 0 or not report.diagnostics:
    return
  fs.write_text(fs.join(run_dir, "routing_diagnostics.json"), json.dumps(report.diagnostics, indent=1) + "\n")
  primary = "phatgoose" if "phatgoose" in report.diagnostics else next(iter(report.diagnostics))
  for name, shares in report.shares.items():
    suffix = "" if name == primary else f"_{name}"
    arrays = io.BytesIO()
    np.savez(arrays, tasks=np.array(tasks), experts=np.array(expert_labels),
             **{k.replace("/", "."): v for k, v in shares.items()})
    fs.write_bytes(fs.join(run_dir, f"routing{suffix}.npz"), arrays.getvalue())
    plot_routing(shares, list(tasks), list(expert_labels), fs.join(run_dir, f"routing{suffix}.png"))
    if EXAMPLE not in shares:
      plot_routing_diagnostics(report.diagnostics[name], list(tasks),
                               fs.join(run_dir, f"routing_diagnostics{suffix}.png"))


def _entropy_bits(row: np.ndarray) -> float:
  """Entropy in bits of a routing row normalised to a distribution (0 log 0 = 0)."""
  p = row / row.sum()
  p = p[p > 0]
  return float(-np.sum(p * np.log2(p)))


def _mean(values: Sequence[float]) -> float:
  return float(np.mean(values)) if values else math.nan


def _cell(value: float, spec: str) -> str:
  return "n/a" if math.isnan(value) else format(value, spec)


def router_agreement(params_a: Any, params_b: Any) -> dict[str, np.ndarray]:
  """{module path: [E] correlation of expert i's router vector in `params_a` with its vector in `params_b`}: the
  cosine of the standardised vectors, which is what PHATGOOSE's router compares (e.g. trained gates against
  average-activation vectors, the question whether gate training found more than the experts' mean input)."""
  flat = lambda p: {path: np.asarray(v, np.float64) for path, v in part.to_host(
      {"/".join(k[:-1]): jnp.asarray(v) for k, v in flax.traverse_util.flatten_dict(p).items()
       if k[-1] == "router"}).items()}
  a, b = flat(params_a), flat(params_b)
  unit = lambda v: (lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True))(v - v.mean(axis=-1, keepdims=True))
  return {path: np.sum(unit(a[path]) * unit(b[path]), axis=-1) for path in a}


def comparison_markdown(names: Sequence[str], diagnostics: Sequence[Diagnostics], heldin: Sequence[str],
                        agreements: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """A results.md section comparing routers: each one's own-expert share over the held-in tasks per side, and the
  mean correlation of each other router's vectors with the first one's (`agreements[name]`) per side."""
  sides = ("encoder", "decoder", "all")
  rows = ["| router | " + " | ".join(f"own share, {s} (%)" for s in sides) + " |", "|---|---|---|---|"]
  for name, d in zip(names, diagnostics):
    rows.append(f"| {name} | " + " | ".join(
        _cell(100 * _mean([d["summary"][s]["own_share"][t] for t in heldin]), ".1f") for s in sides) + " |")
  lines = []
  for name, agreement in agreements.items():
    correlation = {s: _mean([float(np.mean(v)) for p, v in agreement.items()
                             if s == "all" or (s == "encoder") == reads_encoder_positions(p)]) for s in sides}
    lines.append(f"Mean correlation of each expert's {names[0]} router vector with its {name} vector: " + ", ".join(
        f"{s} {_cell(correlation[s], '.2f')}" for s in sides) + ".")
  return "## Routers compared on the held-in tasks\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines) + "\n"
