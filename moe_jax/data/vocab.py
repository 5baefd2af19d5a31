"""The vocabulary belongs to the backbone: every task tokenises with the vocabulary of the model the run loads.

Where it comes from, first match wins:
  1. the `spiece.model` of a Hugging Face T5 directory (`init_from`; HF T5 directories ship it), else the
     `tokenizer.json` of a Hugging Face causal LM directory (BLOOM's and Llama's BPE, read with the `tokenizers`
     library: kind "tokenizer"), or the vocabulary recorded in a multitask backbone this package saved;
  2. a gin binding, `get_vocabulary.kind` / `.path` (model gin files bind it: `gin/models/tiny.gin` reads bytes,
     the T5.1.1 files SentencePiece);
  3. UTF-8 bytes.
A binding that contradicts the checkpoint (bytes for a SentencePiece checkpoint, another SentencePiece file) and a
vocabulary with more ids than the model's `vocab_size` stop the run before anything compiles, naming both.

Tasks never capture a vocabulary when they are registered: their features hold `RUN_VOCABULARY`, which resolves
when the data is read (after every gin binding), to the vocabulary a run made active (`using`), else to the gin
binding's. seqio is imported only when a vocabulary is built, so importing this module needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import gin

from moe_jax import fs
from moe_jax.errors import ConfigError, MismatchError, MissingFileError

KINDS = ("byte", "sentencepiece", "tokenizer")
FILE_KINDS = ("sentencepiece", "tokenizer")  # the kinds read from a file (`path`), recorded by its content hash
# T5's SentencePiece vocabularies reserve 100 sentinel ids after the 32000 pieces (32100 used, 32128 in the model).
T5_EXTRA_IDS = 100
HF_SPIECE = "spiece.model"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER = "tokenizer.json"
HF_CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class VocabSpec:
  """What a model reads: bytes, a SentencePiece model file with `extra_ids` sentinels after its pieces, or a
  Hugging Face `tokenizer.json` (kind "tokenizer") whose end-of-sequence id is `eos_id`."""

  kind: str = "byte"
  path: str | None = None
  extra_ids: int | None = None
  eos_id: int | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"vocabulary kind {self.kind!r}; expected one of {KINDS} (get_vocabulary.kind)")
    if self.kind == "sentencepiece" and not self.path:
      raise ConfigError("a SentencePiece vocabulary needs the path of its .model file (get_vocabulary.path)")
    if self.kind == "tokenizer" and (not self.path or self.eos_id is None):
      raise ConfigError("a Hugging Face tokenizer vocabulary needs the path of its tokenizer.json and its EOS id "
                        "(get_vocabulary.path and .eos_id)")

  @property
  def sentinels(self) -> int:
    return self.extra_ids if self.extra_ids is not None else (T5_EXTRA_IDS if self.kind == "sentencepiece" else 0)

  def describe(self) -> str:
    if self.kind == "tokenizer":
      return f"Hugging Face tokenizer {self.path} (EOS {self.eos_id})"
    return "UTF-8 bytes" if self.kind == "byte" else f"SentencePiece {self.path} (+{self.sentinels} sentinels)"

  def record(self) -> dict[str, Any]:
    """What products record: the kind, the sentinel count and the file's content hash (not its path, which
    differs between machines); a tokenizer's EOS id too."""
    record = {"kind": self.kind, "extra_ids": self.sentinels,
              "sha256": None if self.path is None else _file_sha(self.path)}
    return {**record, "eos_id": self.eos_id} if self.kind == "tokenizer" else record

  def build(self) -> Any:
    return _build(self)

  @property
  def size(self) -> int:
    """The id count `build().vocab_size` gives, without seqio (so without TensorFlow: loading a backbone needs
    none): bytes are 3 special ids + 256 + sentinels; a SentencePiece model its pieces + sentinels; a tokenizer
    its vocabulary with added tokens."""
    return _size(self)


