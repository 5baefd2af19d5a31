"""Methods by name: every routing or merging method is a builder registered here from its own module, so adding a
method is one file (or one function in the module whose math it uses) and nothing else.

A builder takes the `Experts` every method shares (the backbone and the stacked experts, placed on the mesh once,
the expert tasks, the settings) and returns a `Method`: the model to score with, its parameters and, for methods
that route a whole example, the routing ids of each example, and for methods that build a model per evaluation
task, the parameters of each task. Auxiliary data a method derives per expert (average activations, Arrow
prototypes, retrieval embeddings) is declared when it registers (`register("arrow", auxiliary=("arrow_prototypes",))`)
and goes through `Experts.auxiliary`, which keeps it in the expert library, keyed by the method's parameters, when
there is one: computed once per library and settings, read back by every later run. A method asking for auxiliary
data it did not declare is refused, so `auxiliary_data()` lists everything a set of methods will store.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from moe_jax.errors import ConfigError
from moe_jax.models import experts as ex
from moe_jax.models.config import ExpertConfig
from moe_jax.models.interface import build_model
from moe_jax.models.routers import Router, Uniform
from moe_jax.training import partitioning as part

# The modules whose builders make up the methods moe_jax ships, in the order results tables list them.
BUILTIN = ("moe_jax.methods.baselines", "moe_jax.methods.merged", "moe_jax.methods.merging",
           "moe_jax.methods.phatgoose", "moe_jax.methods.average_activation", "moe_jax.methods.arrow",
           "moe_jax.methods.retrieval", "moe_jax.methods.roe", "moe_jax.methods.oracle")


@dataclasses.dataclass
class Method:
  """What one method evaluates: a model, its parameters and, for per-example routing, the routing ids; for a
  method that builds one model per evaluation task (merging with weights read from that task's inputs),
  `task_params(task)` gives that task's parameters in place of `params`."""

  model: nn.Module
  params: Any
  routing_ids_fn: Callable[[str, Sequence[dict]], Sequence[int]] | None = None
  task_params: Callable[[str], Any] | None = None
  diagnose: bool = True  # whether its routing is worth diagnosing (not the oracle's, right by construction)
  selected: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # task -> the experts chosen for it

  def params_for(self, task: str) -> Any:
    return self.params if self.task_params is None else self.task_params(task)


@dataclasses.dataclass(frozen=True)
class Experts:
  """What every method builds from, inside `partitioning.activate(mesh, rules)`: `backbone`, `moe_tree` (expert i
  trained on the data of `expert_tasks[i]`, a task or a mixture of several, named `names[i]` in `library`) and
  `with_experts` (both together) already on the mesh. `skills[i]`: the tasks expert i was trained on (default:
  `expert_tasks[i]` alone), which decide an evaluation task's own expert."""

  config: Any
  backbone: Any
  moe_tree: Any
  with_experts: Any
  expert_tasks: tuple[str, ...]
  top_k: int
  base: ExpertConfig
  lengths: Mapping[str, int]
  mesh: Mesh
  rules: part.Rules
  multitask: Any = None
  library: Any = None  # an ExpertLibrary
  activation_examples: int = 1000
  retrieval_examples: int = 1000
  names: tuple[str, ...] = ()  # expert i's name in `library` (default: its task)
  skills: tuple[tuple[str, ...], ...] = ()
  eval_split: str = "validation"  # what evaluation scores, for methods that read a task's inputs before scoring it
  max_eval_examples: int | None = None
  eval_batch_size: int = 32
  building: str = ""  # the method being built (`build` sets it): what `auxiliary` checks declarations against

  def expert_skills(self) -> tuple[tuple[str, ...], ...]:
    return self.skills or tuple((task,) for task in self.expert_tasks)

  def own_expert(self, task: str) -> int | None:
    """The expert trained on `task`'s skill (a `_heldout` template shares its task's expert), None without one."""
    return own_expert(task, self.expert_skills())

  def layout(self, router: Router) -> ExpertConfig:
    """Every expert, routed by `router` (the layout comes from the experts, not from gin)."""
    modules, num, rank = ex.layout(self.moe_tree)
    return ex.layout_config(modules, num, rank, dataclasses.replace(self.base, router=router))

  def single(self) -> ExpertConfig:
    """One (merged) expert on the experts' modules."""
    modules, _, rank = ex.layout(self.moe_tree)
    return ex.layout_config(modules, 1, rank, dataclasses.replace(self.base, router=Uniform()))

  def method(self, model: nn.Module, params: Any, routing_ids_fn: Callable | None = None) -> Method:
    """A Method with its parameters placed as the rules shard `model` (arrays already there stay put)."""
    return Method(model, part.place(model, params, self.mesh, self.rules), routing_ids_fn)

  def routed(self, router: Router, routers: Any = None) -> Method:
    """Every expert behind `router`, with `routers` (a {module: {"router": [E, d_in]}} tree) replacing the
    experts' router vectors when given."""
    params = self.with_experts if routers is None else ex.merge(self.with_experts, routers)
    return self.method(build_model(self.config, self.layout(router)), params)

  def auxiliary(self, i: int, method: str, params: Mapping[str, Any],
                compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Expert i's stored auxiliary data (`ExpertLibrary.auxiliary`), or just `compute()` without a library.
    `method` must be one of the kinds the method being built declared when it registered."""
    if self.building and method not in _REGISTERED[self.building].auxiliary:
      raise ValueError(f"method {self.building!r} asks for auxiliary data {method!r} it did not declare "
                       f"(register({self.building!r}, auxiliary=(...)))")
    if self.library is None:
      return dict(compute())
    return self.library.auxiliary(self.expert_names()[i], method, params, compute)

  def one_expert(self, i: int) -> Any:
    return jax.tree.map(lambda x: x[i:i + 1], self.moe_tree)

  def expert_names(self) -> tuple[str, ...]:
    return self.names or self.expert_tasks

  def per_expert_routers(self, method: str, params: Mapping[str, Any],
                         compute: Callable[[int, str], Any]) -> Any:
    """Router vectors of every expert, each `compute(i, task)` (a {module: {"router": [1, d_in]}} tree) or the
    library's copy, stacked on the expert axis."""
    flat = lambda tree: {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}
    per_expert = [self.auxiliary(i, method, {**params, "task": task}, lambda i=i, task=task: flat(compute(i, task)))
                  for i, task in enumerate(self.expert_tasks)]
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): np.concatenate([r[k] for r in per_expert])
                                              for k in per_expert[0]})


