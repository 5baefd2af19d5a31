"""seqio data layer: the synthetic tasks, training batches (determinism, resumption) and clear errors."""

import importlib

import numpy as np
import pytest
import seqio

import tasks  # noqa: F401  (registers the synthetic tasks)
from moe_jax.data import pipeline
from moe_jax.data.vocab import get_vocabulary
from tasks import synthetic

LENGTHS = synthetic.FEATURE_LENGTHS


def test_tasks_and_mixtures_registered_idempotently():
  importlib.reload(synthetic)  # re-registration replaces, never raises "duplicate provider"
  names = set(seqio.TaskRegistry.names())
  assert set(synthetic.EXPERT_TASKS) | set(synthetic.HELDOUT_TASKS) <= names
  assert len(synthetic.EXPERT_TASKS) == len(synthetic.HELDOUT_TASKS) == 8
  for mixture, members in synthetic.MIXTURES.items():
    assert sorted(t.name for t in seqio.get_mixture_or_task(mixture).tasks) == sorted(members)


def test_examples_deterministic_and_splits_disjoint():
  first = {s: synthetic.raw_examples(s, "validation") for s in synthetic.SKILL_NAMES}
  synthetic.skill_examples.cache_clear()
  assert first == {s: synthetic.raw_examples(s, "validation") for s in synthetic.SKILL_NAMES}
  a = pipeline.eval_examples("synthetic_caesar", "test", LENGTHS, max_examples=20)
  b = pipeline.eval_examples("synthetic_caesar", "test", LENGTHS, max_examples=20)
  assert [e["inputs_pretokenized"] for e in a] == [e["inputs_pretokenized"] for e in b]
  for skill in synthetic.SKILL_NAMES:
    keys = {sp: {tuple(sorted(f.items())) for f, _, _ in synthetic.raw_examples(skill, sp)}
            for sp in synthetic.SPLIT_SIZES}
    assert [len(k) for k in keys.values()] == list(synthetic.SPLIT_SIZES.values())
    assert not (keys["train"] & keys["validation"] or keys["train"] & keys["test"] or keys["validation"] & keys["test"])


def test_answer_choices_and_lengths():
  """Every example: NUM_CHOICES distinct choices, the target among them once; FEATURE_LENGTHS truncate nothing."""
  positions = []
  for skill in synthetic.SKILLS:
    for split in synthetic.SPLIT_SIZES:
      for fields, target, choices in synthetic.raw_examples(skill.name, split):
        assert len(set(choices)) == len(choices) == synthetic.NUM_CHOICES and choices.count(target) == 1
        assert all(choices)
        positions.append(choices.index(target))
        longest = max(len(t.format(**fields).encode()) for t in skill.heldin + skill.heldout)
        assert longest + 1 <= LENGTHS["inputs"] and max(len(c) for c in choices) + 1 <= LENGTHS["targets"]
  assert min(np.bincount(positions)) > 0.2 * len(positions)  # the correct answer is not always first


def test_heldin_and_heldout_templates_differ():
  heldin = pipeline.eval_examples("synthetic_add", "validation", LENGTHS, max_examples=12)
  heldout = pipeline.eval_examples("synthetic_add_heldout", "validation", LENGTHS, max_examples=12)
  assert [e["targets_pretokenized"] for e in heldin] == [e["targets_pretokenized"] for e in heldout]
  assert not {e["inputs_pretokenized"] for e in heldin} & {e["inputs_pretokenized"] for e in heldout}
  for skill in synthetic.SKILLS:
    assert not set(skill.heldin) & set(skill.heldout) and len(skill.heldin) >= 2 and len(skill.heldout) >= 2
  ex = heldin[0]
  vocab = get_vocabulary()
  assert vocab.decode(ex["inputs"].tolist()) == ex["inputs_pretokenized"] and ex["inputs"][-1] == 1
  assert [c[-1] for c in ex["answer_choice_tokens"]] == [1] * synthetic.NUM_CHOICES
  assert ex["answer_choice_tokens"][ex["answer_choices"].index(ex["targets_pretokenized"])].tolist() == \
      ex["targets"].tolist()


def test_train_batches_keys_shapes_and_resume():
  batches = pipeline.train_batches("synthetic_heldin", LENGTHS, batch_size=4, seed=7)
  first = [next(batches) for _ in range(5)]
  keys = {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"}
  assert set(first[0]) == keys
  for key, value in first[0].items():
    length = LENGTHS["inputs"] if key.startswith("encoder") else LENGTHS["targets"]
    assert value.shape == (4, length) and value.dtype == np.int32, key
  b = first[0]
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:], b["decoder_target_tokens"][:, :-1])
  assert (b["decoder_input_tokens"][:, 0] == 0).all()
  np.testing.assert_array_equal(b["decoder_loss_weights"], b["decoder_target_tokens"] > 0)

  resumed = pipeline.train_batches("synthetic_heldin", LENGTHS, batch_size=4, seed=7, start_batch=3)
  for expected in first[3:]:
    got = next(resumed)
    for key in keys:
      np.testing.assert_array_equal(got[key], expected[key])
  other = next(pipeline.train_batches("synthetic_heldin", LENGTHS, batch_size=4, seed=8))
  assert not np.array_equal(other["encoder_input_tokens"], b["encoder_input_tokens"])


def test_train_batches_packing_and_shards():
  packed = next(pipeline.train_batches("synthetic_reverse", LENGTHS, batch_size=2, pack=True))
  assert {"encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions"} <= set(packed)
  assert packed["encoder_segment_ids"].max() > 1  # short examples do get packed together
  shards = [next(pipeline.train_batches("synthetic_reverse", LENGTHS, 8, shard_index=i, num_shards=2))
            for i in range(2)]
  rows = [{tuple(r) for r in s["encoder_input_tokens"]} for s in shards]
  assert not rows[0] & rows[1]
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.train_batches("synthetic_reverse", LENGTHS, 8, shard_index=2, num_shards=2)


def test_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"synthetic_reverse.*import tasks"):
    pipeline.train_batches("synthetic_revers", LENGTHS, 4)
  with pytest.raises(ValueError, match="Mixture"):
    pipeline.eval_examples("synthetic_heldout")
  missing_dir = str(tmp_path / "no_such_dir")
  monkeypatch.setenv("MOE_JAX_DATA_DIR", missing_dir)
  with pytest.raises(FileNotFoundError, match=missing_dir):
    pipeline.train_batches("synthetic_reverse", LENGTHS, 4)
  missing_model = str(tmp_path / "spm.model")
  with pytest.raises(FileNotFoundError, match=missing_model):
    get_vocabulary("sentencepiece", missing_model)
  assert get_vocabulary().vocab_size == 259
