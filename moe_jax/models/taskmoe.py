"""Task-level mixture-of-experts (Ye, Zha & Ren 2022; seed code INK-USC/CrossTaskMoE) on the T5 of `t5.py`.

Every encoder and decoder layer (the whole layer: attention, cross-attention, MLP, norms) holds m copies stacked on
a leading `expert` axis; the layer's output is the route-weighted sum of the copies' outputs. One router per layer
(task_dim -> router_hidden -> GELU -> m) reads the example's task embedding, a row of a trainable
[num_tasks, task_dim] table looked up by `task_ids` [B]. The routes depend on the task only, never on the tokens:
one mixture per layer per example. The relative-position bias stays what it is in `t5.py`, one table per stack
shared by all layers, so it is shared by the copies too (it is not part of a layer).

Routings (`TaskMoEConfig.routing`):
- "gumbel": straight-through Gumbel-softmax in training (the forward is the hard one-hot sample, the gradient that
  of the soft sample), tau = `gumbel_temperature(step)`. Evaluation is deterministic: the argmax of the router
  logits, no noise. `gumbel_at_eval=True` keeps the seed's behaviour, which samples Gumbel noise at evaluation too
  (so its scores vary with the rng).
- "softmax": softmax(logits / tau), tau = `softmax_temperature(step)` (stage 2; evaluation without a step uses
  the schedule's floor, tau = 1, the paper's final routes).
- "average": uniform 1/m (no router, no task embedding).
- "random_instance": a random one-hot route per example per layer, drawn from the `routing` rng (else `dropout`)
  at every call, evaluation included (the seed's --random_routing).
- "random_task": a fixed random one-hot route per task per layer (`random_task_table`, drawn from
  `route_seed`): a constant, so frozen, unless `train_random_task_routes` makes it a parameter initialised to it.

Compute. Routes that carry a gradient (ST-Gumbel in training, softmax, average, trainable task routes) or that the
caller passes in (`routes=`) run the m copies batched (`nn.vmap`) on the whole batch and mix: m x one layer's
FLOPs. The ST estimator needs this even though its forward is one-hot: the gradient of route weight k is
<dL/dy, out_k>, so every copy's output is needed. Hard routes without a gradient (Gumbel at evaluation, instance-
and frozen task-level random routes) run grouped (`group_plan`): the batch is sorted by copy and cut into blocks of
G rows, each copy's examples padded to whole blocks, and each block runs its copy's weights, gathered per block.
The number of blocks is static, K = ceil(B / G) + m - 1 (the most that m groups padded to multiples of G can
need), so shapes stay jit-friendly and no example is ever dropped. Cost: K * G rows instead of m * B, plus a
gather of K layer copies (weights read K times instead of m). G defaults to ceil(B / m): K <= 2m - 1 and at most
~(2 - 1/m) B rows (1.67 B for m = 3, against 3 B dense); G = 1 runs B + m - 1 rows but gathers B + m - 1 weight
copies, worth it only when activations dwarf weights. Empty slots repeat example 0 and are discarded.
`grouped_hard_routes=False` runs hard routes dense instead.

Not covered: cached decoding (`init_decode_cache`/`decode_step`); `encode`/`decode` give teacher-forced scores.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import ConfigError
from moe_jax.models.attention import RelativePositionBias
from moe_jax.models.config import T5Config
from moe_jax.models.lora import Linear
from moe_jax.models.t5 import DecoderLayer, EncoderLayer, RMSNorm, _layer_class, token_embedder

Array = jax.Array
Params = Any

ROUTINGS = ("gumbel", "softmax", "average", "random_instance", "random_task")
COPY_AXIS = "expert"  # the logical axis of the copies: `partitioning.DEFAULT_RULES` maps it to the `expert` mesh axis
ROUTING_RNG = "routing"  # Gumbel noise and random routes; without it the `dropout` stream (what the train step passes)
_LAYER = re.compile(r"layers_\d+")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskMoEConfig:
  """Copies, routers and routing of a `TaskMoE` (frozen: a flax attribute, static under jit, bindable from gin).

  `temperature` fixes tau; None follows the routing's schedule of `step`. `task_embedding_file` is a .npy
  [num_tasks, task_dim] (e.g. the seed's task_vecs.npy) that initialises the task embeddings; "" = N(0, 1).
  `group_size` is G of the grouped hard-route compute (None = ceil(batch / num_copies)).
  """

  num_copies: int = 3
  task_dim: int = 768
  num_tasks: int = 120
  router_hidden: int = 64
  routing: str = "gumbel"
  temperature: float | None = None
  noise_std: float = 1e-8
  gumbel_at_eval: bool = False
  train_random_task_routes: bool = False
  route_seed: int = 0
  task_embedding_file: str = ""
  group_size: int | None = None
  grouped_hard_routes: bool = True

  def __post_init__(self):
    if self.routing not in ROUTINGS:
      raise ConfigError(f"TaskMoEConfig.routing={self.routing!r}; expected one of {ROUTINGS}")
    for field in ("num_copies", "task_dim", "num_tasks", "router_hidden"):
      if getattr(self, field) < 1:
        raise ConfigError(f"TaskMoEConfig.{field} must be positive, got {getattr(self, field)}")
    if self.temperature is not None and self.temperature <= 0:
      raise ConfigError(f"TaskMoEConfig.temperature must be positive or None, got {self.temperature}")
    if self.noise_std < 0:
      raise ConfigError(f"TaskMoEConfig.noise_std must be >= 0, got {self.noise_std}")
    if self.group_size is not None and self.group_size < 1:
      raise ConfigError(f"TaskMoEConfig.group_size must be >= 1 or None, got {self.group_size}")


def _decayed(step: int | Array | None, start: float, decay: float, floor: float) -> Array:
  """max(start * exp(-decay * step), floor); step None = the end of the schedule (evaluation after training)."""
  if step is None:
    return jnp.asarray(floor, jnp.float32)
  return jnp.maximum(start * jnp.exp(-decay * jnp.asarray(step, jnp.float32)), floor)


@gin.configurable
def gumbel_temperature(step: int | Array | None, start: float = 2.0, decay: float = 3e-4,
                       floor: float = 0.1) -> Array:
  """Stage 1's Gumbel-softmax tau = max(2 exp(-3e-4 step), 0.1) (the seed's schedule)."""
  return _decayed(step, start, decay, floor)


@gin.configurable
def softmax_temperature(step: int | Array | None, start: float = 300.0, decay: float = 1e-4,
                        floor: float = 1.0) -> Array:
  """Stage 2's softmax tau = max(300 exp(-1e-4 step), 1): near-uniform routes that sharpen to the plain softmax."""
  return _decayed(step, start, decay, floor)