def skill_of(task: str) -> str:
  """The skill (expert task) a task belongs to: a `_heldout` template's is the task it rewords."""
  return task.removesuffix("_heldout")


def own_expert(task: str, skills: Sequence[Sequence[str]]) -> int | None:
  """The first expert whose skills hold `task`'s skill, None for a task without one."""
  return next((i for i, tasks in enumerate(skills) if skill_of(task) in tasks), None)


Builder = Callable[[Experts], Method]


@dataclasses.dataclass(frozen=True)
class Registration:
  builder: Builder
  auxiliary: tuple[str, ...]  # the kinds of per-expert auxiliary data it keeps in the library


_REGISTERED: dict[str, Registration] = {}


def register(name: str, auxiliary: Sequence[str] = ()) -> Callable[[Builder], Builder]:
  """Decorator: `@register("arrow", auxiliary=("arrow_prototypes",)) def build_arrow(experts) -> Method`."""
  def add(builder: Builder) -> Builder:
    if name in _REGISTERED and _REGISTERED[name].builder is not builder:
      raise ValueError(f"method {name!r} is registered twice")
    _REGISTERED[name] = Registration(builder, tuple(auxiliary))
    return builder
  return add


def available() -> tuple[str, ...]:
  """Every registered method name (the built-in ones first, in table order)."""
  for module in BUILTIN:
    importlib.import_module(module)
  module = lambda name: _REGISTERED[name].builder.__module__
  place = lambda name: BUILTIN.index(module(name)) if module(name) in BUILTIN else len(BUILTIN)
  return tuple(sorted(_REGISTERED, key=place))  # stable: a module's own methods keep their order


def check(names: Sequence[str], where: str) -> None:
  unknown = sorted(set(names) - set(available()))
  if unknown:
    raise ConfigError(f"{where}: unknown method(s) {unknown}; expected some of {list(available())}")


def auxiliary_data(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """{method: the kinds of auxiliary data it stores per expert in the library} for these methods."""
  check(names, "methods")
  return {name: _REGISTERED[name].auxiliary for name in names}


def build(names: Sequence[str], experts: Experts) -> dict[str, Method]:
  check(names, "methods")
  return {name: _REGISTERED[name].builder(dataclasses.replace(experts, building=name)) for name in names}
