"""Fine-tune a student on enhanced rows: `python -m moe_jax.teacher student --gin_file=gin/teacherlm_student.gin`.

The seed fine-tunes a causal LM (BLOOMZ-7.1B) on one field of the enhanced data (`cot_tail`: question, answer,
trigger and rationale as one text) with the loss on the whole sequence, max length 2048 keeping the end (left
truncation), a constant learning rate (6e-6) for a number of epochs, saving each. Here that is the multitask stage
of `moe_jax.training.loop.train` (the whole model trains) on a seqio task over the JSON-lines file, read through
`feature_converter(decoder_only=True)`:
- loss on the whole sequence (`loss_on='all'`): the field's text is the target, the input empty;
- `loss_on='rationale'`: the input is the prompt (`all` without the generated `cot`), the target the rationale;
- left truncation: the token sequence keeps its last `feature_lengths` tokens (seqio's trim keeps the first);
- exact epochs: the task's stream is pass after pass over the rows, each pass a permutation of its own
  (`epoch_order`: seed, pass), its last batch filled with empty rows (no loss weight), so every batch belongs to
  one pass and a pass shows every row exactly once, as a PyTorch DataLoader epoch does (seqio's shuffle buffer
  would mix passes: the source shuffles instead). Epoch e is `train` with total_steps = e * steps_per_epoch in
  `model_dir/epoch_e`, resuming from the checkpoints all epochs share, so each epoch's product
  (`epoch_e/backbone`) is a checkpoint, and a rerun skips finished epochs and resumes the interrupted one at its
  exact batch. The learning rate is constant when `make_optimizer.warmup_fraction = 0` (the gin file binds it).
"""

from __future__ import annotations

import json
import math
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from moe_jax import fs
from moe_jax.data import pipeline  # noqa: F401  (the data configurables, registered before gin locks)
from moe_jax.data.vocab import run_vocabulary
from moe_jax.errors import ConfigError
from moe_jax.methods.merged import merge_into_backbone
from moe_jax.models.causal import CausalLMConfig
from moe_jax.models.config import ExpertConfig
from moe_jax.teacher import formats
from moe_jax.teacher.lm import model_config_for
from moe_jax.training import loop
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import BACKBONE_DIR, Backbone, load_backbone, save_backbone

LOSS_ON = ("all", "rationale")


class OrderedSource(seqio.FunctionDataSource):
  """A function source that orders its rows itself (exact passes), so seqio, asked to shuffle, does not."""

  @property
  def performs_internal_shuffling(self) -> bool:
    return True


def training_pairs(rows: list[dict[str, Any]], field: str, loss_on: str) -> list[tuple[str, str]]:
  """(input, target) texts of the usable rows (a row the teacher failed on, without the field, or with nothing to
  learn in its target, is skipped)."""
  if loss_on not in LOSS_ON:
    raise ConfigError(f"train_student.loss_on={loss_on!r}; expected one of {LOSS_ON}")
  pairs = []
  for row in rows:
    if row.get("enhance_error") or not isinstance(row.get(field), str):
      continue
    if loss_on == "all":
      pair = ("", row[field])
    else:
      rationale = row.get("cot") or ""
      whole = row["all"]
      if not whole.endswith(rationale):
        raise ConfigError(f"a row's `all` does not end with its `cot`: {whole[-60:]!r}; enhance it again")
      pair = (whole[:len(whole) - len(rationale)], rationale)
    if pair[1].strip():
      pairs.append(pair)
  return pairs


def epoch_order(rows: int, batch_size: int, passes: int, seed: int) -> list[int | None]:
  """Row indices of `passes` passes over `rows` rows, each pass a permutation drawn from (seed, pass) and filled
  with None (an empty row) up to a whole number of batches."""
  steps = math.ceil(rows / batch_size)
  order: list[int | None] = []
  for p in range(passes):
    order += [int(i) for i in np.random.default_rng([seed, p]).permutation(rows)]
    order += [None] * (steps * batch_size - rows)
  return order


