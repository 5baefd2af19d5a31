"""Device mesh, logical-to-mesh axis rules, and the shardings of parameters, states and batches.

Parameters carry logical axis names (`embed`, `mlp`, ...) and activations are constrained with logical names too;
`axis_rules` maps them onto the four mesh axes. One rule set serves every layout: an axis of size 1 shards nothing,
so the mesh sizes (gin: `make_mesh.fsdp = 8`, ...) pick the strategy and the same gin files run on one device or a
pod. Nothing else names a mesh axis, so the model and the train step never change with the layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.errors import ConfigError

# Outer axes first: `data` carries the least traffic (one gradient all-reduce per step) and may cross hosts; `model`
# all-reduces inside every layer, so it is innermost (closest devices: one host's NVLink, a TPU torus line).
MESH_AXES = ("data", "fsdp", "expert", "model")

# Logical axis -> mesh axis (None: replicated). The batch splits over `data`, `fsdp` and `expert` (every device that
# does not split a layer gets its own rows); parameters' `embed` dimension over `fsdp` (ZeRO-3: stored sharded,
# gathered per layer); feed-forward, heads and vocabulary over `model` (T5X 1D tensor parallelism); the expert
# dimension of LoRA experts over `expert`. Flax assigns rules in order and never uses a mesh axis twice in one
# array, so an activation [batch, length, embed] takes `fsdp` for its batch and leaves `embed` whole.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("mlp", "model"),
    ("joined_kv", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("kv", None),
    ("length", None),
    ("lora_rank", None),
    ("relpos_buckets", None),
)

Rules = Sequence[tuple[str, Any]]


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'expert', 'model') mesh over `devices` (default: every device of every process); one size
  may be -1: it takes the devices the others leave."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "expert": expert, "model": model}
  shown = " x ".join(f"{name}={size}" for name, size in sizes.items())
  if any(size == 0 or size < -1 for size in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"make_mesh: {shown}; sizes must be positive, and at most one may be -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  for name, size in sizes.items():
    if size == -1:
      if len(devices) % known:
        raise ConfigError(f"make_mesh: {shown}: the other axes ({known} devices) do not divide the {len(devices)} "
                          "devices")
      sizes[name] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ConfigError(f"make_mesh: {shown} = {math.prod(sizes.values())} devices, but {len(devices)} are given")
  shape = tuple(sizes[name] for name in MESH_AXES)
  return Mesh(mesh_utils.create_device_mesh(shape, devices=devices), MESH_AXES)


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
  """NamedShardings for a tree of `nn.Partitioned` (abstract) values; unboxed leaves are replicated. A dimension
  its mesh axes do not divide (e.g. 166 experts over `expert=4`) is an error naming the parameter."""
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)

  def check(path, leaf, sharding):
    if not isinstance(leaf, nn.Partitioned):
      return
    for size, axes, name in zip(leaf.value.shape, sharding.spec, leaf.names):
      split = math.prod(mesh.shape[a] for a in _axes(axes))
      if size % split:
        raise ConfigError(f"{jax.tree_util.keystr(path)}: dimension {name!r} of size {size} cannot be split over "
                          f"mesh axes {_axes(axes)} ({split} devices); change the mesh sizes or axis_rules")

  jax.tree_util.tree_map_with_path(check, boxed_tree, shardings, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return shardings


def _axes(spec_entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
  return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) dimension per the `batch` rule, the rest replicated; a prefix for a whole batch dict."""
  return nn.logical_to_mesh_sharding(PartitionSpec("batch"), mesh, rules)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """Into how many row blocks the `batch` rule splits a batch: batch sizes must be multiples of it."""
  return math.prod(mesh.shape[a] for a in _axes(batch_sharding(mesh, rules).spec[0]))


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


def place(model: nn.Module, params: Any, mesh: Mesh, rules: Rules) -> Any:
  """`params` of `model` as jax.Arrays split the way the rules declare for that model, placed once before any
  jitted call: a host NumPy leaf would be uploaded again on every call (~35 GB per batch for T5-XL with 166
  experts), and a leaf sharded otherwise would be resharded or compiled for. Leaves already placed so stay put."""
  return jax.device_put(params, logical_shardings(abstract_params(model), mesh, rules))


def active() -> tuple[Mesh, Rules] | None:
  """The mesh and rules of the enclosing `activate`, or None outside one (e.g. a single-device test)."""
  mesh = jax.sharding.get_mesh()
  return None if mesh.empty else (mesh, nn.get_logical_axis_rules())


class ReplicatedOnMesh:
  """A host value (a small model's weights, a search index) copied whole to every device of the enclosing
  `activate`'s mesh, or to the default device outside one: uploaded once per mesh, not with every batch."""

  def __init__(self, value: Any):
    self.value = value
    self._placed: tuple[Any, Any] | None = None  # (mesh or None, the value on its devices)

  def get(self) -> Any:
    context = active()
    mesh = None if context is None else context[0]
    if self._placed is None or self._placed[0] != mesh:
      self._placed = (mesh, jax.device_put(self.value, None if mesh is None else replicated(mesh)))
    return self._placed[1]


def batch_rows_on_mesh(rows: int) -> int:
  """`rows` rounded up to a multiple of the enclosing mesh's batch shards (`place_batch` splits rows evenly)."""
  context = active()
  shards = 1 if context is None else batch_shards(*context)
  return -(-rows // shards) * shards


def place_batch(arrays: Any) -> Any:
  """A global batch that every process holds whole (evaluation inputs, unsharded data) onto the mesh of the
  enclosing `activate`, rows split per its `batch` rule; unchanged outside one. Every call gives the same
  shardings, so a jitted call on them compiles once per batch shape."""
  context = active()
  if context is None:
    return arrays
  sharding = batch_sharding(*context)
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), arrays)


def to_host(tree: Any) -> Any:
  """NumPy copies of jitted outputs, whole on every process (a global array spanning processes is gathered)."""
  return jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable
                      else multihost_utils.process_allgather(x, tiled=True), tree)