@functools.lru_cache(maxsize=16)
def _file_sha(path: str) -> str:
  if not fs.exists(path):
    raise MissingFileError(f"vocabulary file not found: {path!r} (set get_vocabulary.path)")
  return hashlib.sha256(fs.read_bytes(path)).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _build(spec: VocabSpec) -> Any:
  import seqio  # pylint: disable=g-import-not-at-top

  if spec.kind == "byte":
    return seqio.ByteVocabulary(extra_ids=spec.sentinels)
  _file_sha(spec.path)  # a missing file fails here, naming the path, not deep inside a tf.data pipeline
  if spec.kind == "tokenizer":
    from moe_jax.data.hf_tokenizer import TokenizerVocabulary  # pylint: disable=g-import-not-at-top
    return TokenizerVocabulary(spec.path, spec.eos_id)
  return seqio.SentencePieceVocabulary(spec.path, extra_ids=spec.sentinels)


@functools.lru_cache(maxsize=16)
def _size(spec: VocabSpec) -> int:
  if spec.kind == "byte":
    return 3 + 256 + spec.sentinels  # seqio.ByteVocabulary: pad, EOS, UNK, then the bytes
  _file_sha(spec.path)
  if spec.kind == "tokenizer":
    return load_tokenizer(spec.path).get_vocab_size(with_added_tokens=True)
  import sentencepiece  # pylint: disable=g-import-not-at-top

  processor = sentencepiece.SentencePieceProcessor()
  processor.LoadFromSerializedProto(fs.read_bytes(spec.path))
  return processor.GetPieceSize() + spec.sentinels


@functools.lru_cache(maxsize=16)
def load_tokenizer(path: str) -> Any:
  """A `tokenizers.Tokenizer` from a tokenizer.json (any fsspec path)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers.Tokenizer.from_str(fs.read_text(path))


@gin.configurable
def get_vocabulary(kind: str | None = None, path: str | None = None, extra_ids: int | None = None,
                   eos_id: int | None = None) -> Any:
  """The `seqio.Vocabulary` of the gin binding (or of the arguments): bytes unless a SentencePiece path is set."""
  return binding(kind, path, extra_ids, eos_id).build()


def binding(kind: str | None = None, path: str | None = None, extra_ids: int | None = None,
            eos_id: int | None = None) -> VocabSpec:
  """The vocabulary the gin binding of `get_vocabulary` names (arguments win); bytes when nothing is bound."""
  given = dict(kind=kind, path=path, extra_ids=extra_ids, eos_id=eos_id)
  bound = {**gin.get_bindings(get_vocabulary), **{k: v for k, v in given.items() if v is not None}}
  chosen = bound.get("kind") or ("sentencepiece" if bound.get("path") else "byte")
  return VocabSpec(chosen, bound.get("path") if chosen in FILE_KINDS else None, bound.get("extra_ids"),
                   bound.get("eos_id") if chosen == "tokenizer" else None)


def _bound_explicitly() -> dict[str, Any]:
  return dict(gin.get_bindings(get_vocabulary))


def hf_vocabulary(directory: str) -> VocabSpec | None:
  """The vocabulary a Hugging Face directory ships, if it does: a T5's SentencePiece model (sentinels from its
  tokenizer config, T5's 100 otherwise), else a causal LM's tokenizer.json (EOS from its config.json)."""
  model = fs.join(directory, HF_SPIECE)
  if not fs.isfile(model):
    return hf_tokenizer_vocabulary(directory)
  extra = T5_EXTRA_IDS
  config = fs.join(directory, HF_TOKENIZER_CONFIG)
  if fs.isfile(config):
    extra = int(json.loads(fs.read_text(config)).get("extra_ids", T5_EXTRA_IDS))
  return VocabSpec("sentencepiece", model, extra)


def hf_tokenizer_vocabulary(directory: str) -> VocabSpec | None:
  """A HF causal LM directory's tokenizer.json with the EOS id of its config.json (else of its tokenizer
  config's `eos_token`), or None without a tokenizer.json."""
  path = fs.join(directory, HF_TOKENIZER)
  if not fs.isfile(path):
    return None
  eos = None
  if fs.isfile(fs.join(directory, HF_CONFIG)):
    eos = json.loads(fs.read_text(fs.join(directory, HF_CONFIG))).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
  if eos is None and fs.isfile(fs.join(directory, HF_TOKENIZER_CONFIG)):
    token = json.loads(fs.read_text(fs.join(directory, HF_TOKENIZER_CONFIG))).get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    eos = load_tokenizer(path).token_to_id(token) if token else None
  if eos is None:
    raise ConfigError(f"{directory} has a tokenizer.json but names no EOS token (config.json eos_token_id or "
                      f"{HF_TOKENIZER_CONFIG} eos_token): add one")
  return VocabSpec("tokenizer", path, 0, int(eos))