def hard_without_gradient(moe: TaskMoEConfig, deterministic: bool) -> bool:
  """Whether the router's routes are one-hot and carry no gradient, so each example needs only its own copy."""
  if moe.routing == "random_instance":
    return True
  if moe.routing == "random_task":
    return not moe.train_random_task_routes
  return moe.routing == "gumbel" and deterministic


def random_task_table(moe: TaskMoEConfig, num_layers: int) -> np.ndarray:
  """[num_tasks, num_layers, m] one-hot float32 routes from `route_seed`: the same table at every call, on every
  host, in every process (NumPy's generator, no device state)."""
  choice = np.random.default_rng(moe.route_seed).integers(0, moe.num_copies, (moe.num_tasks, num_layers))
  return np.eye(moe.num_copies, dtype=np.float32)[choice]


def _routing_rng(module: nn.Module) -> Array:
  """The `routing` stream, else `dropout` (the train step's only stream); `model.init(rng)` may use `params`, as
  the routes drawn at initialisation shape nothing."""
  names = (ROUTING_RNG, "dropout") + (("params",) if module.is_initializing() else ())
  for name in names:
    if module.has_rng(name):
      return module.make_rng(name)
  raise ValueError(f"routing={module.moe.routing!r} samples here: pass rngs={{'{ROUTING_RNG}': key}} (or 'dropout')")


