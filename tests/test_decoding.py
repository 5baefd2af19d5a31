"""KV-cache decoding: the cached T5 decoder against the full forward (logits per position) and against the old
recompute-the-prefix greedy loop (tokens), with and without routed experts; `sample_logits` against float64 NumPy
distributions; the generic loop's EOS, padding, early stop, seeds and compile-once behaviour on a scripted step
function; and rows kept split over a mesh (8 virtual CPU devices, in a fresh interpreter)."""

import functools
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.evaluation import greedy_generate
from moe_jax.models import ExpertConfig, Fixed, Phatgoose, T5Config, Transformer
from moe_jax.models.decoding import generate, sample_logits
from moe_jax.models.t5 import T5Step, t5_step_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 buckets up to distance 12 and 16 decoder positions: exact, log-spaced and clipped buckets all occur.
CFG = T5Config(vocab_size=40, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=1, num_decoder_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, dtype="float32")
EXPERTS = {
    "plain": None,
    "phatgoose": ExpertConfig(num_experts=3, rank=4, router=Phatgoose(k=2)),
    "fixed": ExpertConfig(num_experts=3, rank=4, router=Fixed()),
}
DEC_LEN = 16


def _tokens(seed, batch, length, pad_row0_from=None):
  toks = np.random.default_rng(seed).integers(2, CFG.vocab_size, (batch, length)).astype(np.int32)
  if pad_row0_from is not None:
    toks[0, pad_row0_from:] = 0
  return toks


@functools.lru_cache(maxsize=None)
def _model(kind):
  """Model and random parameters; every leaf non-zero (lora_b and router vectors too), so routing matters."""
  model = Transformer(CFG, EXPERTS[kind])
  toks = jnp.ones((1, 4), jnp.int32)
  params = flax.linen.unbox(jax.jit(functools.partial(model.init, routing_ids=jnp.zeros(1, jnp.int32)))(
      jax.random.PRNGKey(0), toks, toks)["params"])
  flat = flax.traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), len(flat)))
  flat = {k: jax.random.normal(next(keys), v.shape) * (0.5 if k[-1] == "lora_b" else 1.0)
          if k[-1] in ("lora_b", "router") else v for k, v in flat.items()}
  return model, flax.traverse_util.unflatten_dict(flat)


def _routing_ids(kind, batch):
  return jnp.arange(batch, dtype=jnp.int32) % 3 if kind == "fixed" else None


@functools.partial(jax.jit, static_argnums=(0, 3))
def _recompute_greedy(model, params, inputs, max_length, eos_id, routing_ids):
  """The reference: greedy decoding as before the cache, the decoder re-run over the whole fixed-length buffer each
  step (causal masking hides the positions not yet written)."""
  encoded = model.apply({"params": params}, inputs, True, routing_ids, method="encode")

  def step(state):
    i, tokens, done = state
    decoder_inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits = model.apply({"params": params}, encoded, inputs, decoder_inputs, True, routing_ids, method="decode")
    token = jnp.where(done, 0, jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))
    return i + 1, tokens.at[:, i].set(token), done | (token == eos_id)

  state = (jnp.int32(0), jnp.zeros((inputs.shape[0], max_length), jnp.int32), jnp.zeros(inputs.shape[0], bool))
  return jax.lax.while_loop(lambda s: (s[0] < max_length) & ~jnp.all(s[2]), step, state)[1]


@functools.partial(jax.jit, static_argnums=3)
def _cached_logits(step_fn, cache, tokens, prefill):
  """Logits of every decoder position through the cache: `prefill` tokens in one call, then one per call."""
  logits, cache = step_fn(cache, tokens[:, :prefill], jnp.ones((tokens.shape[0], prefill), jnp.int32))

  def one(cache, token):
    logits, cache = step_fn(cache, token[:, None], jnp.ones((token.shape[0], 1), jnp.int32))
    return cache, logits[:, 0]

  cache, rest = jax.lax.scan(one, cache, tokens[:, prefill:].T)
  return jnp.concatenate([logits, rest.transpose(1, 0, 2)], axis=1), cache["decoder"]["cache_index"]


