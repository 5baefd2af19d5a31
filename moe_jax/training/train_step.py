"""The jitted, sharded train step (with gradient accumulation) and eval loss.

Only the stage's trainable leaves are differentiated (for expert or gate training that skips every backbone weight
gradient); frozen leaves pass through the step unchanged, aliased to the donated input buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from moe_jax.errors import ConfigError
from moe_jax.models import experts as ex
from moe_jax.models import interface
from moe_jax.training import optimizer as opt
from moe_jax.training import partitioning as part

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return cls(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation) -> TrainState:
  """Shapes of the train state, with `nn.Partitioned` boxes (logical axes) on params and Adam moments."""
  return jax.eval_shape(lambda params: TrainState.create(params, optimizer), part.abstract_params(model))


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: part.Rules) -> TrainState:
  return part.logical_shardings(abstract_state(model, optimizer), mesh, rules)


def create_train_state(params: Any, model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules: part.Rules) -> TrainState:
  """A fresh state on the mesh from (host or device) unboxed params, placed per the logical rules."""
  shardings = state_shardings(model, optimizer, mesh, rules)
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                           z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(sum over tokens of weight * (cross-entropy + z_loss * log(Z)^2), sum of weights), both float32.

  The target logit is picked with a one-hot product rather than a gather so a vocabulary-sharded logits tensor
  needs only a reduction across shards.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
  loss = log_z - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  weights = weights.astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(weights)


def _loss_sum(model: nn.Module, params: Any, batch: Batch, z_loss: float, rng: jax.Array | None,
              step: jax.Array | None = None):
  """`step` (the optimizer step) reaches models whose forward depends on it (TaskMoE's temperature schedules)."""
  logits, targets, weights = interface.logits_and_targets(model, params, batch, deterministic=rng is None, rng=rng,
                                                          step=step)
  return weighted_cross_entropy(logits, targets, weights, z_loss)


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[A*M, ...] -> [A, M, ...], microbatch i = rows i, A+i, 2A+i, ...: with the batch split over devices in
  contiguous blocks, every microbatch keeps an equal share on every device (no resharding)."""
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ConfigError(f"batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}")
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


def _normalizer(weight_sum: jax.Array) -> jax.Array:
  return jnp.where(weight_sum > 0, weight_sum, 1.0)  # an all-padding batch has loss 0, not NaN


def train_step_fn(model: nn.Module, optimizer: optax.GradientTransformation, stage: str, num_microbatches: int = 1,
                  z_loss: float = 0.0, dropout_seed: int = 0) -> StepFn:
  """The un-jitted step: (state, batch [num_microbatches * micro, ...]) -> (state, metrics).

  The loss is sum(weight * token loss) / sum(weight) over the whole batch; each microbatch's gradient is divided by
  the whole batch's weight sum, so the accumulated gradient is exactly the full-batch gradient.
  """
  if num_microbatches < 1:
    raise ConfigError(f"num_microbatches must be >= 1, got {num_microbatches}")

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    mask = opt.trainable_mask(stage, state.params)
    trainable, frozen = opt.partition(state.params, mask)
    rng = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step)
    weight_sum = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))
    normalizer = _normalizer(weight_sum)

    def loss_fn(trainable, micro, index):
      loss_sum, _ = _loss_sum(model, ex.merge(frozen, trainable), micro, z_loss, jax.random.fold_in(rng, index),
                              state.step)
      return loss_sum / normalizer

    grad_fn = jax.value_and_grad(loss_fn)
    if num_microbatches == 1:
      loss, grads = grad_fn(trainable, batch, 0)
    else:
      def accumulate(carry, xs):
        index, micro = xs
        return jax.tree.map(jnp.add, carry, grad_fn(trainable, micro, index)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
      xs = (jnp.arange(num_microbatches), _split_microbatches(batch, num_microbatches))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, xs)

    # Frozen leaves get zero "gradients" that `set_to_zero` ignores; XLA drops them and the frozen updates.
    full_grads = ex.merge(jax.tree.map(jnp.zeros_like, frozen), grads)
    updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
    updated, _ = opt.partition(optax.apply_updates(state.params, updates), mask)
    new_state = TrainState(state.step + 1, ex.merge(frozen, updated), opt_state)
    metrics = {"loss": loss, "weight_sum": weight_sum, "grad_norm": optax.tree.norm(grads)}
    learning_rate = opt.current_learning_rate(opt_state)
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate
    return new_state, metrics

  return step


@gin.configurable(allowlist=["z_loss", "dropout_seed"])
def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, stage: str, mesh: Mesh,
                    rules: part.Rules, num_microbatches: int = 1, z_loss: float = 0.0,
                    dropout_seed: int = 0) -> StepFn:
  """`train_step_fn` jitted over `mesh`: state sharded per the logical rules and donated, batch split over the
  `batch` rule's mesh axes, metrics replicated. Call it with the state from `create_train_state`."""
  shardings = state_shardings(model, optimizer, mesh, rules)
  step = jax.jit(train_step_fn(model, optimizer, stage, num_microbatches, z_loss, dropout_seed),
                 in_shardings=(shardings, part.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, part.replicated(mesh)), donate_argnums=0)
  return part.under_mesh(step, mesh, rules)


def make_eval_loss(model: nn.Module, mesh: Mesh, rules: part.Rules,
                   z_loss: float = 0.0) -> Callable[[Any, Batch], Metrics]:
  """Jitted (params, batch) -> {loss: weighted mean, weight_sum}, deterministic (no dropout), no gradients.

  Aggregate over batches as sum(loss * weight_sum) / sum(weight_sum).
  """
  def eval_loss(params: Any, batch: Batch) -> Metrics:
    loss_sum, weight_sum = _loss_sum(model, params, batch, z_loss, None)
    return {"loss": loss_sum / _normalizer(weight_sum), "weight_sum": weight_sum}

  params_sharding = part.logical_shardings(part.abstract_params(model), mesh, rules)
  fn = jax.jit(eval_loss, in_shardings=(params_sharding, part.batch_sharding(mesh, rules)),
               out_shardings=part.replicated(mesh))
  return part.under_mesh(fn, mesh, rules)
