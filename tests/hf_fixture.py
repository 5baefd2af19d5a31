"""A Hugging Face T5 directory as the real-scale configs expect one (t5-xl-lm-adapt's layout at a tiny size): a
random T5.1.1-style `T5ForConditionalGeneration` saved by transformers (safetensors) and a T5-style `spiece.model`
trained with the sentencepiece package on the fixture data's text.

The SentencePiece model is T5's kind (pad 0, EOS 1, unknown 2, no BOS; seqio adds 100 sentinels after its pieces)
but keeps every fixture text exactly: no normalisation, whitespace kept as written (BIG-bench prompts end in
"\\nAnswer:") and byte fallback for any character the training text lacked, so decode(encode(x)) == x.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Sequence

SPIECE = "spiece.model"
SENTINELS = 100  # T5's extra ids, which moe_jax.data.vocab adds to a HF directory's spiece.model
PIECES = 320  # asked of the trainer (256 byte pieces + 3 specials + text pieces); it may return fewer
# The model's shapes: T5.1.1 (gated-GELU, separate unscaled LM head) at a size CPU tests train in seconds. Keys are
# T5Config fields, so a run binds them as `T5Config.<key>`.
SHAPES = {"d_model": 32, "num_heads": 4, "d_kv": 8, "d_ff": 64, "num_encoder_layers": 2, "num_decoder_layers": 2}


@dataclasses.dataclass(frozen=True)
class HFT5:
  """The written directory and what a run on it must find."""

  path: str
  spiece: str
  pieces: int  # SentencePiece pieces; the vocabulary has pieces + SENTINELS ids
  shapes: dict[str, int]  # T5Config fields, vocab_size included

  @property
  def spiece_sha(self) -> str:
    """The content hash products record for the vocabulary (moe_jax.data.vocab.VocabSpec.record)."""
    with open(self.spiece, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()[:16]

  def gin_bindings(self) -> list[str]:
    """`T5Config.<field> = <value>` for every shape, to bind over a real-scale model gin file."""
    return [f"T5Config.{k} = {v}" for k, v in self.shapes.items()]


def train_spiece(texts: Sequence[str], path: str) -> int:
  """Train the T5-style SentencePiece model on `texts` into `path`; returns its piece count."""
  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sorted(set(texts))), model_writer=model, model_type="unigram", vocab_size=PIECES,
      hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def write_hf_t5(directory: str, texts: Sequence[str], seed: int = 0) -> HFT5:
  """Write the directory: config.json + model.safetensors (transformers' `save_pretrained`) and spiece.model."""
  import torch
  import transformers

  os.makedirs(directory, exist_ok=True)
  spiece = os.path.join(directory, SPIECE)
  pieces = train_spiece(texts, spiece)
  vocab_size = -(-(pieces + SENTINELS) // 64) * 64  # rounded up, as T5's 32100 ids live in a 32128-row embedding
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=SHAPES["d_model"], num_heads=SHAPES["num_heads"], d_kv=SHAPES["d_kv"],
      d_ff=SHAPES["d_ff"], num_layers=SHAPES["num_encoder_layers"], num_decoder_layers=SHAPES["num_decoder_layers"],
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(config)
  # t5-xl-lm-adapt's head is its own tensor; transformers >= 5 would tie it to the embedding unless given one.
  model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, SHAPES["d_model"]) * SHAPES["d_model"] ** -0.5)
  model.save_pretrained(directory, safe_serialization=True)
  return HFT5(directory, spiece, pieces, {"vocab_size": vocab_size, **SHAPES})
