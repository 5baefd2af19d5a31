"""Text <-> token ids for a teacher or student causal LM, without TensorFlow.

A Hugging Face causal LM directory ships its tokenizer (tokenizer.json, BPE for BLOOM and Llama), which
is read with the `tokenizers` library, special tokens as its post-processor adds them, EOS from config.json. A
model this package trained reads its run vocabulary (UTF-8 bytes, SentencePiece, or a HF tokenizer.json without
its special tokens: `moe_jax.data.hf_tokenizer`) in our own causal format, which starts every sequence with the
start token 0 (what `feature_converter(decoder_only=True)` feeds it): `prefix` carries that token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from moe_jax import fs
from moe_jax.data import vocab
from moe_jax.errors import MissingFileError
from moe_jax.models.interface import START_ID

BYTE_OFFSET = 3  # seqio.ByteVocabulary: 0 pad, 1 EOS, 2 UNK, then the 256 bytes
BYTE_EOS = 1


@dataclasses.dataclass(frozen=True)
class Codec:
  """How one model reads text: `encode` (no prefix), `decode`, the ids put before every sequence, and its EOS."""

  encode: Callable[[str], list[int]]
  decode: Callable[[Sequence[int]], str]
  prefix: tuple[int, ...]
  eos_id: int


def _byte_decode(ids: Sequence[int]) -> str:
  return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256).decode("utf-8", "ignore")


def byte_codec() -> Codec:
  """seqio.ByteVocabulary's ids in pure Python (so generation needs no TensorFlow), after the start token."""
  return Codec(lambda s: [b + BYTE_OFFSET for b in s.encode("utf-8")], _byte_decode, (START_ID,), BYTE_EOS)


def hf_codec(directory: str) -> Codec:
  """The tokenizer of a HF causal LM directory (`vocab.hf_tokenizer_vocabulary`: its tokenizer.json and EOS); the
  ids its `encode` adds (e.g. Llama's BOS) are kept, as the model was trained with them."""
  spec = vocab.hf_tokenizer_vocabulary(directory)
  if spec is None:
    raise MissingFileError(f"{directory} has no {vocab.HF_TOKENIZER}: a HF causal LM directory ships one")
  tokenizer = vocab.load_tokenizer(spec.path)
  return Codec(lambda s: tokenizer.encode(s).ids, lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
               (), int(spec.eos_id))


def codec_for(model_path: str | None, spec: vocab.VocabSpec, decoder_only: bool = True) -> Codec:
  """The codec of a loaded model: a HF causal LM directory's tokenizer.json, else its vocabulary `spec`, in our
  format: a causal LM's sequences start with the start token, a T5's encoder input has no prefix (its caller
  appends EOS, as seqio's T5 features do). SentencePiece is read with the sentencepiece package (no TensorFlow)."""
  if decoder_only and model_path and fs.isfile(fs.join(model_path, vocab.HF_TOKENIZER)):
    return hf_codec(model_path)
  prefix = (START_ID,) if decoder_only else ()
  if spec.kind == "byte":
    return dataclasses.replace(byte_codec(), prefix=prefix)
  if spec.kind == "tokenizer":  # a HF tokenizer a model trained here reads
    tokenizer = vocab.load_tokenizer(spec.path)
    return Codec(lambda s: tokenizer.encode(s, add_special_tokens=False).ids,
                 lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True), prefix, int(spec.eos_id))
  import sentencepiece  # pylint: disable=g-import-not-at-top
  processor = sentencepiece.SentencePieceProcessor(model_proto=fs.read_bytes(spec.path))
  pieces = processor.get_piece_size()  # ids past it are seqio's sentinels, which decode to nothing here
  return Codec(lambda s: list(processor.encode(s)), lambda ids: processor.decode([int(i) for i in ids if i < pieces]),
               prefix, processor.eos_id())