@pytest.mark.parametrize("kind", sorted(EXPERTS))
def test_cached_logits_equal_full_forward(kind):
  """Each position's logits through the cache (a 5-token prefill, then single tokens) equal the teacher-forced
  decoder's logits there, with a padded encoder row; the relative position bias crosses every bucket kind."""
  model, params = _model(kind)
  inputs, decoder = _tokens(1, 3, 9, pad_row0_from=4), _tokens(2, 3, DEC_LEN)
  rid = _routing_ids(kind, 3)
  full = jax.jit(model.apply)({"params": params}, inputs, decoder, routing_ids=rid)
  step_fn, cache = t5_step_fn(model, params, inputs, DEC_LEN, rid)
  got, index = _cached_logits(step_fn, cache, decoder, 5)
  assert got.dtype == jnp.float32 and got.shape == full.shape and int(index) == DEC_LEN
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(EXPERTS))
def test_cached_greedy_equals_recompute_loop(kind):
  """Token for token, with an EOS that some rows emit early (and, for `Fixed()` routing by routing ids, through
  `greedy_generate` too)."""
  model, params = _model(kind)
  inputs, max_length = _tokens(3, 6, 11, pad_row0_from=6), 10
  rid = _routing_ids(kind, 6)
  free = np.asarray(_recompute_greedy(model, params, inputs, max_length, -1, rid))
  eos = int(np.bincount(free[:, 2]).argmax())  # a token some rows emit at step 2: they stop there
  expected = np.asarray(_recompute_greedy(model, params, inputs, max_length, eos, rid))
  stopped = (expected == eos).any(axis=1)
  assert stopped.any() and not stopped.all() and (expected == 0).any()

  step_fn, cache = t5_step_fn(model, params, inputs, max_length, rid)
  start = np.zeros((6, 1), np.int32)
  np.testing.assert_array_equal(generate(step_fn, cache, start, np.ones_like(start), max_length, eos), expected)
  if kind == "fixed":
    np.testing.assert_array_equal(greedy_generate(model, params, inputs, max_length, rid, batch_size=6),
                                  _recompute_greedy(model, params, inputs, max_length, 1, rid))


def test_decode_step_needs_a_cache():
  model, params = _model("plain")
  with pytest.raises(ValueError, match="init_decode_cache"):
    model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), method="decode_step", mutable=["cache"])


# --- sample_logits -------------------------------------------------------------------------------------------------

def _random_logits(seed, rows, vocab, scale=2.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, (rows, vocab)), jnp.float32)


def test_top_k_1_and_tiny_top_p_are_argmax():
  logits = _random_logits(0, 256, 50)
  argmax = np.argmax(np.asarray(logits), axis=-1)
  for seed in range(3):
    rng = jax.random.key(seed)
    np.testing.assert_array_equal(sample_logits(logits, rng, 1.0, top_k=1), argmax)
    np.testing.assert_array_equal(sample_logits(logits, rng, 1.5, top_p=1e-6), argmax)
    np.testing.assert_array_equal(sample_logits(logits, rng, 0.7, top_k=5, top_p=1e-6), argmax)
  np.testing.assert_array_equal(sample_logits(logits, None, 0.0, top_k=5), argmax)  # greedy needs no key


