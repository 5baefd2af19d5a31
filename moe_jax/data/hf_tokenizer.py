"""A Hugging Face `tokenizer.json` (BLOOM's and Llama's byte-level BPE) as a `seqio.Vocabulary`, so a causal LM
fine-tuned from a HF checkpoint trains on the same ids its tokenizer gives (vocabulary kind "tokenizer",
`moe_jax.data.vocab`).

The text is encoded without the tokenizer's special tokens: seqio appends EOS itself, and this package's causal
format starts every sequence with the start id 0 (`feature_converter(decoder_only=True)`), which `teacher.text`
puts before a prompt of a model trained here. Id 0 is padding to seqio (BLOOM's and Llama's `<unk>`, which
byte-level BPE does not emit). In tf.data the tokenizer runs through `tf.numpy_function` (the `tokenizers` library
has no TensorFlow ops), so a pipeline that tokenises this way cannot be serialised into a graph-only cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import vocab


class TokenizerVocabulary(seqio.Vocabulary):
  """The ids of the `tokenizers.Tokenizer` in `path`, with `eos_id` as its end of sequence."""

  def __init__(self, path: str, eos_id: int):
    self._path = path
    self._eos_id = int(eos_id)
    self._tokenizer = vocab.load_tokenizer(path)
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def unk_id(self) -> int | None:
    model = self._tokenizer.model
    token = getattr(model, "unk_token", None)
    return None if token is None else self._tokenizer.token_to_id(token)

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> list[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(text: np.ndarray | bytes) -> np.ndarray:  # eager calls pass a 0-d array, tf.data graphs bytes
      text = text.item() if isinstance(text, np.ndarray) else text
      return np.asarray(self._encode(text.decode("utf-8")), np.int32)
    ids = tf.numpy_function(encode, [tf.convert_to_tensor(s, tf.string)], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """[..., L] ids -> [...] strings."""
    def decode(rows: np.ndarray) -> np.ndarray:
      flat = rows.reshape(-1, rows.shape[-1])
      return np.asarray([self._decode(r.tolist()).encode("utf-8") for r in flat], object).reshape(rows.shape[:-1])
    text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    text.set_shape(ids.shape[:-1])
    return text

  def _record(self) -> dict:
    return vocab.VocabSpec("tokenizer", self._path, 0, self._eos_id).record()

  def __eq__(self, other: object) -> bool:
    return isinstance(other, TokenizerVocabulary) and other._record() == self._record()

  def __hash__(self) -> int:  # equal vocabularies (same file content and EOS) hash alike, wherever the file is
    return hash(tuple(sorted(self._record().items())))

  def __repr__(self) -> str:
    return f"TokenizerVocabulary({self._path!r}, eos_id={self._eos_id})"
