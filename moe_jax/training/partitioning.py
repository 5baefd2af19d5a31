"""Device mesh, logical-to-mesh axis rules, and the shardings of parameters, states and batches.

Parameters carry logical axis names (`embed`, `mlp`, ...) and activations are constrained with logical names too;
`axis_rules` maps them onto mesh axes. Nothing here names a mesh axis except the rules and `make_mesh`, so adding
an `fsdp` or `expert` mesh axis is a new `make_mesh` dimension plus rules (e.g. `('embed', 'fsdp')` and
`('batch', ('data', 'fsdp'))`), with no change to the model or the train step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated). T5X-style 1D model parallelism: feed-forward, heads and vocabulary
# over `model`; the batch over `data`.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("mlp", "model"),
    ("joined_kv", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("expert", None),
    ("lora_rank", None),
    ("relpos_buckets", None),
)

Rules = Sequence[tuple[str, Any]]


@gin.configurable
def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all); `data=-1` takes the devices `model` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  if model < 1 or data == 0 or data < -1:
    raise ValueError(f"make_mesh: data={data}, model={model}; sizes must be positive (data may be -1)")
  if data == -1:
    if count % model:
      raise ValueError(f"make_mesh: model={model} does not divide the {count} devices")
    data = count // model
  if data * model != count:
    raise ValueError(f"make_mesh: data={data} x model={model} = {data * model} devices, but {count} are given")
  return Mesh(mesh_utils.create_device_mesh((data, model), devices=devices), MESH_AXES)


@gin.configurable
def axis_rules(rules: Rules = DEFAULT_RULES, overrides: Rules = ()) -> tuple[tuple[str, Any], ...]:
  """The logical axis rules; `overrides` come first, so they win over `rules` for the same logical axis."""
  return tuple((name, axis) for name, axis in (*overrides, *rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Mesh and logical rules for tracing: the model's `with_logical_constraint`s are no-ops without them."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def under_mesh(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
  """Jitted `fn` called (and `.lower`ed, for compiled-cost or memory analysis) inside `activate(mesh, rules)`, so
  that its tracing sees both."""

  def in_context(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(*args, **kwargs):
      with activate(mesh, rules):
        return method(*args, **kwargs)

    return call

  wrapped = in_context(fn)
  wrapped.lower = in_context(fn.lower)
  return wrapped


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of `nn.Partitioned` (abstract) values; unboxed leaves are replicated."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) dimension per the `batch` rule, the rest replicated; a prefix for a whole batch dict."""
  return nn.logical_to_mesh_sharding(PartitionSpec("batch"), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def abstract_params(model: nn.Module) -> Any:
  """Boxed `ShapeDtypeStruct` parameters of `model` (shapes do not depend on the sequence lengths; routing ids
  are given for routers that need them, e.g. `Fixed()`)."""
  tokens = np.ones((1, 1), np.int32)
  init = lambda rng: model.init(rng, tokens, tokens, routing_ids=np.zeros((1,), np.int32))
  return jax.eval_shape(init, jax.random.PRNGKey(0))["params"]


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """This process's rows of a global batch onto the mesh, batch dimension split per the rules (one process: the
  whole batch)."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
