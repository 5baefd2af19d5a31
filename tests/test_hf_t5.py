"""Our T5 on Hugging Face weights matches transformers' PyTorch T5 (the independent reference), and the loader's
errors name what is wrong. Small random models built and saved locally; no network."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from moe_jax.checkpoints.hf import config_from_hf, load_hf_t5
from moe_jax.models import Transformer
from moe_jax.models.attention import relative_position_buckets

ENC_LEN, DEC_LEN = 24, 22  # longer than max_distance below: exercises exact, log-spaced and clipped buckets
RTOL = 1e-4  # max |ours - HF| / max |HF|, per output

# name -> (feed_forward_proj, tie_word_embeddings, distinct lm_head, buckets, max_distance)
STYLES = {
    # T5.1.1 as released: gated-GELU, separate unscaled lm_head.
    "t5_1_1": ("gated-gelu", False, True, 32, 20),
    # What transformers >= 5 builds from tie_word_embeddings=False: lm_head tied to the embedding, unscaled.
    "t5_1_1_hf_tied": ("gated-gelu", False, False, 32, 20),
    # T5 1.0: ReLU, tied lm_head, decoder output scaled by d_model**-0.5.
    "t5_1_0": ("relu", True, False, 8, 12),
}


def _randomise(model, d_kv: int) -> None:
  """Non-trivial values for every weight (norm scales and relative biases too) so a mis-mapped tensor shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif "relative_attention_bias" in name or name == "shared.weight":
        p.normal_(0.0, 1.0)
      else:
        std = p.shape[1] ** -0.5 * (d_kv ** -0.5 if name.endswith(".q.weight") else 1.0)
        p.normal_(0.0, std)


def _build(style: str, seed: int = 0):
  proj, tie, distinct_head, buckets, max_distance = STYLES[style]
  cfg = transformers.T5Config(
      vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=3,
      relative_attention_num_buckets=buckets, relative_attention_max_distance=max_distance, feed_forward_proj=proj,
      tie_word_embeddings=tie, dropout_rate=0.0)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg)
  if distinct_head:
    model.lm_head.weight = torch.nn.Parameter(torch.empty(100, 32))
  _randomise(model, cfg.d_kv)
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple]:
  out = {}
  for style in STYLES:
    model = _build(style)
    path = tmp_path_factory.mktemp(style)
    model.save_pretrained(path, safe_serialization=True)
    out[style] = (model, path)
  return out


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, 100, (2, ENC_LEN))
  enc[0, -5:] = 0  # right padding
  dec = rng.integers(2, 100, (2, DEC_LEN))
  dec[:, 0] = 0  # decoder start token
  return enc.astype(np.int32), dec.astype(np.int32)


def _rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("style", list(STYLES))
def test_matches_transformers(checkpoints, style):
  hf_model, path = checkpoints[style]
  cfg = config_from_hf(path, dtype="float32")
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 3)
  assert cfg.tie_word_embeddings == (style == "t5_1_0")
  # The inputs reach the last (clipped) bucket in both directions, so the log-spaced ones are used as well.
  buckets = relative_position_buckets(ENC_LEN, ENC_LEN, True, cfg.relative_attention_num_buckets,
                                      cfg.relative_attention_max_distance)
  assert {cfg.relative_attention_num_buckets // 2 - 1, cfg.relative_attention_num_buckets - 1} <= set(buckets.flat)

  params = load_hf_t5(path, cfg)
  enc, dec = _inputs()
  model = Transformer(cfg)
  encoded = model.apply({"params": params}, enc, method="encode")
  logits = model.apply({"params": params}, enc, dec)

  ids, mask = torch.from_numpy(enc).long(), torch.from_numpy(enc > 0).long()
  with torch.no_grad():
    ref_encoded = hf_model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    ref_logits = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.from_numpy(dec).long()).logits
  enc_err, logit_err = _rel_err(encoded, ref_encoded), _rel_err(logits, ref_logits.numpy())
  print(f"{style}: encoder max rel err {enc_err:.2e}, logits max rel err {logit_err:.2e}")
  assert enc_err < RTOL and logit_err < RTOL


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_and_bf16_checkpoints(checkpoints, tmp_path):
  hf_model, path = checkpoints["t5_1_1"]
  cfg = config_from_hf(path, dtype="float32")
  reference = _leaves(load_hf_t5(path, cfg))
  defaults = _leaves(load_hf_t5(path))  # config read from the directory, float32 params
  assert defaults.keys() == reference.keys() and all(np.array_equal(defaults[k], reference[k]) for k in reference)

  hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  sharded = _leaves(load_hf_t5(tmp_path / "sharded", cfg))
  assert sharded.keys() == reference.keys()
  assert all(np.array_equal(sharded[k], reference[k]) for k in reference)

  copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
  as_f32 = _leaves(load_hf_t5(tmp_path / "bf16", cfg))
  as_bf16 = _leaves(load_hf_t5(tmp_path / "bf16", cfg, params_dtype="bfloat16"))
  for k, v in reference.items():
    rounded = v.astype(ml_dtypes.bfloat16)
    assert as_f32[k].dtype == np.float32 and np.array_equal(as_f32[k], rounded.astype(np.float32)), k
    assert as_bf16[k].dtype == ml_dtypes.bfloat16 and np.array_equal(as_bf16[k], rounded), k


def test_shape_mismatch_names_first_parameter(checkpoints):
  _, path = checkpoints["t5_1_1"]
  with pytest.raises(ValueError) as e:
    load_hf_t5(path, config_from_hf(path, d_ff=128))
  for part in ("encoder/layers_0/mlp/wi_0/kernel", "(32, 128)", "(32, 64)",
               "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"):
    assert part in str(e.value)


def test_layer_count_mismatch_names_tensors(checkpoints):
  _, path = checkpoints["t5_1_0"]
  with pytest.raises(ValueError, match=r"unexpected.*decoder\.block\.2\.layer\.0\.SelfAttention\.k\.weight"):
    load_hf_t5(path, config_from_hf(path, num_decoder_layers=2))
  with pytest.raises(ValueError, match=r"missing.*encoder\.block\.2\.layer\.0\.SelfAttention\.k\.weight"):
    load_hf_t5(path, config_from_hf(path, num_encoder_layers=3))


def test_untied_head_into_tied_config_fails(checkpoints):
  _, path = checkpoints["t5_1_1"]
  with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight"):
    load_hf_t5(path, config_from_hf(path, tie_word_embeddings=True))


def test_missing_files(checkpoints, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_t5(tmp_path / "nowhere")
  _, path = checkpoints["t5_1_0"]
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    load_hf_t5(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    config_from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("field,value", [("feed_forward_proj", "gated-silu"), ("model_type", "bart")])
def test_unsupported_config(checkpoints, tmp_path, field, value):
  _, path = checkpoints["t5_1_0"]
  config = json.loads((path / "config.json").read_text()) | {field: value}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + f".*{field}"):
    config_from_hf(tmp_path)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (64, 256)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
  offsets = np.arange(-300, 301)
  # One query at position 300 over 601 keys: key - query runs over the offsets.
  ours = relative_position_buckets(1, len(offsets), bidirectional, num_buckets, max_distance, 300)[0]
  ref = T5Attention._relative_position_bucket(torch.from_numpy(offsets), bidirectional=bidirectional,
                                              num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(ours, ref.numpy())


def test_loader_does_not_import_torch():
  code = "import sys, moe_jax.checkpoints.hf; assert 'torch' not in sys.modules, 'torch imported'"
  root = Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=os.environ | {"PYTHONPATH": str(root)})