def register_task(name: str, pairs: list[tuple[str, str]], batch_size: int, passes: int, seed: int) -> str:
  """A seqio task `name` whose train split is `passes` exact passes over `pairs` (`epoch_order`), tokenised with
  the run's vocabulary, keeping the end of each text when it is too long (the seed's left truncation). Seqio does
  not shuffle it (the order is the passes'); sharded over hosts, host h reads rows h, h + H, ..., so global batch
  j is still rows [j * batch_size, (j + 1) * batch_size) of the order."""
  order = epoch_order(len(pairs), batch_size, passes, seed)
  inputs = [pairs[i][0] if i is not None else "" for i in order]
  targets = [pairs[i][1] if i is not None else "" for i in order]

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

  def drop_filler(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A filler row (empty target: real rows have text) becomes all padding, so it has no loss weight."""
    def drop(example):
      filler = tf.equal(tf.size(example["targets"]), 1)
      return {"inputs": example["inputs"], "targets": tf.cond(filler, lambda: example["targets"][:0],
                                                              lambda: example["targets"])}
    return dataset.map(drop)

  def keep_tail(dataset: tf.data.Dataset, sequence_length: dict[str, int]) -> tf.data.Dataset:
    def tail(example):  # room for the EOS `append_eos_after_trim` adds to the target
      return {"inputs": example["inputs"][-sequence_length["inputs"]:] if sequence_length["inputs"] else
              example["inputs"][:0],
              "targets": example["targets"][-(sequence_length["targets"] - 1):]}
    return dataset.map(tail)

  features = {"inputs": seqio.Feature(run_vocabulary(), add_eos=False, required=False),
              "targets": seqio.Feature(run_vocabulary(), add_eos=True)}
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=OrderedSource(dataset_fn, splits=("train",)), output_features=features,
                         preprocessors=[seqio.preprocessors.tokenize, keep_tail,
                                        seqio.preprocessors.append_eos_after_trim, drop_filler],
                         shuffle_buffer_size=None)
  return name


def epoch_dir(model_dir: str, epoch: int) -> str:
  return fs.join(model_dir, f"epoch_{epoch}")


def epoch_product(model_dir: str, epoch: int) -> str:
  return fs.join(epoch_dir(model_dir, epoch), BACKBONE_DIR)


def fold_lora(expert_product: str, destination: str, config: CausalLMConfig, lora: ExpertConfig,
              backbone: Backbone) -> str:
  """Save the backbone with a trained LoRA folded into its kernels (W + A B / r in float32, as PEFT's
  `merge_and_unload`) at `destination`, a product like a full fine-tune's, so enhancement and evaluation read
  either; an existing one is kept (a rerun resumes)."""
  if fs.isdir(destination):
    return destination
  expert, metadata = loop.load_expert_file(expert_product, config, loop.stage_experts("expert", lora), backbone)
  save_backbone(destination, merge_into_backbone(backbone.params, expert), config, {
      "task": metadata.get("task"), "lora": {"expert": expert_product, "rank": lora.rank, "modules": lora.modules},
      "parent": backbone.record(), "vocabulary": backbone.vocabulary.record(),
      "vocabulary_path": backbone.vocabulary.path})
  return destination


@gin.configurable(denylist=["gin_config_str"])
def train_student(data_file: str = gin.REQUIRED, model_dir: str = gin.REQUIRED, init_from: str | None = None,
                  model_config: CausalLMConfig | None = None, field: str = "cot_tail", loss_on: str = "all",
                  epochs: int = 10, batch_size: int = 8, task_name: str = "teacherlm_student", seed: int = 0,
                  passes_per_epoch: int = 1, lora: ExpertConfig | None = None,
                  gin_config_str: str = "") -> list[str]:
  """Train `epochs` epochs and return each epoch's product (`model_dir/epoch_e/backbone`).

  `init_from`: the student's starting model (a HF causal LM directory, a multitask run dir, or None: random of
  `seed`); `model_config` as `enhance`'s. `feature_lengths`, save/log cadence and the optimizer come from the
  `train` and `make_optimizer` bindings. `passes_per_epoch`: exact passes over the data between two products (a
  small data set trained for many passes compiles once per epoch, so fewer, longer epochs are quicker). `lora`:
  train one LoRA (its modules and rank) on the frozen student instead of every weight (the expert stage), each
  epoch's LoRA folded into the weights of its product (`fold_lora`).
  """
  if min(epochs, batch_size, passes_per_epoch) <= 0:
    raise ConfigError(f"train_student: epochs={epochs}, batch_size={batch_size} and passes_per_epoch="
                      f"{passes_per_epoch} must be positive")
  pairs = training_pairs(formats.read_rows(data_file), field, loss_on)
  if not pairs:
    raise ConfigError(f"{data_file}: no row has a usable {field!r} field (enhance it first)")
  config = model_config_for(init_from, model_config)
  mesh, rules = part.make_mesh(), part.axis_rules()
  from moe_jax.models.interface import build_model  # pylint: disable=g-import-not-at-top
  shardings = part.logical_shardings(part.abstract_params(build_model(config)), mesh, rules)
  backbone = load_backbone(init_from, config, shardings, seed)
  register_task(task_name, pairs, batch_size, epochs * passes_per_epoch, seed)
  steps = passes_per_epoch * math.ceil(len(pairs) / batch_size)
  products = []
  for epoch in range(1, epochs + 1):
    product = loop.train(model_dir=epoch_dir(model_dir, epoch), mixture_or_task_name=task_name,
                         stage="multitask" if lora is None else "expert", model_config=config, experts=lora,
                         batch_size=batch_size, total_steps=epoch * steps, init_from=init_from, save_every=steps,
                         seed=seed, checkpoint_dir=fs.join(fs.absolute(model_dir), loop.CHECKPOINT_DIR),
                         gin_config_str=gin_config_str, backbone=backbone)
    if lora is not None:
      product = fold_lora(product, epoch_product(model_dir, epoch), config, lora, backbone)
    products.append(product)
  fs.write_text(fs.join(model_dir, "epochs.json"), json.dumps(
      {"data_file": data_file, "field": field, "loss_on": loss_on, "rows": len(pairs),
       "passes_per_epoch": passes_per_epoch, "steps_per_epoch": steps, "products": products}, indent=1) + "\n")
  return products