def for_backbone(checkpoint_vocabulary: VocabSpec | dict[str, Any] | None, where: str, vocab_size: int,
                 model_name: str, path_hint: str | None = None) -> VocabSpec:
  """The vocabulary of a run whose backbone is `where` (a checkpoint's own vocabulary: a `VocabSpec` from a HF
  directory, or the `record()` a saved backbone carries, with `path_hint` where its file was; None when it has
  none), checked against the gin binding and the model's `vocab_size`."""
  bound = _bound_explicitly()
  if isinstance(checkpoint_vocabulary, dict):  # a saved backbone's record: bytes, or a vocabulary file to find
    checkpoint_vocabulary = _from_record(checkpoint_vocabulary, where, path_hint)
  if checkpoint_vocabulary is None:
    spec = binding()
    if spec.kind == "sentencepiece" and not spec.path:
      raise ConfigError(f"model {model_name} reads SentencePiece, but {where} ships no {HF_SPIECE}: set "
                        "get_vocabulary.path to its .model file")
  else:
    spec = checkpoint_vocabulary
    wanted = bound.get("kind") or ("sentencepiece" if bound.get("path") else None)
    if wanted is not None and wanted != spec.kind:
      raise MismatchError(f"the gin binding reads {wanted} (get_vocabulary.kind), but the backbone {where} was "
                          f"trained with {spec.describe()}: drop the binding or use another checkpoint")
    if bound.get("path") and spec.kind in FILE_KINDS and _file_sha(bound["path"]) != _file_sha(spec.path):
      raise MismatchError(f"get_vocabulary.path={bound['path']!r} is another vocabulary file than the backbone's "
                          f"{spec.path} ({where}): drop the binding or point it at the backbone's file")
  size = spec.size
  if size > vocab_size:
    raise MismatchError(f"vocabulary {spec.describe()} has {size} ids, more than model {model_name}'s vocab_size "
                        f"{vocab_size}: use the model's own vocabulary")
  return spec


def _from_record(record: dict[str, Any], where: str, path_hint: str | None) -> VocabSpec:
  """A saved backbone's vocabulary: bytes, or the vocabulary file (SentencePiece model, tokenizer.json) the gin
  binding names (else the file it was saved with, if it is still there), if its content hash matches."""
  if record.get("kind") == "byte":
    return VocabSpec("byte", None, record.get("extra_ids"))
  kind = record.get("kind", "sentencepiece")
  what = "SentencePiece model" if kind == "sentencepiece" else "tokenizer.json"
  path = _bound_explicitly().get("path") or (path_hint if path_hint and fs.isfile(path_hint) else None)
  if not path:
    raise ConfigError(f"the backbone {where} was trained with a {what} (sha256 {record.get('sha256')}): set "
                      f"get_vocabulary.path to that file")
  spec = VocabSpec(kind, path, record.get("extra_ids"), record.get("eos_id"))
  if spec.record()["sha256"] != record.get("sha256"):
    raise MismatchError(f"get_vocabulary.path={path!r} (sha256 {spec.record()['sha256']}) is not the {what} the "
                        f"backbone {where} was trained with (sha256 {record.get('sha256')})")
  return spec


