"""Task embeddings for the task-level MoE's routers, in the seed's files (task_vecs.npy + id2task.json):

  python -m moe_jax.train --gin_file=gin/taskmoe_embeddings.gin --gin.task_embeddings.kind="'fisher'" ...

- TextEmb (`kind='text'`): the mean over a task's examples of the mean of the backbone encoder's final states over
  the example's real (non-padding) tokens. The seed (task_emb/run_get_text_emb.py) averages HF `BartModel`'s
  `last_hidden_state`, which without decoder inputs is the decoder's over the shifted input, and includes the
  padding positions of each batch; here the encoder's states, per example, without padding.
- FisherEmb (`kind='fisher'`): a small adapter (a rank-r LoRA on every attention and feed-forward linear,
  `ExpertConfig`) trained alone on the task for `fisher_steps` steps (the repo's expert stage; seed: 2500 steps,
  lr 3e-5, batch 8, task_emb/finetuneTaskemb/finetuneFisher_a_list_of_tasks.sh), then the mean over the task's
  training examples of each adapter weight's squared gradient of the example's loss (its token-mean
  cross-entropy, one example per backward pass as the seed's batch size 1), flattened and concatenated in
  parameter-path order (the seed's run_singletask_adapter.py).
- `dim`: PCA (scikit-learn) of the tasks' vectors to `dim` components (the seed's "fisher128").
Row i of task_vecs.npy is task i of `tasks` (or of `names`), which is the id `with_task_ids` gives the same list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.errors import ConfigError
from moe_jax.models import experts as ex
from moe_jax.models import interface
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.taskmoe.tasks import write_task_vecs
from moe_jax.training import partitioning as part
from moe_jax.training.train_step import weighted_cross_entropy

KINDS = ("text", "fisher")
FISHER_PARAMS = ("lora_a", "lora_b")  # the adapter's weights (its zero router vector is no weight of the adapter)


def text_embedding(model: nn.Module, params: Any, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """TextEmb of one task: mean over examples of the mean encoder state over each example's real tokens, float64
  [d_model]. `inputs` [N, L] int32, 0-padded on the right."""
  from moe_jax.evaluation.scoring import fixed_batches  # pylint: disable=g-import-not-at-top

  encode = _encoder(model)
  inputs = np.asarray(inputs, np.int32)
  means = []
  for _, count, (x,) in fixed_batches(len(inputs), batch_size, inputs):
    states = np.asarray(part.to_host(encode(params, x)), np.float64)[:count]
    mask = (np.asarray(x)[:count] > 0).astype(np.float64)  # a batch every process holds whole
    means.append((states * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)[:, None])
  return np.concatenate(means).mean(axis=0)


def _encoder(model: nn.Module):
  return jax.jit(lambda params, x: model.apply({"params": params}, x, True, method="encode"))


def training_arrays(examples: Sequence[Mapping[str, Any]], lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Training-format arrays [N, ...] of `eval_examples` examples (inputs and targets already end in EOS),
  unpacked, as seqio's EncDec feature converter makes them."""
  from moe_jax.evaluation.scoring import pad_tokens  # pylint: disable=g-import-not-at-top

  inputs = pad_tokens([e["inputs"][:lengths["inputs"]] for e in examples], lengths["inputs"])
  targets = pad_tokens([e["targets"][:lengths["targets"]] for e in examples], lengths["targets"])
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=interface.START_ID)
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.int32)}


def fisher_embedding(model: nn.Module, params: Any, arrays: Mapping[str, np.ndarray],
                     batch_size: int = 8) -> np.ndarray:
  """FisherEmb of one task: mean over its examples of the squared gradient of each example's token-mean loss with
  respect to every `lora_a`/`lora_b` leaf, float64, flattened and concatenated in sorted path order."""
  flat = flax.traverse_util.flatten_dict(params)
  adapter = {k: v for k, v in flat.items() if k[-1] in FISHER_PARAMS}
  if not adapter:
    raise ConfigError("fisher_embedding: the parameters hold no lora_a/lora_b adapter")
  frozen = flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in FISHER_PARAMS})
  squared = _squared_gradients(model)
  n = len(arrays["encoder_input_tokens"])
  if n == 0:
    raise ConfigError("fisher_embedding: no examples")
  totals = {k: np.zeros(v.shape, np.float64) for k, v in adapter.items()}
  for start in range(0, n, batch_size):
    rows = {k: np.asarray(v[start:start + batch_size]) for k, v in arrays.items()}
    sums = jax.device_get(squared(frozen, flax.traverse_util.unflatten_dict(adapter), rows))
    for key, value in flax.traverse_util.flatten_dict(sums).items():
      totals[key] += np.asarray(value, np.float64)
  return np.concatenate([(totals[k] / n).reshape(-1) for k in sorted(totals)])


def _squared_gradients(model: nn.Module):
  """Jitted (frozen, adapter, rows) -> sum over the rows of each adapter leaf's squared per-example gradient."""

  def example_loss(adapter: Any, frozen: Any, row: Mapping[str, jax.Array]) -> jax.Array:
    batch = {k: v[None] for k, v in row.items()}
    logits, targets, weights = interface.logits_and_targets(model, ex.merge(frozen, adapter), batch)
    loss_sum, weight_sum = weighted_cross_entropy(logits, targets, weights)
    return loss_sum / jnp.maximum(weight_sum, 1.0)

  def run(frozen: Any, adapter: Any, rows: Mapping[str, jax.Array]) -> Any:
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, None, 0))(adapter, frozen, rows)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)

  return jax.jit(run)


