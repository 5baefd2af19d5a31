"""T5X checkpoints load into the tree `load_hf_t5` gives for the same weights, and our model on them matches
transformers' PyTorch T5 (the independent reference). The format is checked against what t5x's own code writes
(google-research/t5x, t5x/checkpoints.py: `Checkpointer.save` / `_write_state_to_tensorstore` / `_get_spec`): a
msgpack `checkpoint` file `{"version": 3, "optimizer": {"target": ..., "state": ...}}` whose partitioned leaves are
tensorstore zarr specs with paths relative to the directory, and one gzip zarr v2 array directory per parameter
named by its `.`-joined path. A checkpoint built here by hand (msgpack + zarr chunks written with gzip and NumPy, no
tensorstore, no `save_t5x`) must load too. Small random model; no network."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import shutil

import jax
import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch
import transformers
from flax import serialization

from moe_jax.checkpoints.hf import config_from_hf, load_hf_t5
from moe_jax.checkpoints.t5x import load_t5x, save_t5x
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models import Transformer

ENC_LEN, DEC_LEN = 12, 10
RTOL = 1e-4  # max |ours - HF| / max |HF|, as tests/test_hf_t5.py
VOCAB = 100


def _leaves(tree) -> dict[tuple[str, ...], np.ndarray]:
  return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random T5.1.1 (gated-GELU, separate head) saved by transformers, its tree from `load_hf_t5`, its config, and
  PyTorch's logits on fixed inputs."""
  hf_cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
      relative_attention_num_buckets=32, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(hf_cfg)
  model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, 32))
  with torch.no_grad():  # non-trivial norms and biases too, so a mis-mapped tensor shows
    for name, p in model.named_parameters():
      p.normal_(1.0 if "layer_norm" in name else 0.0, 0.5 if "layer_norm" in name else p.shape[-1] ** -0.5)
  model.eval()
  hf_dir = tmp_path_factory.mktemp("hf")
  model.save_pretrained(hf_dir, safe_serialization=True)
  config = config_from_hf(hf_dir, dtype="float32")
  params = load_hf_t5(hf_dir, config)

  rng = np.random.default_rng(0)
  enc = rng.integers(2, VOCAB, (2, ENC_LEN)).astype(np.int32)
  enc[0, -3:] = 0
  dec = rng.integers(2, VOCAB, (2, DEC_LEN)).astype(np.int32)
  dec[:, 0] = 0
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(enc).long(), attention_mask=torch.from_numpy(enc > 0).long(),
                   decoder_input_ids=torch.from_numpy(dec).long()).logits.numpy()
  return params, config, (enc, dec), logits


@pytest.fixture(scope="module")
def written(reference, tmp_path_factory) -> str:
  """`save_t5x` of the reference tree, as T5X names step directories."""
  path = str(tmp_path_factory.mktemp("model") / "checkpoint_7")
  save_t5x(reference[0], path, step=7)
  return path


def _assert_same_tree(loaded, expected, dtype=np.float32):
  ours, ref = _leaves(loaded), _leaves(expected)
  assert ours.keys() == ref.keys()
  for k, v in ref.items():
    assert ours[k].dtype == dtype and isinstance(ours[k], np.ndarray), k
    assert np.array_equal(ours[k], v), k


def test_roundtrip_matches_hf_tree_and_transformers(reference, written):
  params, config, (enc, dec), ref_logits = reference
  loaded = load_t5x(written, config)
  _assert_same_tree(loaded, params)
  _assert_same_tree(load_t5x(os.path.join(written, "checkpoint"), config), params)  # the msgpack file itself

  logits = Transformer(config).apply({"params": loaded}, enc, dec)
  err = float(np.max(np.abs(np.asarray(logits, np.float64) - ref_logits)) / np.max(np.abs(ref_logits)))
  print(f"T5X-loaded logits max rel err vs transformers {err:.2e}")
  assert err < RTOL


def _read_zarr_by_hand(directory: str) -> np.ndarray:
  """A zarr v2 array from its `.zarray` and gzip chunk files with NumPy alone (C order, "." separated keys)."""
  with open(os.path.join(directory, ".zarray")) as f:
    meta = json.load(f)
  assert meta["zarr_format"] == 2 and meta["compressor"]["id"] == "gzip" and meta["order"] == "C"
  assert meta["filters"] is None
  dtype = np.dtype(ml_dtypes.bfloat16) if meta["dtype"] == "bfloat16" else np.dtype(meta["dtype"])
  shape, chunks = meta["shape"], meta["chunks"]
  out = np.zeros(shape, dtype)
  for index in itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunks))):
    name = meta.get("dimension_separator", ".").join(map(str, index))
    with open(os.path.join(directory, name), "rb") as f:
      chunk = np.frombuffer(gzip.decompress(f.read()), dtype).reshape(chunks)
    region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
    out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
  return out


