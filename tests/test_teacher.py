"""TeacherLM's prepare and enhance steps: the seed's prompt formats, and enhancement that is independent of batch
size and survives a kill -9 with byte-identical output."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models.causal import CausalLMConfig
from moe_jax.teacher import enhance as en
from moe_jax.teacher import formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(name="tiny_teacher", vocab_size=264, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            d_ff=64, dtype="float32")
# A fixed enhance setting: short generations, 3 rows per chunk, room for the short prompts only.
SETTINGS = dict(chunk_size=3, max_prompt_length=176, max_new_tokens=12, temperature=1.0, seed=7)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.write(formats.to_jsonl(rows))
  return str(path)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_creak_fields_match_the_seed():
  row = next(formats.prepare_rows([{"sentence": "Paris is  in France.", "label": "true"}], "creak"))
  base = ("Q: Determine the correctness of the following sentence. Paris is in France. (A) True (B) False "
          "A: The answer is (A).")
  assert row["base"] == base
  assert row["cot"] == base + " Let's think step by step."
  assert row["error"] == base + " The common mistakes are:"
  assert row["fundamental"] == base + " The fundamental of this question is:"
  assert (row["options"], row["answer_index"]) == (["True", "False"], 0)


@pytest.mark.parametrize("kind, raw, options, answer", [
    ("ecqa", {"q_text": "Where?", "q_op1": "a", "q_op2": "b", "q_op3": "c", "q_op4": "d", "q_op5": "e",
              "q_ans": "c"}, ["a", "b", "c", "d", "e"], 2),
    ("strategyqa", {"question": "Can fish fly?", "answer": False}, ["Yes", "No"], 1),
    ("mmlu", {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}, ["3", "4", "5", "6"], 1),
    ("mmlu", {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"}, ["3", "4", "5", "6"], 1),
    ("custom", {"question": "Pick", "options": ["x", "y", "z"], "answer": "z"}, ["x", "y", "z"], 2),
])
def test_other_formats(kind, raw, options, answer):
  row = next(formats.prepare_rows([raw], kind))
  assert (row["options"], row["answer_index"]) == (options, answer)
  listed = " ".join(f"({letter}) {o}" for letter, o in zip("ABCDE", options))
  assert row["base"] == f"Q: {raw.get('question', raw.get('q_text'))} {listed} A: The answer is ({'ABCDE'[answer]})."


def test_registering_a_format_is_one_function():
  @formats.register_format("pairs_test")
  def _pairs(row):
    return row["q"], [row["good"], row["bad"]], 0

  row = next(formats.prepare_rows([{"q": "Best?", "good": "this", "bad": "that"}], "pairs_test"))
  assert row["base"] == "Q: Best? (A) this (B) that A: The answer is (A)."


def test_errors_are_one_line(tmp_path):
  with pytest.raises(ConfigError, match="creak row 1: missing field 'label'"):
    list(formats.prepare_rows([{"sentence": "a", "label": 1}, {"sentence": "b"}], "creak"))
  with pytest.raises(ConfigError, match="expected one of"):
    list(formats.prepare_rows([], "nope"))
  with pytest.raises(MissingFileError):
    formats.read_rows(str(tmp_path / "missing.jsonl"))
  data = _write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "a"}])
  run = subprocess.run([sys.executable, "-m", "moe_jax.teacher", "prepare", "--dataset", data, "--kind", "creak",
                        "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and "missing field 'label'" in run.stderr


def test_prepare_reads_a_saved_hf_dataset(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_list([{"question": "Q?", "answer": True}]).save_to_disk(str(tmp_path / "ds"))
  assert formats.prepare(str(tmp_path / "ds"), "strategyqa", str(tmp_path / "p.jsonl")) == 1
  assert _read_jsonl(tmp_path / "p.jsonl")[0]["answer_index"] == 0


def _prepared(tmp_path, n=8):
  raw = [{"sentence": f"Claim {i}" + ("!" * 60 if i == 5 else ""), "label": i % 2 == 0} for i in range(n)]
  data = _write_jsonl(tmp_path / "creak.jsonl", raw)
  out = str(tmp_path / "prepared.jsonl")
  formats.prepare(data, "creak", out)
  return out


KILL_SCRIPT = """
import os, signal, sys
from moe_jax.models.causal import CausalLMConfig
from moe_jax.teacher import enhance as en
write = en.fs.write_text
def write_then_die(path, text):
  write(path, text)
  if path.endswith("part-00001.jsonl"):  # the second chunk is on disk: die as kill -9 would
    open(path.replace("part-00001.jsonl", "part-00002.jsonl.tmp-1"), "w").write("half a chu")
    os.kill(os.getpid(), signal.SIGKILL)
