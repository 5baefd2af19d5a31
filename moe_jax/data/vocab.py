"""Vocabularies, chosen by gin (`get_vocabulary.kind = 'sentencepiece'`, `get_vocabulary.path = ...`).

seqio is imported inside `get_vocabulary`, so importing this module (to register its gin configurable before a gin
file is parsed) does not pull in TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any

import gin

KINDS = ("byte", "sentencepiece")
# T5's SentencePiece vocabularies reserve 100 sentinel ids after the 32000 pieces (32100 used, 32128 in the model).
T5_EXTRA_IDS = 100


def _exists(path: str) -> bool:
  if "://" in path:  # gs://, s3://, ...: only TensorFlow's file system knows how to look
    import tensorflow as tf
    return tf.io.gfile.exists(path)
  return os.path.exists(path)


@gin.configurable
def get_vocabulary(kind: str = "byte", path: str | None = None, extra_ids: int | None = None) -> Any:
  """A `seqio.Vocabulary`: UTF-8 bytes (259 ids) or a SentencePiece model file.

  `extra_ids` defaults to 0 for bytes and to T5's 100 sentinels for SentencePiece. A missing model file fails here,
  naming the path, rather than at the first tokenisation deep inside a tf.data pipeline (seqio loads it lazily).
  """
  if kind not in KINDS:
    raise ValueError(f"get_vocabulary: unknown kind {kind!r}; expected one of {KINDS}")
  if kind == "sentencepiece":
    if not path:
      raise ValueError("get_vocabulary(kind='sentencepiece') needs `path` to a SentencePiece .model file")
    if not _exists(path):
      raise FileNotFoundError(f"SentencePiece model file not found: {path!r} (set get_vocabulary.path)")
  import seqio

  if kind == "byte":
    return seqio.ByteVocabulary(extra_ids=extra_ids or 0)
  return seqio.SentencePieceVocabulary(path, extra_ids=T5_EXTRA_IDS if extra_ids is None else extra_ids)
