"""A TeacherLM student fine-tuned from a Hugging Face causal LM reads the checkpoint's own BPE tokenizer.json (the
seed's BLOOMZ student): training batches hold the ids transformers' tokenizer gives (the reference), the run
records that vocabulary, and evaluation reads the student with it; a LoRA student's epochs are folded products. A
tiny BLOOM and a byte-level BPE trained here, no network."""

from __future__ import annotations

import json

import flax
import gin
import jax
import jax.numpy as jnp
import pytest
import tokenizers
import transformers

from moe_jax import gin_utils
from moe_jax.checkpoints.hf_causal import config_from_hf_causal, load_hf_causal_lm
from moe_jax.data import pipeline, vocab
from moe_jax.errors import ConfigError
from moe_jax.models.causal import CAUSAL_LM_MODULES, CausalLM
from moe_jax.models.config import ExpertConfig
from moe_jax.models.routers import Uniform
from moe_jax.teacher import evaluate as ev
from moe_jax.teacher import formats, student
from moe_jax.teacher.lm import load_lm
from moe_jax.training import checkpointing as ckpt

TEXTS = ["Q: Is a lime green? (A) Yes (B) No A: The answer is (A). Let's think step by step. A lime is green.",
         "Q: Is a cherry yellow? (A) Yes (B) No A: The answer is (B). Let's think step by step. A cherry is red.",
         "Q: Is corn yellow? (A) Yes (B) No A: The answer is (A). Let's think step by step. Corn is yellow."]


@pytest.fixture(scope="module")
def hf_student(tmp_path_factory):
  """A HF BLOOM directory with a byte-level BPE tokenizer.json whose EOS is `</s>`."""
  path = tmp_path_factory.mktemp("hf_bloom")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(TEXTS * 4, trainer)
  tokenizer.save(str(path / "tokenizer.json"))
  eos = tokenizer.token_to_id("</s>")
  config = transformers.BloomConfig(vocab_size=tokenizer.get_vocab_size() + 8, hidden_size=32, n_layer=2, n_head=4,
                                    eos_token_id=eos, bos_token_id=1, pad_token_id=3)
  transformers.BloomForCausalLM(config).save_pretrained(path, safe_serialization=True)
  return str(path), eos


def test_vocabulary_is_the_tokenizer_transformers_reads(hf_student):
  path, eos = hf_student
  spec = vocab.hf_vocabulary(path)
  assert (spec.kind, spec.eos_id) == ("tokenizer", eos)
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json")
  built = spec.build()
  for text in TEXTS + ["héllo wörld, unseen"]:
    want = reference(text, add_special_tokens=False)["input_ids"]
    assert list(built.encode_tf(text).numpy()) == want == built.encode(text)
    assert built.decode(want) == reference.decode(want)
  assert built.vocab_size == spec.size == len(reference)


def _train(hf_dir: str, run: str, learning_rate: float, **kwargs):
  """(config, products) of a student trained from `hf_dir` on TEXTS' cot_tail in batches of 4."""
  gin.clear_config()
  gin_utils.configure(["teacherlm_student.gin"], ["train.feature_lengths = {'inputs': 0, 'targets': 64}",
                                                  f"make_optimizer.learning_rate = {learning_rate}"])
  config = config_from_hf_causal(hf_dir, dtype="float32")
  data = f"{run}.jsonl"
  with open(data, "w") as f:
    f.writelines(json.dumps({"cot_tail": t}) + "\n" for t in TEXTS)
  return config, student.train_student(data, run, init_from=hf_dir, model_config=config, batch_size=4,
                                       gin_config_str=gin.config_str(), **kwargs)


def test_student_from_hf_trains_on_its_ids_and_evaluates_with_them(hf_student, tmp_path):
  path, eos = hf_student
  config, products = _train(path, str(tmp_path / "run"), 1e-3, epochs=1)

  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json")
  with vocab.using(vocab.hf_vocabulary(path)):
    batch = next(pipeline.train_batches("teacherlm_student", {"inputs": 0, "targets": 64}, 4, decoder_only=True))
  rows = {tuple(t[w > 0]) for t, w in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]) if w.any()}
  assert rows == {tuple(reference(t, add_special_tokens=False)["input_ids"] + [eos]) for t in TEXTS}

  _, _, _, codec = load_lm(products[0], config)
  assert codec.prefix == (0,) and codec.eos_id == eos  # the causal format it was trained in
  assert codec.encode(TEXTS[0]) == reference(TEXTS[0], add_special_tokens=False)["input_ids"]
  eval_file = tmp_path / "eval.jsonl"
  eval_file.write_text(formats.to_jsonl(formats.prepare_rows(
      [{"question": "Is a lime green?", "answer": True}, {"question": "Is corn red?", "answer": False}],
      "strategyqa")))
  results = ev.evaluate_students(str(tmp_path / "run"), {"eval": str(eval_file)}, model_config=config)
  assert list(results) == [1] and 0.0 <= results[1]["eval"] <= 100.0
  gin.clear_config()


def test_a_tokenizer_without_eos_is_one_line(tmp_path):
  tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
  with pytest.raises(ConfigError, match="names no EOS token"):
    vocab.hf_vocabulary(str(tmp_path))
  assert vocab.hf_vocabulary(str(tmp_path / "missing")) is None


def test_lora_student_folds_each_epoch_into_its_product(hf_student, tmp_path):
  """A LoRA student (the frozen HF weights + one trained LoRA) saves each epoch with the LoRA folded into the
  kernels: the folded model's logits are the LoRA model's (routed path, float32), and nothing but the LoRA
  modules' kernels moved."""
  path, _ = hf_student
  run = tmp_path / "run"
  config, products = _train(path, str(run), 1e-2, epochs=2, lora=ExpertConfig(rank=4, modules=CAUSAL_LM_MODULES))
  gin.clear_config()
  base = flax.traverse_util.flatten_dict(jax.device_get(load_hf_causal_lm(path, config)[1]))
  tokens = jnp.asarray([[0] + vocab.hf_vocabulary(path).build().encode(TEXTS[1])])
  mask = jnp.ones_like(tokens)
  for epoch, product in enumerate(products, 1):
    folded = jax.device_get(load_lm(product, config).params)
    expert, _ = ckpt.load_experts(ckpt.expert_file(str(run / f"epoch_{epoch}")), config)
    routed = CausalLM(config, ExpertConfig(num_experts=1, rank=4, modules=CAUSAL_LM_MODULES, router=Uniform()))
    merged = flax.traverse_util.unflatten_dict({**base, **flax.traverse_util.flatten_dict(expert)})
    want = routed.apply({"params": merged}, tokens, mask)
    got = CausalLM(config).apply({"params": folded}, tokens, mask)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-5
    moved = {"/".join(k) for k, v in flax.traverse_util.flatten_dict(folded).items() if not (v == base[k]).all()}
    assert moved and all(k.endswith("kernel") and ("attention/" in k or "mlp/" in k) for k in moved), moved