en.fs.write_text = write_then_die
en.enhance(sys.argv[1], sys.argv[2], model_config=CausalLMConfig(**{tiny}), batch_size=2, **{settings})
"""


def test_enhance_resumes_after_kill_9_byte_for_byte_and_ignores_batch_size(tmp_path):
  prepared = _prepared(tmp_path)
  config = CausalLMConfig(**TINY)
  whole = str(tmp_path / "whole.jsonl")
  en.enhance(prepared, whole, model_config=config, batch_size=4, **SETTINGS)
  rows = _read_jsonl(whole)
  assert len(rows) == 8 and [r["question"] for r in rows] == [r["question"] for r in _read_jsonl(prepared)]
  assert rows[5]["enhance_error"].startswith("prompt has") and rows[5]["cot"] is None
  for row in rows[:5] + rows[6:]:
    assert row["all"] == formats.TRIGGERS["cot"].join([row["base"], row["cot"]])
    assert row["cot_tail"] == formats.collapse_spaces(row["all"])

  killed = str(tmp_path / "killed.jsonl")
  script = KILL_SCRIPT.replace("{tiny}", repr(TINY)).replace("{settings}", repr(SETTINGS))
  run = subprocess.run([sys.executable, "-c", script, prepared, killed], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == -9, run.stderr[-2000:]
  parts = sorted(os.listdir(killed + en.PARTS_SUFFIX))
  assert "part-00001.jsonl" in parts and "part-00002.jsonl" not in parts and not os.path.exists(killed)
  en.enhance(prepared, killed, model_config=config, batch_size=3, **SETTINGS)  # resume, another batch size
  with open(whole, "rb") as a, open(killed, "rb") as b:
    assert a.read() == b.read()

  with pytest.raises(MismatchError, match="seed"):
    en.enhance(prepared, whole, model_config=config, batch_size=4, **{**SETTINGS, "seed": 8})
  with pytest.raises(ConfigError, match="no text field 'nope'"):
    en.enhance(prepared, whole, model_config=config, field="nope", **SETTINGS)


def test_a_row_the_tokenizer_cannot_read_is_kept_with_its_error(tmp_path, monkeypatch):
  """The codec fails on one row's prompt and on another row's generation: both rows stay in place with their
  errors, every other row is enhanced as without the failures."""
  prepared = _prepared(tmp_path, n=4)
  config = CausalLMConfig(**TINY)
  clean = str(tmp_path / "clean.jsonl")
  en.enhance(prepared, clean, model_config=config, batch_size=2, **SETTINGS)
  real = en.load_lm

  def flaky(*args, **kwargs):
    loaded = real(*args, **kwargs)
    def encode(text):
      if "Claim 1" in text:
        raise UnicodeError("unreadable")
      return loaded.codec.encode(text)
    decoded = []
    def decode(ids):
      decoded.append(ids)
      if len(decoded) == 3:  # the first call for the second generated row (two decodes per row)
        raise ValueError("id out of range")
      return loaded.codec.decode(ids)
    return loaded._replace(codec=dataclasses.replace(loaded.codec, encode=encode, decode=decode))

  monkeypatch.setattr(en, "load_lm", flaky)
  out = str(tmp_path / "flaky.jsonl")
  en.enhance(prepared, out, model_config=config, batch_size=2, **SETTINGS)
  rows, want = _read_jsonl(out), _read_jsonl(clean)
  assert len(rows) == 4 and rows[1]["enhance_error"] == "encoding the prompt failed: UnicodeError: unreadable"
  assert rows[2]["enhance_error"] == "decoding the generation failed: ValueError: id out of range"
  assert rows[1]["cot"] is None and rows[2]["all"] is None
  assert [rows[0], rows[3]] == [want[0], want[3]]


def test_hf_directory_codec_uses_its_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from moe_jax.data import vocab
  from moe_jax.teacher import text

  words = {"<unk>": 0, "</s>": 1, "Q:": 2, "cats": 3, "purr": 4}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens(["</s>"])
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
  codec = text.codec_for(str(tmp_path), vocab.VocabSpec("byte"))
  assert (codec.prefix, codec.eos_id) == ((), 1)
  assert codec.encode("Q: cats purr") == [2, 3, 4] and codec.decode([2, 3, 4, 1]) == "Q: cats purr"
  byte = text.codec_for(None, vocab.VocabSpec("byte"))
  assert byte.prefix == (0,) and byte.decode(byte.encode("héllo")) == "héllo"