def _expected_probs(logits, temperature, top_k, top_p):
  """float64 NumPy: softmax(logits / T) on the top k, renormalised, cut to the nucleus (the fewest most likely tokens
  reaching top_p), renormalised."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(z.shape, bool)
  keep[order[:top_k or len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  before = np.cumsum(p[order]) - p[order]
  nucleus = np.zeros(z.shape, bool)
  nucleus[order[(before < top_p) & keep[order]]] = True
  p = np.where(nucleus, p, 0.0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (2.5, 0, 1.0), (1.0, 4, 1.0),
                                                     (0.8, 0, 0.8), (1.3, 5, 0.7)])
def test_sampling_frequencies_match_float64_distribution(temperature, top_k, top_p):
  """40000 draws (fixed seed) on one 8-token distribution: chi-square against the float64 expectation below the
  0.1% critical value, and no draw where it gives zero probability (outside the top k or the nucleus)."""
  logits = jnp.asarray([1.2, -0.3, 0.5, 2.0, -1.5, 0.0, 0.9, 1.6], jnp.float32)
  n = 40000
  draws = np.asarray(sample_logits(jnp.tile(logits, (n, 1)), jax.random.key(7), temperature, top_k, top_p))
  expected = _expected_probs(logits, temperature, top_k, top_p)
  counts = np.bincount(draws, minlength=len(logits))
  assert counts[expected == 0].sum() == 0
  support = expected > 0
  chi2 = (((counts - n * expected)[support]) ** 2 / (n * expected[support])).sum()
  critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[support.sum() - 1]
  assert chi2 < critical, (chi2, counts, n * expected)
  if top_k or top_p < 1:
    assert 1 < support.sum() < len(logits)  # the restriction bites and still leaves a choice


def test_top_k_and_top_p_never_leave_their_sets():
  """Per row of random logits: a top-k draw is among the row's k largest; a top-p draw is in the row's nucleus
  computed in float64, with top_p set midway between two cumulative sums so float32 cannot flip the boundary."""
  logits = _random_logits(1, 2000, 30)
  x = np.asarray(logits, np.float64)
  for k in (1, 3, 10):
    draws = np.asarray(sample_logits(logits, jax.random.key(k), 1.0, top_k=k))
    top = np.argsort(-x, axis=-1)[:, :k]
    assert (top == draws[:, None]).any(axis=1).all()
  order = np.argsort(-x, axis=-1)
  probs = np.exp(x - x.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  cumulative = np.cumsum(np.take_along_axis(probs, order, -1), -1)
  for size in (1, 2, 5):  # a nucleus of `size` tokens in every row: top_p between cumulative[size-2] and [size-1]
    low = cumulative[:, size - 2] if size > 1 else np.zeros(len(x))
    for row in range(0, len(x), 400):
      top_p = float((low[row] + cumulative[row, size - 1]) / 2)
      draws = np.asarray(sample_logits(jnp.tile(logits[row], (500, 1)), jax.random.key(size), 1.0, top_p=top_p))
      assert set(draws.tolist()) <= set(order[row, :size].tolist()), (row, size)
      assert size == 1 or len(set(draws.tolist())) > 1


def test_bad_sampling_arguments_fail_clearly():
  logits = _random_logits(2, 2, 5)
  for kwargs in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError, match="sampling"):
      sample_logits(logits, jax.random.key(0), **{"temperature": 1.0, **kwargs})
  with pytest.raises(ValueError, match="rng"):
    sample_logits(logits, None, 1.0)


# --- the generic loop on a scripted model ---------------------------------------------------------------------------

VOCAB, EOS = 12, 1


def _scripted(script, calls=None):
  """A step function whose logits at cache position t are one-hot on script[:, t] (and uniform noise off it, for
  sampling); records each call's token count into `calls` from inside the compiled loop."""
  script = jnp.asarray(script, jnp.int32)

  def step_fn(cache, tokens, mask):
    positions = cache["pos"] + jnp.arange(tokens.shape[1])
    logits = 8.0 * jax.nn.one_hot(script[:, positions], VOCAB)  # [B, l, V]
    if calls is not None:
      jax.debug.callback(lambda n: calls.append(int(n)), jnp.int32(tokens.shape[1]))
    seen = cache["seen"].at[:, positions].set(jnp.where(mask > 0, tokens, -1))
    return logits, {"pos": cache["pos"] + tokens.shape[1], "seen": seen}

  return step_fn


def _cache(batch, length):
  return {"pos": jnp.int32(0), "seen": jnp.full((batch, length), -2, jnp.int32)}


def test_eos_stops_a_row_and_pads_after_it_and_the_loop_stops_early():
  # Prompt of 2 tokens; generated token i is script[:, 1 + i].
  script = np.array([[5, 3, 4, EOS, 7, 7, 7, 7, 7, 7],
                     [5, 6, EOS, 9, 9, 9, 9, 9, 9, 9],
                     [5, 3, 4, 4, 4, EOS, 8, 8, 8, 8]])
  calls = []
  prompt = np.array([[2, 2], [2, 2], [2, 2]], np.int32)
  tokens = generate(_scripted(script, calls), _cache(3, 12), prompt, np.ones_like(prompt), 8, EOS)
  jax.effects_barrier()
  np.testing.assert_array_equal(tokens, [[3, 4, EOS, 0, 0, 0, 0, 0],
                                         [6, EOS, 0, 0, 0, 0, 0, 0],
                                         [3, 4, 4, 4, EOS, 0, 0, 0]])
  assert calls == [2, 1, 1, 1, 1]  # the prefill, then one step per token up to the last EOS; none after it
  calls.clear()
  np.testing.assert_array_equal(generate(_scripted(script, calls), _cache(3, 12), prompt, np.ones_like(prompt), 1,
                                         EOS), [[3], [6], [3]])
  jax.effects_barrier()
  assert calls == [2]
  assert generate(_scripted(script), _cache(3, 12), prompt, np.ones_like(prompt), 0, EOS).shape == (3, 0)


def test_prompts_continue_from_their_last_real_token():
  """Left padding (rows 0, 1) as recommended, and right padding (row 2): the first token comes from the last real
  prompt token's logits; later tokens are appended after the whole prompt."""
  script = np.array([[0, 0, 4, 5, 6, 7], [0, 3, 4, 8, 9, 10], [0, 3, 4, 8, 9, 10]])
  prompt = np.array([[0, 2, 2], [2, 2, 2], [2, 2, 0]], np.int32)
  mask = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 0]], np.int32)
  seen = []

  def recording(cache, tokens, m):
    logits, cache = _scripted(script)(cache, tokens, m)
    jax.debug.callback(lambda s: seen.append(np.asarray(s)), cache["seen"])
    return logits, cache

  tokens = generate(recording, _cache(3, 6), prompt, mask, 3, EOS)
  jax.effects_barrier()
  np.testing.assert_array_equal(tokens, [[4, 5, 6], [4, 8, 9], [3, 8, 9]])
  # The prompt's padding reaches the cache as masked (-1); generated tokens are fed back as real ones.
  np.testing.assert_array_equal(seen[-1], [[-1, 2, 2, 4, 5, -2], [2, 2, 2, 4, 8, -2], [2, 2, -1, 3, 8, -2]])