class RouterMLP(nn.Module):
  """One layer's router: task embedding -> hidden -> GELU (exact, as the seed's F.gelu) -> m logits."""

  hidden: int
  num_copies: int

  @nn.compact
  def __call__(self, embedding: Array) -> Array:
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name=name)
    return dense(self.num_copies, "out")(nn.gelu(dense(self.hidden, "hidden")(embedding), approximate=False))


class TaskRouter(nn.Module):
  """Routes [B, num_layers, m] float32 of all layers (encoder layers first). Gumbel and softmax routing sow their
  probabilities (`intermediates` `route_probs`, the soft sample behind a hard Gumbel route) for analysis."""

  moe: TaskMoEConfig
  num_encoder_layers: int
  num_decoder_layers: int

  @property
  def layer_names(self) -> list[str]:
    return ([f"encoder_layers_{i}" for i in range(self.num_encoder_layers)]
            + [f"decoder_layers_{i}" for i in range(self.num_decoder_layers)])

  @nn.compact
  def __call__(self, task_ids: Array | None, batch_size: int, deterministic: bool = True,
               step: int | Array | None = None) -> Array:
    moe, layers = self.moe, len(self.layer_names)
    if moe.routing == "average":
      return jnp.full((batch_size, layers, moe.num_copies), 1.0 / moe.num_copies, jnp.float32)
    if moe.routing == "random_instance":
      choice = jax.random.randint(_routing_rng(self), (batch_size, layers), 0, moe.num_copies)
      return jax.nn.one_hot(choice, moe.num_copies, dtype=jnp.float32)
    if task_ids is None:
      raise ValueError(f"routing={moe.routing!r} reads the task: pass task_ids [batch]")
    task_ids = jnp.asarray(task_ids, jnp.int32)
    if moe.routing == "random_task":
      table = random_task_table(moe, layers)
      if moe.train_random_task_routes:
        table = self.param("task_routes", nn.with_logical_partitioning(lambda _: jnp.asarray(table), (None,) * 3))
      return jnp.asarray(table)[task_ids]
    embeddings = self.param("task_embedding", nn.with_logical_partitioning(self._embedding_init, (None, None)),
                            (moe.num_tasks, moe.task_dim), jnp.float32)
    logits = jnp.stack([RouterMLP(moe.router_hidden, moe.num_copies, name=name)(embeddings[task_ids])
                        for name in self.layer_names], axis=1)
    if moe.routing == "softmax":
      return self._probs(logits, softmax_temperature, deterministic, step)
    return self._gumbel(logits, deterministic, step)

  def _embedding_init(self, rng: Array, shape: tuple[int, int], dtype: Any) -> Array:
    if not self.moe.task_embedding_file:
      return nn.initializers.normal(1.0)(rng, shape, dtype)
    return jnp.asarray(_checked_embeddings(np.load(self.moe.task_embedding_file), self.moe), dtype)

  def _probs(self, logits: Array, schedule: Callable, deterministic: bool, step: int | Array | None) -> Array:
    """softmax(logits / tau), sown as `route_probs`."""
    if self.moe.temperature is not None:
      tau = self.moe.temperature
    elif step is None and not deterministic:
      raise ValueError(f"routing={self.moe.routing!r} trains with a tau schedule of the step: pass step= (or set "
                       "TaskMoEConfig.temperature)")
    else:
      tau = schedule(step)
    probs = jax.nn.softmax(logits / tau, axis=-1)
    self.sow("intermediates", "route_probs", probs)
    return probs

  def _gumbel(self, logits: Array, deterministic: bool, step: int | Array | None) -> Array:
    """Hard one-hot routes: argmax at evaluation; a Gumbel sample otherwise, straight-through in training (forward
    exactly one-hot: probs - stop_gradient(probs) is 0; backward the gradient of the soft sample)."""
    if deterministic and not self.moe.gumbel_at_eval:
      return jax.nn.one_hot(jnp.argmax(logits, axis=-1), self.moe.num_copies, dtype=jnp.float32)
    noisy = logits + jax.random.gumbel(_routing_rng(self), logits.shape, jnp.float32)
    probs = self._probs(noisy, gumbel_temperature, deterministic, step)
    hard = jax.nn.one_hot(jnp.argmax(probs, axis=-1), self.moe.num_copies, dtype=jnp.float32)
    return hard if deterministic else hard + (probs - jax.lax.stop_gradient(probs))