def _spec_leaves(tree, prefix=()):
  if isinstance(tree, dict) and "driver" not in tree:
    for k, v in tree.items():
      yield from _spec_leaves(v, prefix + (k,))
  else:
    yield prefix, tree


def test_written_checkpoint_is_t5x_format(reference, written):
  params = _leaves(reference[0])
  with open(os.path.join(written, "checkpoint"), "rb") as f:
    raw = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)  # plain msgpack, not our reader
  assert set(raw) == {"version", "optimizer"} and raw["version"] == 3
  assert set(raw["optimizer"]) == {"target", "state"}
  with open(os.path.join(written, "checkpoint"), "rb") as f:  # the step: an inline array (flax's msgpack extension)
    assert serialization.msgpack_restore(f.read())["optimizer"]["state"]["step"] == 7
  specs = dict(_spec_leaves(raw["optimizer"]["target"]))
  assert specs.keys() == params.keys()
  expected_entries = {"checkpoint"}
  for key, spec in specs.items():
    name = "target." + ".".join(key)
    expected_entries.add(name)
    assert spec["driver"] == "zarr" and spec["dtype"] == "float32", key
    assert spec["kvstore"]["driver"] == "file" and spec["kvstore"]["path"].rstrip("/") == name, key  # relative
    assert spec["metadata"]["shape"] == list(params[key].shape), key
    assert spec["metadata"]["compressor"]["id"] == "gzip", key
    with open(os.path.join(written, name, ".zarray")) as f:
      assert json.load(f)["dtype"] == "<f4", key
    assert np.array_equal(_read_zarr_by_hand(os.path.join(written, name)), params[key]), key
  assert set(os.listdir(written)) == expected_entries


