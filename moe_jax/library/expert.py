"""What a library holds per expert: its description (`ExpertInfo`) and its weights (`Expert`).

An expert is one LoRA (plus its router/gate vectors) on a frozen backbone: the leaves `lora_a` [1, d_in, r],
`lora_b` [1, r, d_out] and `router` [1, d_in] of every module it adapts, as `moe_jax.models.experts.split` gives
them. The info says what a user needs to reuse it without the run that made it: the backbone it belongs to (name,
architecture fingerprint, weight checksum, vocabulary), the module layout, the configuration it was trained with
and where it came from.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import numpy as np

from moe_jax.errors import ConfigError, MismatchError
from moe_jax.models import experts as ex

Params = dict[str, Any]
# Letters, digits and . _ - + = @ , : and `/` (a namespace: `p3/ag_news`); no empty, `.` or `..` parts.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,:-]*(/[A-Za-z0-9_][A-Za-z0-9._+=@,:-]*)*")
MAX_NAME = 200
# The characters a storage key keeps as they are; everything else (the `/` of a namespace first) is %-escaped, so
# every name is one flat, reversible file name on every backend.
_KEY_SAFE = "._+=@,-"


def check_name(name: Any) -> str:
  """`name` if it can name an expert; ConfigError saying which rule it breaks otherwise."""
  if not isinstance(name, str) or not name:
    raise ConfigError(f"expert name {name!r}: give a non-empty string")
  if len(name) > MAX_NAME:
    raise ConfigError(f"expert name {name[:40]!r}... is {len(name)} characters long; at most {MAX_NAME}")
  if not _NAME.fullmatch(name):
    raise ConfigError(f"expert name {name!r}: use letters, digits and . _ - + = @ , : with `/` between parts "
                      "(each part starting with a letter, digit or _)")
  return name


def storage_key(name: str) -> str:
  """The flat file name of an expert (`p3/ag_news` -> `p3%2Fag_news`); `name_of_key` inverts it."""
  return urllib.parse.quote(check_name(name), safe=_KEY_SAFE)


def name_of_key(key: str) -> str:
  return urllib.parse.unquote(key)


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ExpertInfo:
  """An expert's description, stored as JSON beside its weights.

  backbone: `moe_jax.training.backbone.Backbone.record()` ({"model", "fingerprint" (architecture), "weights" (value
    checksum), "source", "vocabulary"}): the one backbone the expert is valid on.
  modules: a regex that fullmatches exactly the adapted module paths (`moe_jax.models.experts.exact_modules`).
  config: the effective settings it was trained with (the stage records of `moe_jax.training.loop`), and
    gin_config: the run's config.gin text; identity: a hash of what decides the weights (the pipeline skips
    retraining an expert whose identity matches).
  parent: the expert this one was derived from (a name), if any. source: where it was imported from.
  """

  name: str
  tasks: tuple[str, ...] = ()
  backbone: Mapping[str, Any] | None = None
  modules: str = ""
  rank: int = 0
  config: Mapping[str, Any] | None = None
  gin_config: str | None = None
  identity: str | None = None
  parent: str | None = None
  source: str | None = None
  created: str = ""
  tags: tuple[str, ...] = ()

  def __post_init__(self):
    check_name(self.name)
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "tags", tuple(self.tags))

  def to_json(self) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)}

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> ExpertInfo:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in known})

  @property
  def task(self) -> str | None:
    return self.tasks[0] if self.tasks else None


@dataclasses.dataclass(frozen=True)
class Expert:
  """An expert's info and weights (a tree of host NumPy arrays with a leading expert axis of 1)."""

  info: ExpertInfo
  weights: Params

  @property
  def name(self) -> str:
    return self.info.name

  def module_paths(self) -> list[str]:
    return ex.layout(self.weights)[0]

  def flat_weights(self) -> dict[str, np.ndarray]:
    """{"<module path>/<leaf>": array}: the tensor names of the stored file."""
    return {"/".join(k): np.ascontiguousarray(v) for k, v in flax.traverse_util.flatten_dict(self.weights).items()}


def make_expert(info: ExpertInfo, weights: Params) -> Expert:
  """An Expert whose info agrees with its weights: one expert on exactly the info's modules with its rank (both
  filled in from the weights when the info leaves them empty). MismatchError names what disagrees."""
  _, weights = ex.split(weights)
  modules, num_experts, rank = ex.layout(weights)
  if num_experts != 1:
    raise MismatchError(f"expert {info.name!r}: the weights hold {num_experts} experts; a library entry is one")
  regex = ex.exact_modules(modules)
  if info.modules and info.modules != regex and not all(re.fullmatch(info.modules, m) for m in modules):
    raise MismatchError(f"expert {info.name!r}: its modules regex {info.modules!r} does not cover {modules[0]}")
  if info.rank and info.rank != rank:
    raise MismatchError(f"expert {info.name!r}: info says rank {info.rank}, the weights have rank {rank}")
  flat = flax.traverse_util.flatten_dict(weights)
  host = {k: np.asarray(v) for k, v in flat.items()}
  return Expert(dataclasses.replace(info, modules=regex, rank=rank, created=info.created or now()),
                flax.traverse_util.unflatten_dict(host))


def stack_experts(experts: Sequence[Expert]) -> tuple[Params, dict[str, Any]]:
  """(MoE tree with the experts on the expert axis in the given order, MoE file metadata as
  `moe_jax.methods.concatenate` writes it). Every expert must be on one backbone with one module layout."""
  if not experts:
    raise ConfigError("no experts to stack")
  first = experts[0]
  for other in experts[1:]:
    mine, theirs = (first.info.backbone or {}).get("weights"), (other.info.backbone or {}).get("weights")
    if mine != theirs:
      raise MismatchError(f"expert {other.name!r} was trained on backbone weights {theirs}, {first.name!r} on "
                          f"{mine}: one MoE holds one backbone's experts")
  tree = ex.stack([e.weights for e in experts], [e.name for e in experts])
  backbone = first.info.backbone or {}
  metadata = {"base_model": backbone.get("model"), "fingerprint": backbone.get("fingerprint"),
              "backbone": first.info.backbone,
              "modules": first.module_paths(), "rank": first.info.rank, "num_experts": len(experts),
              "experts": [{"task": e.info.task or e.name, "name": e.name, "source": e.info.source, "stage": "library"}
                          for e in experts]}
  return tree, metadata
