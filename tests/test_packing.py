"""Packing with T5X semantics: a packed example gets the logits and loss it gets alone in a row (segment masks in
every attention, relative positions restarting per segment), through seqio's packer and the train step, with one
bucket formula for static (numpy) and per-example (jax.numpy) positions."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import ExpertConfig, T5Config, Transformer
from moe_jax.models.attention import RelativePositionBias, relative_position_bucket, relative_position_buckets
from moe_jax.training import optimizer as opt
from moe_jax.training import partitioning as part
from moe_jax.training import train_step as ts

# Few buckets over a short max distance, so the hand-packed examples below reach the log-spaced buckets too.
CFG = T5Config(vocab_size=50, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, dtype="float32")
ENC_LEN, DEC_LEN = 20, 14
PACKING = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


def _params(model: Transformer, seed: int = 0):
  tokens = jnp.ones((1, 4), jnp.int32)
  return flax.linen.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens))["params"]


def _pack(examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
  """One row by hand, as seqio packs: segments 1, 2, ... in order, positions restarting at 0, decoder inputs the
  targets shifted right within each segment (0 at every segment start), zeros after the last segment."""
  row = {name: np.zeros(ENC_LEN if name.startswith("encoder") else DEC_LEN, np.int32)
         for name in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", *PACKING)}
  e = d = 0
  for segment, (inputs, targets) in enumerate(examples, 1):
    row["encoder_input_tokens"][e:e + len(inputs)] = inputs
    row["encoder_segment_ids"][e:e + len(inputs)] = segment
    row["encoder_positions"][e:e + len(inputs)] = np.arange(len(inputs))
    row["decoder_target_tokens"][d:d + len(targets)] = targets
    row["decoder_input_tokens"][d + 1:d + len(targets)] = targets[:-1]
    row["decoder_segment_ids"][d:d + len(targets)] = segment
    row["decoder_positions"][d:d + len(targets)] = np.arange(len(targets))
    e, d = e + len(inputs), d + len(targets)
  return row


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


@pytest.mark.parametrize("remat", [False, True])
def test_packed_examples_match_unpacked(remat):
  """Two packed rows (3 and 2 examples of different lengths) vs the 5 examples one per row: same logits per token
  and the same loss, so packed examples neither see each other nor see shifted relative positions."""
  rng = np.random.default_rng(0)
  lengths = [[(5, 4), (9, 2), (3, 6)], [(8, 7), (10, 5)]]  # (inputs, targets) per example, per packed row
  examples = [[(rng.integers(2, CFG.vocab_size, li), rng.integers(2, CFG.vocab_size, lt)) for li, lt in row]
              for row in lengths]
  packed = _stack([_pack(row) for row in examples])
  unpacked = _stack([_pack([ex]) for row in examples for ex in row])
  unpacked = {k: v for k, v in unpacked.items() if k not in PACKING}
  assert packed["decoder_segment_ids"].max() == 3 and packed["decoder_input_tokens"][0, 4] == 0

  model = Transformer(dataclasses.replace(CFG, remat=remat))
  params = _params(model)
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["encoder_input_tokens"], b["decoder_input_tokens"],
                                            **{k: b.get(k) for k in PACKING}))
  got, want = np.asarray(logits(params, packed)), np.asarray(logits(params, unpacked))
  i = 0
  for r, row in enumerate(lengths):
    d = 0
    for _, lt in row:
      np.testing.assert_allclose(got[r, d:d + lt], want[i, :lt], rtol=1e-5, atol=1e-5, err_msg=f"example {i}")
      d, i = d + lt, i + 1

  losses = [ts.weighted_cross_entropy(jnp.asarray(x), b["decoder_target_tokens"], b["decoder_target_tokens"] > 0)
            for x, b in ((got, packed), (want, unpacked))]
  np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=1e-5)
  assert float(losses[0][1]) == float(losses[1][1]) == sum(lt for row in lengths for _, lt in row)


def test_per_example_position_bias_uses_each_rows_positions():
  """Given positions, bias[b, :, i, j] is the bucket of positions[b, j] - positions[b, i], bit for bit the static
  bias at those positions."""
  positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]], np.int32)
  for bidirectional in (True, False):
    module = RelativePositionBias(CFG.num_heads, CFG.relative_attention_num_buckets,
                                  CFG.relative_attention_max_distance, bidirectional)
    variables = module.init(jax.random.PRNGKey(0), 8, 8)
    static = np.asarray(module.apply(variables, 8, 8))[0]
    packed = np.asarray(module.apply(variables, 8, 8, positions=jnp.asarray(positions)))
    assert packed.shape == (2, CFG.num_heads, 8, 8)
    for b, pos in enumerate(positions):
      np.testing.assert_array_equal(packed[b], static[:, pos[:, None], pos[None, :]])


def test_decoder_needs_both_segment_ids():
  model = Transformer(CFG)
  params = _params(model)
  tokens, segments = jnp.ones((1, 6), jnp.int32), jnp.ones((1, 6), jnp.int32)
  with pytest.raises(ValueError, match="encoder_segment_ids and decoder_segment_ids"):
    model.apply({"params": params}, tokens, tokens, decoder_segment_ids=segments)


def test_seqio_packing_keeps_the_loss_and_trains():
  """A fixed set of synthetic_reverse examples through seqio's EncDecFeatureConverter, unpacked and packed (feature
  lengths that truncate nothing): the same total weighted loss and weight, and the jitted train step runs on (and
  reports the unpacked loss for) the packed batch."""
  import seqio

  import tasks  # noqa: F401  (registers the synthetic tasks)
  from tasks import synthetic

  lengths = synthetic.FEATURE_LENGTHS
  ds = seqio.get_mixture_or_task("synthetic_reverse").get_dataset(lengths, split="train", shuffle=False).take(24)

  def convert(pack: bool) -> dict[str, np.ndarray]:
    rows = list(seqio.EncDecFeatureConverter(pack=pack)(ds, lengths).as_numpy_iterator())
    return {k: np.stack([row[k] for row in rows]).astype(np.int32) for k in rows[0]}

  unpacked, packed = convert(False), convert(True)
  assert len(unpacked["encoder_input_tokens"]) == 24 and len(packed["encoder_input_tokens"]) < 12
  assert set(PACKING) <= set(packed) and packed["decoder_segment_ids"].max() > 2
  assert unpacked["decoder_loss_weights"].sum() == packed["decoder_loss_weights"].sum()

  cfg = dataclasses.replace(CFG, vocab_size=264, relative_attention_num_buckets=32,
                            relative_attention_max_distance=128)
  experts = ExpertConfig(num_experts=1, rank=4)
  model = Transformer(cfg, experts)
  params = jax.device_get(_params(model))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, 0.05) if path[-1].key == "lora_b" else x, params)  # experts change the logits

  @jax.jit
  def loss_sum(params, batch):
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         **{k: batch.get(k) for k in PACKING})
    return ts.weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])

  (loss_u, weight_u), (loss_p, weight_p) = loss_sum(params, unpacked), loss_sum(params, packed)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  assert float(weight_p) == float(weight_u) > 0

  mesh, rules = part.make_mesh(devices=jax.devices()[:1]), part.axis_rules()
  tx = opt.make_optimizer("expert", params, learning_rate=1e-3, warmup_fraction=0.0)
  state = ts.create_train_state(params, model, tx, mesh, rules)
  step = ts.make_train_step(model, tx, "expert", mesh, rules)
  state, metrics = step(state, part.shard_batch(packed, mesh, rules))
  np.testing.assert_allclose(metrics["loss"], loss_u / weight_u, rtol=1e-5)
  assert float(metrics["weight_sum"]) == float(weight_u) and float(metrics["grad_norm"]) > 0
  assert int(state.step) == 1


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (64, 256), (32, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_formula_numpy_jax_and_transformers_agree(num_buckets, max_distance, bidirectional):
  """One formula for static and per-example positions: numpy and jax.numpy (jitted, as in the model) give the same
  buckets on every offset up to well past max_distance and on random ones, and both match transformers' T5."""
  import torch
  from transformers.models.t5.modeling_t5 import T5Attention

  rng = np.random.default_rng(num_buckets + max_distance)
  offsets = np.concatenate([np.arange(-4 * max_distance, 4 * max_distance + 1),
                            rng.integers(-5000, 5000, 2000)]).astype(np.int32)
  ours = relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
  on_device = jax.jit(lambda rel: relative_position_bucket(rel, bidirectional, num_buckets, max_distance, xp=jnp))
  np.testing.assert_array_equal(np.asarray(on_device(jnp.asarray(offsets))), ours)
  ref = T5Attention._relative_position_bucket(torch.from_numpy(offsets.astype(np.int64)),
                                              bidirectional=bidirectional, num_buckets=num_buckets,
                                              max_distance=max_distance)
  np.testing.assert_array_equal(ours, ref.numpy())
  # The static [q, k] table is the same formula at key - query.
  table = relative_position_buckets(3, 5, bidirectional, num_buckets, max_distance, 1)
  np.testing.assert_array_equal(
      table, relative_position_bucket(np.arange(5)[None] - np.arange(1, 4)[:, None], bidirectional, num_buckets,
                                      max_distance))


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_branch_arguments_mask_segments(monkeypatch, causal):
  """The cuDNN branch's call (segment mask, causal flag, key lengths), run through jax's XLA implementation as no
  GPU is here, equals the reference XLA path on every real query."""
  from moe_jax.models import attention as attn

  call = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: call(*a, **(kw | {"implementation": "xla"})))
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((1, 2, 12, 12)), jnp.float32)
  segments = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 2 + [0], [1] * 7 + [2] * 3 + [0] * 2], jnp.int32)
  ours = attn.attention(q, k, v, bias, segments > 0, causal, "cudnn", segment_ids=(segments, segments))
  ref = attn.attention(q, k, v, bias, segments > 0, causal, "xla", segment_ids=(segments, segments))
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-6)