def _checked_embeddings(table: np.ndarray, moe: TaskMoEConfig) -> np.ndarray:
  if table.shape != (moe.num_tasks, moe.task_dim):
    raise ConfigError(f"task embeddings are {table.shape}; TaskMoEConfig wants (num_tasks, task_dim) = "
                      f"({moe.num_tasks}, {moe.task_dim})")
  return table


class GroupPlan(NamedTuple):
  """Where each example goes in the grouped compute. `slot` [B]: its row among the K * G block rows; `source`
  [K * G]: the example each row reads (example 0 in empty rows); `block_copy` [K]: the copy each block runs."""

  slot: Array
  source: Array
  block_copy: Array


def group_plan(choice: Array, num_copies: int, group_size: int) -> GroupPlan:
  """Sort examples by copy (`choice` [B] int) into blocks of `group_size` rows, each copy's examples padded to
  whole blocks; ceil(B / G) + m - 1 blocks hold any assignment, so the shapes are static."""
  batch = choice.shape[0]
  num_blocks = -(-batch // group_size) + num_copies - 1
  onehot = jax.nn.one_hot(choice, num_copies, dtype=jnp.int32)  # [B, m]
  blocks = -(-jnp.sum(onehot, axis=0) // group_size)  # blocks per copy
  ends = jnp.cumsum(blocks)
  rank = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # earlier examples of the same copy
  slot = (ends - blocks)[choice] * group_size + rank
  source = jnp.zeros(num_blocks * group_size, jnp.int32).at[slot].set(jnp.arange(batch, dtype=jnp.int32))
  block_copy = jnp.minimum(jnp.sum(ends[None, :] <= jnp.arange(num_blocks)[:, None], axis=1), num_copies - 1)
  return GroupPlan(slot, source, block_copy)


def _copies(layer_cls: type[nn.Module], num_copies: int) -> type[nn.Module]:
  """The layer with its parameters stacked m times on a leading `expert` axis, run on the same inputs."""
  return nn.vmap(layer_cls, in_axes=None, out_axes=0, axis_size=num_copies, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, metadata_params={nn.PARTITION_NAME: COPY_AXIS})


def _mix(outputs: Array, route: Array) -> Array:
  """sum_k route[b, k] outputs[k, b] in float32: a one-hot route returns its copy's output exactly."""
  mixed = jnp.einsum("kb...,bk->b...", outputs.astype(jnp.float32), route.astype(jnp.float32))
  return mixed.astype(outputs.dtype)


def _grouped(owner: nn.Module, layer_cls: type[nn.Module], name: str, route: Array, deterministic: bool,
             args: tuple) -> Array:
  """The layer on one-hot routes (weight exactly 1, no gradient: only the argmax is read) with each copy run on
  its own examples only (`group_plan`)."""
  cfg, moe = owner.config, owner.moe
  batch = route.shape[0]
  group = moe.group_size or -(-batch // moe.num_copies)
  plan = group_plan(jnp.argmax(route, axis=-1), moe.num_copies, group)
  num_blocks = plan.block_copy.shape[0]
  per_block = jax.tree.map(lambda p: jnp.take(p, plan.block_copy, axis=0),
                           nn.meta.unbox(owner.variables["params"][name]))
  batched = [hasattr(a, "shape") and a.ndim > 0 and a.shape[0] == batch for a in args]
  rows = [a[plan.source].reshape((num_blocks, group) + a.shape[1:]) for a, b in zip(args, batched) if b]
  dropout = not deterministic and cfg.dropout_rate > 0.0
  keys = jax.random.split(owner.make_rng("dropout"), num_blocks) if dropout else None
  layer = layer_cls(cfg, parent=None)

  def run(params: Params, block_rows: list[Array], key: Array | None) -> Array:
    it = iter(block_rows)
    full = [next(it) if b else a for a, b in zip(args, batched)]
    return layer.apply({"params": params}, *full, rngs=None if key is None else {"dropout": key})

  out = jax.vmap(run)(per_block, rows, keys)
  return out.reshape((num_blocks * group,) + out.shape[2:])[plan.slot]


def _routed_layer(owner: nn.Module, layer_cls: type[nn.Module], deterministic_argnum: int, name: str,
                  route: Array, grouped: bool, args: tuple) -> Array:
  """One MoE layer of `owner` (a stack): m copies of `layer_cls` named `name`, mixed by `route` [B, m]."""
  layer_cls = _layer_class(layer_cls, owner.config, deterministic_argnum)
  deterministic = args[deterministic_argnum - 1]
  if grouped and not owner.is_initializing():
    out = _grouped(owner, layer_cls, name, route, deterministic, args)
  else:
    out = _mix(_copies(layer_cls, owner.moe.num_copies)(owner.config, name=name)(*args), route)
  return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class TaskMoEEncoder(nn.Module):
  """t5.Encoder with routed layers; `routes` [B, num_encoder_layers, m]."""

  config: T5Config
  moe: TaskMoEConfig
  embedder: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, routes: Array, grouped: bool, deterministic: bool = True,
               segment_ids: Array | None = None, positions: Array | None = None) -> Array:
    cfg = self.config
    length = tokens.shape[1]
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=True, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weights_dtype, name="relpos_bias")(length, length,
                                                                                  positions=positions)
    x = nn.Dropout(cfg.dropout_rate)(self.embedder(tokens).astype(cfg.compute_dtype), deterministic=deterministic)
    for i in range(cfg.num_encoder_layers):
      x = _routed_layer(self, EncoderLayer, 4, f"layers_{i}", routes[:, i], grouped,
                        (x, bias, tokens > 0, deterministic, None, segment_ids))
    x = RMSNorm(cfg, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class TaskMoEDecoder(nn.Module):
  """t5.Decoder (teacher forcing) with routed layers; `routes` [B, num_decoder_layers, m]."""

  config: T5Config
  moe: TaskMoEConfig
  embedder: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, encoder_mask: Array, tokens: Array, routes: Array, grouped: bool,
               deterministic: bool = True, decoder_segment_ids: Array | None = None,
               encoder_segment_ids: Array | None = None, positions: Array | None = None) -> Array:
    cfg = self.config
    if (decoder_segment_ids is None) != (encoder_segment_ids is None):
      raise ValueError("packed rows need both encoder_segment_ids and decoder_segment_ids, or neither")
    length = tokens.shape[1]
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=False, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weights_dtype, name="relpos_bias")(length, length,
                                                                                  positions=positions)
    y = nn.Dropout(cfg.dropout_rate)(self.embedder(tokens).astype(cfg.compute_dtype), deterministic=deterministic)
    for i in range(cfg.num_decoder_layers):
      y = _routed_layer(self, DecoderLayer, 5, f"layers_{i}", routes[:, i], grouped,
                        (y, encoded, bias, encoder_mask, deterministic, None, decoder_segment_ids,
                         encoder_segment_ids))
    y = RMSNorm(cfg, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      logits = self.embedder.attend(y.astype(jnp.float32) * cfg.d_model**-0.5)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, None, name="logits_dense")(y)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class TaskMoE(nn.Module):
  """The task-level MoE encoder-decoder. Parameters: those of `t5.Transformer` at the same paths, every
  `{encoder,decoder}/layers_i/...` with a leading [m] `expert` axis, plus `router/` (task embeddings, one
  `RouterMLP` per layer, or the trainable random task routes).

  Calls mirror `t5.Transformer` with `task_ids` [B] in place of `routing_ids` (also accepted under that keyword,
  which `interface.logits_and_targets` and `partitioning.abstract_params` use), plus `step` (the tau schedules)
  and `routes` [B, num_layers, m] (overrides the router: analysis, forced routes; always run dense). The routes
  used are sown (`intermediates` `routes`, encoder layers first). Sampling routings read the `routing` rng, else
  `dropout`.
  """

  config: T5Config
  moe: TaskMoEConfig = TaskMoEConfig()

  def setup(self):
    cfg = self.config
    self.token_embedder = token_embedder(cfg)
    self.encoder = TaskMoEEncoder(cfg, self.moe, self.token_embedder)
    self.decoder = TaskMoEDecoder(cfg, self.moe, self.token_embedder)
    self.router = TaskRouter(self.moe, cfg.num_encoder_layers, cfg.num_decoder_layers)

  def routes(self, task_ids: Array | None, batch_size: int, deterministic: bool = True,
             step: int | Array | None = None) -> Array:
    """The router's routes [B, num_layers, m] alone (analysis; `route_probs` are sown as in a forward)."""
    return self.router(task_ids, batch_size, deterministic, step)

  def _routing(self, task_ids: Array | None, routing_ids: Array | None, batch_size: int, deterministic: bool,
               step: int | Array | None, routes: Array | None) -> tuple[Array, bool]:
    """(routes used, whether they may run grouped)."""
    grouped = False
    if routes is None:
      routes = self.router(routing_ids if task_ids is None else task_ids, batch_size, deterministic, step)
      grouped = self.moe.grouped_hard_routes and hard_without_gradient(self.moe, deterministic)
    expected = (batch_size, self.config.num_encoder_layers + self.config.num_decoder_layers, self.moe.num_copies)
    if routes.shape != expected:
      raise ValueError(f"routes are {routes.shape}; expected [batch, layers, copies] = {expected}")
    self.sow("intermediates", "routes", routes)
    return routes, grouped

  def encode(self, encoder_input_tokens: Array, deterministic: bool = True, task_ids: Array | None = None, *,
             step: int | Array | None = None, routes: Array | None = None, routing_ids: Array | None = None,
             encoder_segment_ids: Array | None = None, encoder_positions: Array | None = None) -> Array:
    routes, grouped = self._routing(task_ids, routing_ids, encoder_input_tokens.shape[0], deterministic, step,
                                    routes)
    return self.encoder(encoder_input_tokens, routes[:, :self.config.num_encoder_layers], grouped, deterministic,
                        encoder_segment_ids, encoder_positions)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             deterministic: bool = True, task_ids: Array | None = None, *, step: int | Array | None = None,
             routes: Array | None = None, routing_ids: Array | None = None,
             encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None) -> Array:
    """Logits [B, L, vocab] float32. Sampling routings draw the decoder's routes afresh here: call `__call__`
    for one draw shared by the encoder and the decoder."""
    routes, grouped = self._routing(task_ids, routing_ids, decoder_input_tokens.shape[0], deterministic, step,
                                    routes)
    return self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens,
                        routes[:, self.config.num_encoder_layers:], grouped, deterministic, decoder_segment_ids,
                        encoder_segment_ids, decoder_positions)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, deterministic: bool = True,
               task_ids: Array | None = None, *, step: int | Array | None = None, routes: Array | None = None,
               routing_ids: Array | None = None, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
    """Logits [batch, decoder_length, vocab] in float32."""
    routes, grouped = self._routing(task_ids, routing_ids, encoder_input_tokens.shape[0], deterministic, step,
                                    routes)
    split = self.config.num_encoder_layers
    encoded = self.encoder(encoder_input_tokens, routes[:, :split], grouped, deterministic, encoder_segment_ids,
                           encoder_positions)
    return self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens, routes[:, split:], grouped,
                        deterministic, decoder_segment_ids, encoder_segment_ids, decoder_positions)


