"""T5 model layer: configs, attention kernels, logical axes, remat, dropout."""

import dataclasses
import glob
import os

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import ExpertConfig, T5Config, Transformer
from moe_jax.models.attention import attention, xla_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = T5Config(vocab_size=50, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=3,
                dtype="float32")


def _tokens(rng, batch, length, vocab, pad_from=None):
  toks = rng.integers(1, vocab, size=(batch, length))
  if pad_from is not None:
    toks[0, pad_from:] = 0
  return jnp.asarray(toks, jnp.int32)


def _shape_tree(cfg, experts=None):
  model = Transformer(cfg, experts)
  toks = jnp.ones((1, 4), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), toks, toks)["params"]


def _parse_model_gin(path):
  gin.clear_config()
  gin.add_config_file_search_path(os.path.join(REPO, "gin"))
  gin.parse_config_file(path)
  try:
    return T5Config()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin"))))
def test_gin_model_configs_match_transformers_parameter_count(path):
  """Every model gin file gives a model with the parameter count transformers reports for the same shapes."""
  import torch
  import transformers

  cfg = _parse_model_gin(path)
  ours = sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(
      _shape_tree(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  hf_cfg = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
      num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
      feed_forward_proj=cfg.feed_forward, tie_word_embeddings=cfg.tie_word_embeddings,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets)
  with torch.device("meta"):
    hf = transformers.T5ForConditionalGeneration(hf_cfg)
  # transformers 5 always ties lm_head to the shared embedding (the untied flag became `scale_decoder_outputs`), so
  # an untied T5.1.1 head is one more vocab x d_model matrix than it counts.
  untied_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.d_model
  assert ours == hf.num_parameters() + untied_head


def test_published_sizes():
  """T5.1.1 XL has ~2.85B parameters and XXL ~11.1B (published model cards)."""
  xl = _parse_model_gin(os.path.join(REPO, "gin", "models", "t5_xl_lm_adapt.gin"))
  count = sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(
      _shape_tree(xl), is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  assert 2.84e9 < count < 2.86e9


def test_every_parameter_has_logical_axes():
  tree = _shape_tree(TINY, ExpertConfig(num_experts=3, rank=2))
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  allowed = {"embed", "mlp", "heads", "kv", "joined_kv", "vocab", "expert", "lora_rank", "relpos_buckets"}
  for name, leaf in flat.items():
    assert isinstance(leaf, nn.Partitioned), name
    assert len(leaf.names) == len(leaf.value.shape), name
    assert set(leaf.names) <= allowed, (name, leaf.names)
  assert flat["encoder/layers_0/attention/query/kernel"].names == ("embed", "joined_kv")
  assert flat["decoder/layers_2/mlp/wo/lora_b"].names == ("expert", "lora_rank", "embed")
  assert flat["decoder/logits_dense/kernel"].names == ("embed", "vocab")


def _bias_and_mask(rng, batch, heads, qlen, klen):
  bias = jnp.asarray(rng.normal(size=(1, heads, qlen, klen)), jnp.float32)
  mask = np.ones((batch, klen), bool)
  mask[0, klen - 3:] = False
  return bias, jnp.asarray(mask)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_matches_jax_reference(causal):
  """Our attention equals jax.nn.dot_product_attention (scale=1, additive bias, padding + causal masks)."""
  rng = np.random.default_rng(0)
  b, t, h, d = 2, 9, 3, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  bias, mask = _bias_and_mask(rng, b, h, t, t)
  ours = attention(q, k, v, bias, mask, causal, impl="auto")
  full = mask[:, None, None, :]
  if causal:
    full = full & jnp.tril(jnp.ones((t, t), bool))
  ref = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=full, scale=1.0, implementation="xla")
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_random_and_unbiased():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32) for _ in range(3))
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  outs = jax.vmap(lambda key: xla_attention(q, k, v, None, None, False, 0.5, key))(keys)
  assert not np.allclose(outs[0], outs[1])
  np.testing.assert_allclose(outs.mean(0), xla_attention(q, k, v, None, None, False), atol=0.1)


def test_padding_does_not_change_real_positions():
  """Encoder outputs at real positions ignore what stands in padded positions."""
  rng = np.random.default_rng(2)
  model = Transformer(TINY)
  toks = _tokens(rng, 2, 12, TINY.vocab_size)
  params = model.init(jax.random.PRNGKey(0), toks, toks[:, :5])
  short = toks.at[:, 8:].set(0)
  encode = jax.jit(lambda p, t: model.apply(p, t, method="encode"))
  enc_short = encode(params, short)
  enc_long = encode(params, jnp.concatenate([short, jnp.zeros((2, 6), jnp.int32)], 1))
  np.testing.assert_allclose(enc_short[:, :8], enc_long[:, :8], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal():
  rng = np.random.default_rng(3)
  model = Transformer(TINY)
  enc, dec = _tokens(rng, 2, 7, TINY.vocab_size), _tokens(rng, 2, 6, TINY.vocab_size)
  params = model.init(jax.random.PRNGKey(0), enc, dec)
  changed = dec.at[:, 4:].set(3)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(params, enc, dec)[:, :4], apply(params, enc, changed)[:, :4],
                             rtol=1e-5, atol=1e-5)


def test_remat_and_bf16_compute():
  rng = np.random.default_rng(4)
  enc, dec = _tokens(rng, 2, 7, TINY.vocab_size), _tokens(rng, 2, 5, TINY.vocab_size)
  experts = ExpertConfig(num_experts=2, rank=2)
  params = Transformer(TINY, experts).init(jax.random.PRNGKey(0), enc, dec)

  def loss(cfg, p):
    return jnp.mean(Transformer(cfg, experts).apply(p, enc, dec) ** 2)

  g_plain = jax.jit(jax.grad(lambda p: loss(TINY, p)))(params)
  g_remat = jax.jit(jax.grad(lambda p: loss(dataclasses.replace(TINY, remat=True), p)))(params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  bf16 = jax.jit(Transformer(dataclasses.replace(TINY, dtype="bfloat16"), experts).apply)(params, enc, dec)
  f32 = jax.jit(Transformer(TINY, experts).apply)(params, enc, dec)
  assert bf16.dtype == jnp.float32 and f32.dtype == jnp.float32
  assert jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32) < 3e-2
  assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_dropout_only_in_training():
  rng = np.random.default_rng(5)
  cfg = dataclasses.replace(TINY, dropout_rate=0.3)
  enc, dec = _tokens(rng, 2, 7, cfg.vocab_size), _tokens(rng, 2, 5, cfg.vocab_size)
  model = Transformer(cfg)
  params = model.init(jax.random.PRNGKey(0), enc, dec)
  apply = jax.jit(model.apply, static_argnames="deterministic")
  np.testing.assert_array_equal(apply(params, enc, dec), apply(params, enc, dec))
  train = [apply(params, enc, dec, deterministic=False, rngs={"dropout": jax.random.PRNGKey(i)}) for i in range(2)]
  assert not np.allclose(train[0], train[1])


@pytest.mark.parametrize("field,value", [("feed_forward", "swiglu"), ("attention_impl", "flash"), ("d_model", 0),
                                          ("dtype", "float12")])
def test_bad_config_fails_clearly(field, value):
  with pytest.raises((ValueError, TypeError), match=field if field != "dtype" else "float12"):
    dataclasses.replace(TINY, **{field: value})
