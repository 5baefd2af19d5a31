"""A T5 teacher (a Hugging Face T5 directory, as the model interface loads it) enhances rows: its encoder reads the
prompt (ending in EOS) and its greedy continuation is what transformers' `generate` gives on the same ids (the
independent reference); batching does not change it."""

from __future__ import annotations

import json

import sentencepiece
import torch
import transformers

from moe_jax.checkpoints.hf import config_from_hf
from moe_jax.teacher import enhance as en
from moe_jax.teacher import formats

NEW_TOKENS = 8


def test_t5_teacher_continues_like_transformers(hf_t5, tmp_path):
  prepared = tmp_path / "prepared.jsonl"
  prepared.write_text(formats.to_jsonl(formats.prepare_rows(
      [{"sentence": s, "label": i % 2 == 0} for i, s in enumerate(["Cats purr.", "Ice is hot.", "Owls hoot."])],
      "creak")))
  config = config_from_hf(hf_t5.path, dtype="float32")
  outputs = {}
  for batch_size in (1, 2):
    out = tmp_path / f"enhanced_{batch_size}.jsonl"
    en.enhance(str(prepared), str(out), teacher=hf_t5.path, model_config=config, batch_size=batch_size,
               chunk_size=2, max_prompt_length=192, max_new_tokens=NEW_TOKENS, temperature=0.0)
    outputs[batch_size] = out.read_bytes()
  assert outputs[1] == outputs[2]

  assert sum(len(json.loads(line)["cot"]) > 0 for line in outputs[1].splitlines()) >= 2
  processor = sentencepiece.SentencePieceProcessor(model_file=hf_t5.spiece)
  reference = transformers.T5ForConditionalGeneration.from_pretrained(hf_t5.path).eval()
  for line in outputs[1].splitlines():
    row = json.loads(line)
    ids = processor.encode(row["base"] + formats.TRIGGERS["cot"]) + [1]
    with torch.no_grad():
      generated = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
    new = [int(t) for t in generated[0, 1:]]  # after the decoder start token
    new = new[:new.index(1)] if 1 in new else new
    pieces = [t for t in new if t < processor.get_piece_size()]  # a random model also emits seqio's sentinel ids
    assert row["cot"] == processor.decode(pieces)
    assert row["all"] == processor.decode(ids[:-1] + pieces) and row["all"].startswith(row["base"])