def _is_layer(path: tuple[str, ...]) -> bool:
  return len(path) > 2 and path[0] in ("encoder", "decoder") and _LAYER.fullmatch(path[1]) is not None


def _num_layers(t5_params: Params, stack: str) -> int:
  return sum(1 for name in t5_params[stack] if _LAYER.fullmatch(name))


def init_router(moe: TaskMoEConfig, num_encoder_layers: int, num_decoder_layers: int, rng: Array) -> Params:
  """Fresh `router/` parameters (unboxed; {} for routings without any)."""
  router = TaskRouter(moe, num_encoder_layers, num_decoder_layers)
  variables = router.init({"params": rng, ROUTING_RNG: rng}, jnp.zeros((1,), jnp.int32), 1)
  return nn.meta.unbox(variables.get("params", {}))


def expand_pretrained(t5_params: Params, config: TaskMoEConfig, rng: Array, *,
                      task_embeddings: np.ndarray | None = None) -> Params:
  """TaskMoE parameters (unboxed) from a pretrained `t5.Transformer` tree (unboxed, e.g. `load_hf_t5`'s): every
  layer copied into all m copies plus N(0, noise_std^2) noise per copy (so the copies can drift apart; 1e-8 is
  below the bfloat16 grid, so bfloat16 weights stay identical), the rest shared as is; fresh routers, with the
  task embeddings from `task_embeddings` (or the config's file) when given. Stage 2 (experts reset to pretrained,
  stage-1 routers kept): `experts.merge(expand_pretrained(...), {"router": stage1["router"]})`."""
  noise_rng, router_rng = jax.random.split(rng)
  flat = flax.traverse_util.flatten_dict(t5_params)
  out = {}
  for index, (path, leaf) in enumerate(flat.items()):
    out[path] = _noisy_copies(leaf, config, jax.random.fold_in(noise_rng, index)) if _is_layer(path) else leaf
  router = init_router(config, _num_layers(t5_params, "encoder"), _num_layers(t5_params, "decoder"), router_rng)
  if task_embeddings is not None:
    if "task_embedding" not in router:
      raise ConfigError(f"routing={config.routing!r} has no task embeddings to initialise")
    router["task_embedding"] = jnp.asarray(_checked_embeddings(np.asarray(task_embeddings), config), jnp.float32)
  if router:
    out.update(flax.traverse_util.flatten_dict({"router": router}))
  return flax.traverse_util.unflatten_dict(out)


def _noisy_copies(leaf: Any, config: TaskMoEConfig, rng: Array) -> Array:
  x = jnp.asarray(leaf)
  copies = jnp.broadcast_to(x, (config.num_copies,) + x.shape)
  if not config.noise_std:
    return copies
  noise = config.noise_std * jax.random.normal(rng, copies.shape, jnp.float32)
  return (copies.astype(jnp.float32) + noise).astype(x.dtype)


def extract_copy(params: Params, copy: int) -> Params:
  """The plain `t5.Transformer` tree whose layers are copy `copy`'s (routers dropped): the inverse of
  `expand_pretrained` at zero noise, and a way to score or export one copy."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({path: leaf[copy] if _is_layer(path) else leaf
                                            for path, leaf in flat.items() if path[0] != "router"})