def test_same_seed_same_samples():
  rng = np.random.default_rng(0)
  noise = rng.normal(0, 1.0, (4, 16, VOCAB)).astype(np.float32)

  def step_fn(cache, tokens, mask):
    positions = cache + jnp.arange(tokens.shape[1])
    return jnp.asarray(noise)[:, positions], cache + tokens.shape[1]

  prompt = np.full((4, 1), 3, np.int32)
  run = lambda seed, **kw: np.asarray(generate(jax.tree_util.Partial(step_fn), jnp.int32(0), prompt,
                                               np.ones_like(prompt), 10, -1, jax.random.key(seed), **kw))
  first = run(0, temperature=1.0, top_k=6, top_p=0.9)
  np.testing.assert_array_equal(first, run(0, temperature=1.0, top_k=6, top_p=0.9))
  assert not np.array_equal(first, run(1, temperature=1.0, top_k=6, top_p=0.9))
  np.testing.assert_array_equal(run(0, temperature=0.0), noise[:, :10].argmax(-1))
  with pytest.raises(ValueError, match="rng"):
    generate(jax.tree_util.Partial(step_fn), jnp.int32(0), prompt, np.ones_like(prompt), 3, -1, None, 1.0)


def test_generate_compiles_once_per_shape():
  """New parameters and new inputs of the same shapes reuse the compiled loop (T5Step is a pytree)."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
      else None)
  model, params = _model("phatgoose")
  start = np.zeros((2, 1), np.int32)
  outputs = []
  for seed in range(3):
    params = jax.tree.map(lambda x: x * (1.0 + 0.1 * seed), params)
    step_fn, cache = t5_step_fn(model, params, _tokens(10 + seed, 2, 9), 6)
    assert isinstance(step_fn, T5Step)
    before = len(compiles)
    outputs.append(np.asarray(generate(step_fn, cache, start, np.ones_like(start), 6, -1)))
    if seed:
      assert len(compiles) == before, f"call {seed} compiled {len(compiles) - before} programs"
  assert compiles, "no compilation seen (listener broken?)"
  assert not np.array_equal(outputs[0], outputs[2])


# --- a mesh ---------------------------------------------------------------------------------------------------------

def _mesh_check() -> None:
  from moe_jax.training import partitioning as part

  assert jax.device_count() == 8, jax.devices()
  model, params = _model("plain")  # routed greedy decoding on a mesh: tests/test_eval_mesh.py
  inputs = _tokens(20, 8, 9, pad_row0_from=5)
  start = np.zeros((8, 1), np.int32)
  step_fn, cache = t5_step_fn(model, params, inputs, 7)
  single = np.asarray(generate(step_fn, cache, start, np.ones_like(start), 7, -1))
  mesh, rules = part.make_mesh(data=2, fsdp=2, model=2), part.axis_rules()
  with part.activate(mesh, rules):
    placed = part.place(model, params, mesh, rules)
    x, s = part.place_batch([inputs, start])
    step_fn, cache = t5_step_fn(model, placed, x, 7)
    key = cache["decoder"]["layers_1"]["self_attention"]["cached_key"]
    cross = cache["decoder"]["layers_0"]["encoder_decoder_attention"]["cached_value"]
    for leaf in (key, cross):  # rows over data x fsdp, heads over model
      assert leaf.sharding.shard_shape(leaf.shape) == (2, leaf.shape[1], 2, CFG.d_kv), leaf.sharding
    _, stepped = jax.jit(lambda f, c, t: f(c, t, jnp.ones_like(t)))(step_fn, cache, s)
    key = stepped["decoder"]["layers_1"]["self_attention"]["cached_key"]
    assert key.sharding.shard_shape(key.shape) == (2, key.shape[1], 2, CFG.d_kv), key.sharding
    tokens = generate(step_fn, cache, s, jnp.ones_like(s), 7, -1)
    assert tokens.sharding.shard_shape(tokens.shape) == (2, 7), tokens.sharding
    np.testing.assert_array_equal(np.asarray(tokens), single)
  print("decode mesh OK")


def test_rows_stay_split_over_a_mesh():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "decode mesh OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]


if __name__ == "__main__":
  _mesh_check()
