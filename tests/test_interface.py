"""The model interface on a decoder-only model: choice scores and greedy generation, batched and padded, equal a
direct computation on each unpadded sequence alone (the training format: start token, input, target)."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from moe_jax.evaluation.scoring import choice_log_likelihoods, greedy_generate
from moe_jax.models import CausalLMConfig, ExpertConfig, Phatgoose, build_model, interface

CONFIG = CausalLMConfig(family="llama", vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, d_ff=64, dtype="float32", name="tiny_interface")


@pytest.fixture(scope="module")
def model_and_params():
  model = build_model(CONFIG, ExpertConfig(num_experts=3, rank=4, router=Phatgoose(k=2)))
  tokens = np.ones((1, 4), np.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens, routing_ids=np.zeros(1, np.int32)))
  params = jax.tree_util.tree_map_with_path(  # non-zero B and routers, so the experts matter
      lambda path, x: np.random.default_rng(len(path)).normal(0, 0.3, x.shape).astype(np.float32)
      if path[-1].key in ("lora_b", "router") else x, params["params"])
  return model, params


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)


def test_choice_scores_are_the_continuation_log_likelihoods(model_and_params):
  model, params = model_and_params
  inputs = [np.array([5, 6, 7, 1]), np.array([9, 1])]
  choices = [[np.array([11, 1]), np.array([12, 13, 1])], [np.array([3, 1])]]
  scores, lengths = choice_log_likelihoods(model, params, _pad(inputs, 6), choices, batch_size=2)
  for i, (x, options) in enumerate(zip(inputs, choices)):
    for j, choice in enumerate(options):
      sequence = np.concatenate([[0], x, choice])[None].astype(np.int32)
      logp = _log_softmax(model.apply({"params": params}, sequence[:, :-1], np.ones_like(sequence[:, :-1]))[0])
      expected = sum(logp[len(x) + t, choice[t]] for t in range(len(choice)))
      np.testing.assert_allclose(scores[i, j], expected, rtol=1e-5)
      assert lengths[i, j] == len(choice)
  assert scores[1, 1] == -np.inf and lengths[1, 1] == 0  # the second example has one choice


def test_greedy_generation_continues_the_input_as_an_uncached_loop_would(model_and_params):
  model, params = model_and_params
  inputs = [np.array([5, 6, 7, 1]), np.array([9, 1]), np.array([2, 3, 4, 8, 10, 1])]
  generated = greedy_generate(model, params, _pad(inputs, 6), max_length=5, batch_size=2)
  for x, row in zip(inputs, generated):
    sequence = list(np.concatenate([[0], x]))
    expected = []
    for _ in range(5):
      logits = model.apply({"params": params}, np.array([sequence], np.int32), np.ones((1, len(sequence)), np.int32))
      token = int(np.argmax(logits[0, -1]))
      expected.append(token)
      sequence.append(token)
      if token == 1:
        break
    assert row.tolist() == expected + [0] * (5 - len(expected))


def test_the_config_decides_the_family():
  from moe_jax.errors import ConfigError
  from moe_jax.models import CausalLM, T5Config, Transformer

  assert isinstance(build_model(CONFIG), CausalLM) and interface.is_decoder_only(build_model(CONFIG))
  assert isinstance(build_model(T5Config()), Transformer) and not interface.is_decoder_only(T5Config())
  with pytest.raises(ConfigError, match="expected a T5Config or a CausalLMConfig"):
    build_model({"d_model": 8})


def _pad(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out
