"""The one path layer: the same operations on a local folder and on a non-local fsspec filesystem (memory://, which
keeps gs:// code's path through fsspec), and a training stage whose model_dir is such a URL."""

import json
import os
import uuid

import fsspec
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import tasks  # noqa: F401  (registers the synthetic tasks)
from moe_jax import fs
from moe_jax.data import files
from moe_jax.models.config import T5Config
from moe_jax.models.t5 import Transformer
from moe_jax.training import checkpointing as ckpt
from moe_jax.training import loop

TINY = T5Config(vocab_size=264, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32", name="tiny_fs")
LENGTHS = {"inputs": 48, "targets": 16}


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
  return str(tmp_path) if request.param == "local" else f"memory://test-{uuid.uuid4().hex}"


def test_files_round_trip_on_each_filesystem(root):
  path = fs.join(root, "a", "b.txt")
  assert not fs.exists(path) and fs.listdir(fs.join(root, "a")) == []
  fs.write_text(path, "first\n")  # creates the folder
  fs.write_text(path, "second\n")  # replaces the whole file
  assert fs.read_text(path) == "second\n" and fs.isfile(path) and fs.isdir(fs.join(root, "a"))
  fs.copy(path, fs.join(root, "a", "c.txt"))
  assert fs.listdir(fs.join(root, "a")) == ["b.txt", "c.txt"]  # no temporary file left behind
  assert fs.basename(path) == "b.txt" and fs.dirname(path) == fs.join(root, "a")
  fs.remove(fs.join(root, "a"))
  assert not fs.exists(path) and not fs.isdir(fs.join(root, "a"))


def test_data_root_rows_read_through_fsspec(root):
  """A FLAN-style split file under a remote data root: found by `split_files` and read row by row; a bad row is
  named by file and row."""
  folder = fs.join(root, "flan", "task")
  fs.write_text(fs.join(folder, "train.jsonl"), '{"inputs": "a", "targets": "b"}\n{"inputs": "c", "targets": "d"}\n')
  fs.write_text(fs.join(folder, "validation.jsonl"), '{"inputs": "a"}\nnot json\n')
  (train,) = files.split_files(folder, "train")
  assert [r["targets"] for r in files.read_rows(train)] == ["b", "d"]
  (validation,) = files.split_files(folder, "validation")
  with pytest.raises(files.MalformedRowError, match=r"validation.jsonl, row 1: not JSON"):
    list(files.read_rows(validation))


def test_an_expert_stage_writes_its_products_to_a_url(tmp_path, monkeypatch):
  """model_dir on memory:// (as on gs:// without a gcsfuse mount): expert file, metrics and config.gin land there,
  none in a local folder named after the URL; orbax's checkpoints go to the local `checkpoint_dir`; a rerun finds
  the product and skips."""
  gin.clear_config()
  model = Transformer(TINY)
  tokens = jnp.ones((1, 4), jnp.int32)
  loop.save_backbone(str(tmp_path / "backbone"),
                     nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)["params"]), TINY)
  model_dir = f"memory://runs-{uuid.uuid4().hex}/expert"
  train = lambda: loop.train(model_dir=model_dir, mixture_or_task_name="synthetic_reverse", stage="expert",
                             model_config=TINY, feature_lengths=LENGTHS, batch_size=4, total_steps=2, log_every=1,
                             save_every=1, init_from=str(tmp_path / "backbone"),
                             checkpoint_dir=str(tmp_path / "checkpoints"), gin_config_str="# the run's gin\n")
  monkeypatch.chdir(tmp_path)  # a URL mistaken for a local path would appear here as ./memory:
  product = train()
  assert product == fs.join(model_dir, ckpt.EXPERT_FILE)
  memory = fsspec.filesystem("memory")
  assert memory.isfile(product.removeprefix("memory://"))
  assert not any(name.startswith("memory") for name in os.listdir(tmp_path))
  assert [json.loads(line)["step"] for line in fs.read_text(fs.join(model_dir, "metrics.jsonl")).splitlines()] == [1, 2]
  assert fs.read_text(fs.join(model_dir, "config.gin")).startswith("# the run's gin\n")
  assert sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == ["1", "2"]
  params, metadata = ckpt.load_experts(product, TINY)
  assert metadata["task"] == "synthetic_reverse" and any(np.any(v) for v in jax.tree.leaves(params))
  assert train() == product  # skipped: the record it finds at the URL matches