_active: list[VocabSpec] = []


@contextlib.contextmanager
def using(spec: VocabSpec) -> Iterator[VocabSpec]:
  """Make `spec` the vocabulary every task reads while the block runs (a run's backbone vocabulary). Nested blocks
  must agree: one process runs one backbone's vocabulary at a time."""
  if _active and _active[-1] != spec:
    raise MismatchError(f"this run already reads {_active[-1].describe()}; a nested stage asked for "
                        f"{spec.describe()}")
  _active.append(spec)
  try:
    yield spec
  finally:
    _active.pop()


def active() -> VocabSpec:
  """The vocabulary tasks read now: the run's (`using`), else the gin binding's."""
  return _active[-1] if _active else binding()


@functools.lru_cache(maxsize=1)
def run_vocabulary() -> Any:
  """`RUN_VOCABULARY`: the one `seqio.Vocabulary` every task's features hold, which is whatever `active()` is when
  it is used (see the module docstring). One instance, so a mixture's tasks have equal features; a subclass of
  `seqio.Vocabulary` (seqio checks the type) defined on first use, so importing this module imports no seqio."""
  import seqio  # pylint: disable=g-import-not-at-top

  class RunVocabulary(seqio.Vocabulary):
    """The run's vocabulary, resolved at use (moe_jax.data.vocab.RUN_VOCABULARY)."""

    def __init__(self):
      super().__init__(extra_ids=0)

    @staticmethod
    def resolved() -> Any:
      return active().build()

    @property
    def _base_vocab_size(self):
      return self.resolved()._base_vocab_size  # pylint: disable=protected-access

    vocab_size = property(lambda self: self.resolved().vocab_size)
    eos_id = property(lambda self: self.resolved().eos_id)
    pad_id = property(lambda self: self.resolved().pad_id)
    unk_id = property(lambda self: self.resolved().unk_id)
    bos_id = property(lambda self: self.resolved().bos_id)
    extra_ids = property(lambda self: self.resolved().extra_ids)

    def encode(self, s):
      return self.resolved().encode(s)

    def decode(self, ids):
      return self.resolved().decode(ids)

    def encode_tf(self, s):
      return self.resolved().encode_tf(s)

    def decode_tf(self, ids):
      return self.resolved().decode_tf(ids)

    def _encode(self, s):
      return self.resolved()._encode(s)  # pylint: disable=protected-access

    def _decode(self, ids):
      return self.resolved()._decode(ids)  # pylint: disable=protected-access

    def _encode_tf(self, s):
      return self.resolved()._encode_tf(s)  # pylint: disable=protected-access

    def _decode_tf(self, ids):
      return self.resolved()._decode_tf(ids)  # pylint: disable=protected-access

    def __repr__(self):
      return f"RunVocabulary({active().describe()})"

  return RunVocabulary()


def check_tasks(task_names: list[str], spec: VocabSpec, vocab_size: int, model_name: str) -> None:
  """Every task reads the run's vocabulary, with ids that fit the model: else one line naming both."""
  from moe_jax.data.pipeline import get_provider  # pylint: disable=g-import-not-at-top

  run = spec.build()
  for name in task_names:
    provider = get_provider(name)
    for task in getattr(provider, "tasks", [provider]):
      for feature, value in task.output_features.items():
        vocabulary = value.vocabulary
        if vocabulary is run_vocabulary() or value.rank == 0:  # a scalar feature (a task id) is not text
          continue
        if vocabulary != run or vocabulary.vocab_size > vocab_size:
          raise MismatchError(f"task {task.name!r} ({feature}) tokenises with {vocabulary!r} ({vocabulary.vocab_size} "
                              f"ids), but model {model_name} reads {spec.describe()} ({vocab_size} ids)")
