"""Adding experts to a backbone tree, splitting and merging, and the README's quick-start snippet."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import ExpertConfig, Phatgoose, T5Config, Transformer
from moe_jax.models import experts as ex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = T5Config(vocab_size=40, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=2,
               dtype="float32")
TOKS = jnp.asarray(np.random.default_rng(0).integers(1, 40, size=(2, 6)), jnp.int32)


def _backbone():
  return nn.meta.unbox(Transformer(CFG).init(jax.random.PRNGKey(1), TOKS, TOKS))["params"]


def test_add_experts_keeps_backbone_function_and_initialises_as_specified():
  backbone = _backbone()
  cfg = ExpertConfig(num_experts=3, rank=4, router=Phatgoose(k=2))
  params = ex.add_experts(backbone, CFG, cfg, jax.random.PRNGKey(2))
  base = Transformer(CFG).apply({"params": backbone}, TOKS, TOKS)
  routed = Transformer(CFG, cfg).apply({"params": params}, TOKS, TOKS)
  np.testing.assert_allclose(routed, base, rtol=1e-6, atol=1e-6)  # B = 0: experts start as a no-op
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  a = np.concatenate([np.ravel(v) for k, v in flat.items() if k[-1].key == "lora_a"])
  assert abs(a.std() - 0.01) < 1e-3 and abs(a.mean()) < 1e-3
  assert all(not np.any(v) for k, v in flat.items() if k[-1].key in ("lora_b", "router"))
  assert sum(k[-1].key == "lora_a" for k in flat) == 7 + 11 * 2
  back, experts = ex.split(params)
  assert jax.tree.structure(back) == jax.tree.structure(backbone)
  assert jax.tree.structure(ex.merge(back, experts)) == jax.tree.structure(params)


def test_add_experts_rejects_a_backbone_for_another_model():
  wrong = CFG.__class__(**{**CFG.__dict__, "d_ff": 48})
  with pytest.raises(ValueError, match=r"mlp/wi_0/kernel is \(16, 32\).* expects \(16, 48\)"):
    ex.add_experts(_backbone(), wrong, ExpertConfig(num_experts=2), jax.random.PRNGKey(0))
  params = ex.add_experts(_backbone(), CFG, ExpertConfig(num_experts=2), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="already has expert parameters"):
    ex.add_experts(params, CFG, ExpertConfig(num_experts=2), jax.random.PRNGKey(0))


def test_readme_quickstart_runs(tmp_path):
  """The README's Python snippet runs as written on a small Hugging Face T5 saved here."""
  import torch
  import transformers

  hf_cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
                                 num_decoder_layers=2, feed_forward_proj="gated-gelu")
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(hf_cfg).save_pretrained(tmp_path, safe_serialization=True)
  readme = open(os.path.join(REPO, "README.md")).read()
  snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  snippet = snippet.replace("/path/to/t5-xl-lm-adapt", str(tmp_path)).replace("32128", "64")
  scope = {}
  exec(compile(snippet, "README.md", "exec"), scope)
  assert scope["logits"].shape == (2, 3, 64)
  assert np.all(np.isfinite(scope["logits"]))