def _write_zarr_by_hand(directory: str, array: np.ndarray, zarr_dtype: str) -> None:
  """One zarr v2 array as tensorstore's zarr driver writes it, with NumPy + gzip: halves of the first axis as
  chunks (so a multi-chunk read is exercised), the last one padded to the full chunk shape."""
  chunks = [max(1, -(-array.shape[0] // 2)), *array.shape[1:]]
  os.makedirs(directory)
  meta = {"chunks": chunks, "compressor": {"id": "gzip", "level": 1}, "dimension_separator": ".",
          "dtype": zarr_dtype, "fill_value": None, "filters": None, "order": "C", "shape": list(array.shape),
          "zarr_format": 2}
  with open(os.path.join(directory, ".zarray"), "w") as f:
    json.dump(meta, f)
  for i in range(-(-array.shape[0] // chunks[0])):
    chunk = np.zeros(chunks, array.dtype)
    part = array[i * chunks[0]:(i + 1) * chunks[0]]
    chunk[:len(part)] = part
    with open(os.path.join(directory, ".".join([str(i)] + ["0"] * (array.ndim - 1))), "wb") as f:
      f.write(gzip.compress(chunk.tobytes()))


def _spec(name: str, array: np.ndarray, style: str) -> dict:
  """The msgpack placeholder of one array, in the shapes t5x has written over time."""
  meta = {"chunks": [max(1, -(-array.shape[0] // 2)), *array.shape[1:]], "compressor": {"id": "gzip"},
          "shape": list(array.shape)}
  if style == "file":  # local write, tensorstore >= 0.1.14
    return {"driver": "zarr", "dtype": "bfloat16", "kvstore": {"driver": "file", "path": name}, "metadata": meta}
  if style == "gcs":  # written to gs:// (how the public checkpoints were made): a placeholder bucket
    return {"driver": "zarr", "dtype": "bfloat16", "kvstore": {"bucket": "t5x-dummy-bucket", "driver": "gcs",
                                                               "path": name + "/"}, "metadata": meta}
  return {"driver": "zarr", "kvstore": {"driver": "file"}, "path": name, "metadata": meta}  # tensorstore < 0.1.14


def test_handmade_bf16_checkpoint_with_optimizer_state(reference, tmp_path):
  """bfloat16 arrays, every spec style, an inline (unpartitioned) leaf, and Adafactor slots that must be skipped
  unread: `v_col` points at an array that does not exist."""
  params, config, _, _ = reference
  directory = tmp_path / "checkpoint_1000000"
  directory.mkdir()
  target, rounded = {}, {}
  styles = itertools.cycle(["file", "gcs", "old"])
  for key, value in _leaves(params).items():
    array = value.astype(ml_dtypes.bfloat16)
    rounded[key] = array.astype(np.float32)
    node = target
    for part in key[:-1]:
      node = node.setdefault(part, {})
    if key == ("encoder", "encoder_norm", "scale"):
      node[key[-1]] = rounded[key]  # kept in the msgpack (no partitioning axes in t5x)
      continue
    name = "target." + ".".join(key)
    _write_zarr_by_hand(str(directory / name), array, "bfloat16")
    node[key[-1]] = _spec(name, array, next(styles))
  slot = "state.param_states.encoder.layers_0.attention.key.kernel"
  _write_zarr_by_hand(str(directory / f"{slot}.v_row"), np.ones(32, np.float32), "<f4")
  param_states = {"encoder": {"layers_0": {"attention": {"key": {"kernel": {
      "v_row": _spec(f"{slot}.v_row", np.ones(32, np.float32), "file") | {"dtype": "float32"},
      "v_col": _spec(f"{slot}.v_col", np.ones(32, np.float32), "file") | {"dtype": "float32"},
      "v": np.zeros(1, np.float32), "m": np.zeros(1, np.float32)}}}}}}
  state = {"version": 3, "optimizer": {"target": target,
                                       "state": {"step": np.asarray(1000000, np.int32), "param_states": param_states}}}
  (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(state))

  expected = {}
  for key, value in rounded.items():
    node = expected
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  _assert_same_tree(load_t5x(directory, config), expected)
  _assert_same_tree(load_t5x(directory, config, params_dtype="bfloat16"),
                    jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), expected), dtype=ml_dtypes.bfloat16)


def test_bf16_save_roundtrip(reference, tmp_path):
  params, config, _, _ = reference
  bf16 = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params)
  save_t5x(bf16, tmp_path / "checkpoint_0")
  with open(tmp_path / "checkpoint_0" / "target.token_embedder.embedding" / ".zarray") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  _assert_same_tree(load_t5x(tmp_path / "checkpoint_0", config, params_dtype="bfloat16"), bf16,
                    dtype=ml_dtypes.bfloat16)


def test_orbax_checkpoint(reference, tmp_path):
  """t5x's orbax manager: the same state dict (no version/optimizer wrapper) as a PyTree in checkpoint_<step>/state."""
  import orbax.checkpoint as ocp

  params, config, _, _ = reference
  state = {"target": params, "state": {"step": np.asarray(5, np.int32), "param_states": {
      "decoder": {"decoder_norm": {"scale": {"v": np.ones(32, np.float32)}}}}}}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "checkpoint_5" / "state"), state)
  _assert_same_tree(load_t5x(tmp_path / "checkpoint_5", config), params)
  with pytest.raises(MismatchError, match=r"encoder/layers_0/mlp/wi_0/kernel: expected shape \(32, 128\)"):
    load_t5x(tmp_path / "checkpoint_5", dataclasses.replace(config, d_ff=128))


def test_other_model_size_names_first_parameter(reference, written):
  config = reference[1]
  with pytest.raises(MismatchError) as e:
    load_t5x(written, dataclasses.replace(config, d_ff=128))
  for part in ("parameter encoder/layers_0/mlp/wi_0/kernel", "expected shape (32, 128)", "found (32, 64)",
               "target.encoder.layers_0.mlp.wi_0.kernel", "another model size"):
    assert part in str(e.value)
  with pytest.raises(MismatchError, match=r"^parameter token_embedder/embedding: expected shape \(100, 64\)"):
    load_t5x(written, dataclasses.replace(config, d_model=64))


def test_missing_and_unexpected_parameters(reference, written, tmp_path):
  config = reference[1]
  with pytest.raises(MismatchError, match=r"missing.*encoder/layers_2/attention/key/kernel"):
    load_t5x(written, dataclasses.replace(config, num_encoder_layers=3))
  with pytest.raises(MismatchError, match=r"unexpected.*decoder/layers_1/encoder_decoder_attention/key/kernel"):
    load_t5x(written, dataclasses.replace(config, num_decoder_layers=1))
  with pytest.raises(MismatchError, match=r"unexpected.*decoder/logits_dense/kernel.*tie_word_embeddings = False"):
    load_t5x(written, dataclasses.replace(config, tie_word_embeddings=True))

  # One parameter dropped from the msgpack: named as missing.
  copy = tmp_path / "checkpoint_7"
  shutil.copytree(written, copy)
  state = serialization.msgpack_restore((copy / "checkpoint").read_bytes())
  del state["optimizer"]["target"]["decoder"]["layers_1"]["mlp"]["wi_1"]
  (copy / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
  with pytest.raises(MismatchError, match=r"1 parameter\(s\) missing.*\['decoder/layers_1/mlp/wi_1/kernel'\]"):
    load_t5x(copy, config)

  # Listed in the msgpack but its zarr array is gone: an incomplete copy.
  copy = tmp_path / "incomplete"
  shutil.copytree(written, copy)
  shutil.rmtree(copy / "target.encoder.layers_1.attention.out.kernel")
  with pytest.raises(MissingFileError, match=r"target\.encoder\.layers_1\.attention\.out\.kernel/\.zarray"):
    load_t5x(copy, config)


def test_missing_files(reference, written, tmp_path):
  config = reference[1]
  with pytest.raises(MissingFileError, match="does not exist"):
    load_t5x(tmp_path / "nowhere", config)
  (tmp_path / "empty").mkdir()
  with pytest.raises(MissingFileError, match="no T5X `checkpoint` file"):
    load_t5x(tmp_path / "empty", config)
  # A model directory instead of a step directory: the error names the steps in it.
  with pytest.raises(MissingFileError, match=r"checkpoint_7"):
    load_t5x(os.path.dirname(written), config)
  (tmp_path / "tf").mkdir()
  (tmp_path / "tf" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1000000"\n')
  with pytest.raises(MismatchError, match="not a msgpack file|no `optimizer/target`"):
    load_t5x(tmp_path / "tf", config)


def test_save_refuses_to_overwrite(reference, written):
  with pytest.raises(ConfigError, match="already exists"):
    save_t5x(reference[0], written)


def test_gcs_paths_take_the_same_kvstore_route():
  """gs:// cannot be reached here; check the kvstore specs it would use parse, with the real bucket (not t5x's
  placeholder) and the array path under the checkpoint directory."""
  import tensorstore as ts

  from moe_jax.checkpoints.t5x import _child, _kvstore

  directory = _kvstore("gs://t5-data/pretrained_models/t5x/t5_1_1_xl/checkpoint_1000000/")
  assert directory == {"driver": "gcs", "bucket": "t5-data",
                       "path": "pretrained_models/t5x/t5_1_1_xl/checkpoint_1000000/"}
  array = _child(directory, "target.encoder.layers_0.attention.key.kernel/")
  assert array["path"] == directory["path"] + "target.encoder.layers_0.attention.key.kernel/"
  ts.Spec({"driver": "zarr", "kvstore": array})  # parses without I/O
  assert _kvstore("relative/dir")["path"] == os.path.abspath("relative/dir") + "/"


def test_a_t5x_checkpoint_is_a_backbone_for_training(tmp_path):
  """`train.init_from` / `phatgoose_pipeline.init_from` take a T5X checkpoint directory: the backbone loaded from it
  has the weights (checksum) of the tree that was written, and a byte-level model's vocabulary."""
  from moe_jax.checkpoints.identity import weights_checksum
  from moe_jax.checkpoints.t5x import is_t5x_checkpoint
  from moe_jax.models.config import T5Config
  from moe_jax.training import partitioning as part
  from moe_jax.training.backbone import load_backbone

  config = T5Config(vocab_size=264, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                    num_decoder_layers=1, dtype="float32")
  tokens = np.ones((1, 1), np.int32)
  params = jax.tree.map(np.asarray, __import__("flax").linen.meta.unbox(
      Transformer(config).init(jax.random.PRNGKey(3), tokens, tokens))["params"])
  save_t5x(params, str(tmp_path / "checkpoint_1"), step=1)
  assert is_t5x_checkpoint(str(tmp_path / "checkpoint_1")) and not is_t5x_checkpoint(str(tmp_path))
  shardings = part.logical_shardings(part.abstract_params(Transformer(config)), part.make_mesh(), part.axis_rules())
  backbone = load_backbone(str(tmp_path / "checkpoint_1"), config, shardings)
  assert backbone.weights == weights_checksum(params) and backbone.vocabulary.kind == "byte"
