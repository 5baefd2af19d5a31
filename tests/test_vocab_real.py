"""The vocabulary belongs to the backbone: with a Hugging Face T5 directory as the backbone of either real-scale
config, every expert and evaluation task of its pool tokenises with that directory's spiece.model (ids checked
against the sentencepiece library itself), and a task or binding that does not fit the model stops with one line
naming both."""

import gin
import numpy as np
import pytest
import seqio
import sentencepiece as spm

import moe_jax.train  # noqa: F401  (registers `job`, as the CLI does)
from moe_jax import gin_utils
from moe_jax.data import pipeline, vocab
from moe_jax.errors import MismatchError
from moe_jax.models import T5Config, Transformer
from moe_jax.training import partitioning as part
from moe_jax.training.backbone import load_backbone
from tasks import bigbench, flan, p3

# config file -> (its expert pool, its evaluation suite), as the config binds them
CONFIGS = {
    "phatgoose_p3_t5xl.gin": (p3.EXPERT_TASKS, p3.HELDOUT_TASKS),
    "phatgoose_flan_t5xl.gin": (flan.FLAN_POOL, tuple(f"bbh_{t.name}" for t in bigbench.BBH)),
}


def _value(name):
  value = gin.query_parameter(name)
  while isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value


def _configure(config_file, pool_data, hf_t5, *extra):
  """The config as the CLI resolves it on the fixtures: data root, backbone and the fixture's shapes bound."""
  gin.clear_config()
  gin_utils.configure([config_file], [f"DATA_DIR = '{pool_data.root}'", f"BACKBONE = '{hf_t5.path}'",
                                      *hf_t5.gin_bindings(), *extra])


def _backbone(config):
  mesh, rules = part.make_mesh(), part.axis_rules()
  return load_backbone(_value("phatgoose_pipeline.init_from"), config,
                       part.logical_shardings(part.abstract_params(Transformer(config)), mesh, rules))


@pytest.mark.parametrize("config_file", sorted(CONFIGS))
def test_every_pool_task_tokenises_with_the_checkpoint_spiece(config_file, pool_data, hf_t5):
  _configure(config_file, pool_data, hf_t5)
  try:
    pool, suite = CONFIGS[config_file]
    assert tuple(_value("phatgoose_pipeline.expert_tasks")) == pool
    assert tuple(_value("phatgoose_pipeline.eval_tasks")) == suite
    config = T5Config()
    backbone = _backbone(config)
    assert backbone.vocabulary == vocab.VocabSpec("sentencepiece", hf_t5.spiece, vocab.T5_EXTRA_IDS)
    assert backbone.record()["vocabulary"] == {"kind": "sentencepiece", "extra_ids": 100, "sha256": hf_t5.spiece_sha}
    sp = spm.SentencePieceProcessor(model_file=hf_t5.spiece)
    with vocab.using(backbone.vocabulary):
      for split, names in (("train", pool), (_value("phatgoose_pipeline.eval_split"), suite)):
        tasks = pipeline.expand_tasks(names)
        vocab.check_tasks(tasks, backbone.vocabulary, config.vocab_size, config.name)
        for name in tasks:
          features = seqio.get_mixture_or_task(name).output_features
          for feature in features.values():
            assert feature.vocabulary.vocab_size == hf_t5.pieces + 100, name
          (example,) = pipeline.eval_examples(name, split, max_examples=1)
          text = example["inputs_pretokenized"]
          assert text.removesuffix(bigbench.SUFFIX) in pool_data.texts, (name, text)
          for key in ("inputs", "targets"):
            np.testing.assert_array_equal(example[key], sp.encode(example[f"{key}_pretokenized"]) + [1],
                                          err_msg=name)
            assert features[key].vocabulary.decode(example[key].tolist()) == example[f"{key}_pretokenized"]
          for choice, tokens in zip(example.get("answer_choices", ()), example.get("answer_choice_tokens", ())):
            assert tokens.tolist() == sp.encode(choice) + [1], name
  finally:
    gin.clear_config()


def _one_line_naming(error, *names):
  message = str(error.value)
  assert "\n" not in message and all(n in message for n in names), message


def test_a_vocabulary_that_does_not_fit_the_model_stops_naming_both(pool_data, hf_t5):
  spec = vocab.hf_vocabulary(hf_t5.path)
  ids = hf_t5.pieces + 100
  # More ids than the model has embeddings for.
  with pytest.raises(MismatchError) as error:
    vocab.for_backbone(spec, hf_t5.path, ids - 1, "small_model")
  _one_line_naming(error, hf_t5.spiece, f"{ids} ids", "small_model", str(ids - 1))
  # A binding for bytes with a SentencePiece checkpoint, the P3 config's model gin file rebound.
  _configure("phatgoose_p3_t5xl.gin", pool_data, hf_t5, "get_vocabulary.kind = 'byte'")
  try:
    with pytest.raises(MismatchError) as error:
      _backbone(T5Config())
    _one_line_naming(error, "byte", hf_t5.path, hf_t5.spiece)
  finally:
    gin.clear_config()
  # Tasks that captured a vocabulary of their own: bytes, and the checkpoint's pieces with more sentinels than the
  # model has room for.
  for name, own in (("fixture_bytes", seqio.ByteVocabulary()),
                    ("fixture_more_ids", seqio.SentencePieceVocabulary(hf_t5.spiece, extra_ids=400))):
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=["train"]),
                           output_features={k: seqio.Feature(own) for k in ("inputs", "targets")})
    try:
      with pytest.raises(MismatchError) as error:
        vocab.check_tasks(["synthetic_reverse", name], spec, hf_t5.shapes["vocab_size"], "t5_xl_lm_adapt")
      _one_line_naming(error, name, f"{own.vocab_size} ids", hf_t5.spiece, "t5_xl_lm_adapt")
    finally:
      seqio.TaskRegistry.remove(name)