def reduce_dimension(vectors: np.ndarray, dim: int | None) -> np.ndarray:
  """PCA (scikit-learn, centred, deterministic SVD) of the task vectors [tasks, D] to `dim` components; None
  keeps them. `dim` may not exceed min(tasks, D)."""
  vectors = np.asarray(vectors, np.float64)
  if dim is None:
    return vectors
  if not 0 < dim <= min(vectors.shape):
    raise ConfigError(f"task_embeddings.dim={dim}: PCA of {vectors.shape[0]} task vectors of {vectors.shape[1]} "
                      f"values gives at most {min(vectors.shape)} components")
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top

  return PCA(n_components=dim, svd_solver="full").fit_transform(vectors)


@gin.configurable(denylist=["gin_config_str", "backbone"])
def task_embeddings(output_dir: str = gin.REQUIRED, tasks: Sequence[str] = gin.REQUIRED, kind: str = "text",
                    init_from: str | None = None, model_config: T5Config | None = None,
                    names: Sequence[str] | None = None, dim: int | None = None, split: str = "train",
                    max_examples: int | None = 1000, feature_lengths: Mapping[str, int] | None = None,
                    batch_size: int = 32, fisher_steps: int = 2500, fisher_batch_size: int = 8,
                    fisher_experts: ExpertConfig | None = None, seed: int = 42, gin_config_str: str = "",
                    backbone: Any = None) -> str:
  """Write `output_dir/task_vecs.npy` and `output_dir/id2task.json` for `tasks` (mixtures expand; row i = task i)
  under the backbone of `init_from` and return `output_dir`. `names`: what id2task.json calls each task (default:
  the task names; e.g. CrossFit's task names for crossfit_<task>_<k>_<seed> runs). Each task reads up to
  `max_examples` examples of `split`. Fisher: an adapter per task trained in `output_dir/fisher/<task>` (the
  expert stage, `train` and `make_optimizer` settings from gin, `fisher_steps` steps, batch
  `fisher_batch_size`), kept, so a rerun reuses it."""
  from moe_jax.data import vocab  # pylint: disable=g-import-not-at-top
  from moe_jax.data.pipeline import eval_examples, expand_tasks  # pylint: disable=g-import-not-at-top  (seqio)
  from moe_jax.training import loop  # pylint: disable=g-import-not-at-top

  if kind not in KINDS:
    raise ConfigError(f"task_embeddings.kind={kind!r}; expected one of {KINDS}")
  config = model_config or T5Config()
  lengths = dict(feature_lengths or {"inputs": 512, "targets": 128})
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone_model = interface.build_model(config)
  if backbone is None:
    backbone = loop.load_backbone(init_from, config, part.logical_shardings(part.abstract_params(backbone_model),
                                                                            mesh, rules), seed)
  if jax.process_index() == 0 and gin_config_str:
    fs.write_text(fs.join(output_dir, "config.gin"), gin_config_str)
  vectors = []
  with vocab.using(backbone.vocabulary):
    task_names = expand_tasks(tasks)
    if names is not None and len(names) != len(task_names):
      raise ConfigError(f"task_embeddings.names has {len(names)} names for {len(task_names)} tasks")
    for task in tqdm(task_names, desc=f"{kind} task embeddings", unit="task", disable=jax.process_index() != 0):
      examples = eval_examples(task, split, lengths, max_examples)
      if not examples:
        raise ConfigError(f"task {task!r} has no {split!r} examples to embed")
      if kind == "text":
        from moe_jax.evaluation.scoring import pad_tokens  # pylint: disable=g-import-not-at-top
        inputs = pad_tokens([e["inputs"] for e in examples], lengths["inputs"])
        with part.activate(mesh, rules):
          vectors.append(text_embedding(backbone_model, backbone.params, inputs, batch_size))
        continue
      product = loop.train(model_dir=fs.join(output_dir, "fisher", task), mixture_or_task_name=task, stage="expert",
                           model_config=config, experts=fisher_experts or ExpertConfig(rank=8),
                           feature_lengths=lengths, batch_size=fisher_batch_size, total_steps=fisher_steps,
                           init_from=init_from, backbone=backbone, seed=seed, validate_every=0)
      from moe_jax.training import checkpointing as ckpt  # pylint: disable=g-import-not-at-top
      adapter, _ = ckpt.load_experts(product, config)
      modules, num_experts, rank = ex.layout(adapter)
      model = interface.build_model(config, ex.layout_config(modules, num_experts, rank, fisher_experts))
      params = ex.merge(jax.device_get(backbone.params), adapter)
      vectors.append(fisher_embedding(model, params, training_arrays(examples, lengths), fisher_batch_size))
  reduced = reduce_dimension(np.stack(vectors), dim)
  if jax.process_index() == 0:
    write_task_vecs(output_dir, list(names or task_names), reduced)
  return output_dir
