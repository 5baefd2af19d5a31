"""PEFT LoRA adapters in and out: our T5 with an imported adapter computes PEFT's logits (PEFT on transformers' T5
is the independent reference), PEFT computes ours for an exported expert, the round trip is exact, and bad adapters
fail with a UserError naming the file or key. A tiny random T5.1.1-style model built and saved locally; no network."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from moe_jax.checkpoints.hf import config_from_hf, load_hf_t5
from moe_jax.checkpoints.peft import CONFIG_FILE, ROUTER_FILE, WEIGHTS_FILE, export_peft, import_peft
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models import Transformer
from moe_jax.models.config import ExpertConfig
from moe_jax.models.experts import exact_modules, init_experts, layout, merge
from moe_jax.models.routers import Uniform
from tests.test_hf_t5 import _randomise as randomise

VOCAB, ENC_LEN, DEC_LEN = 64, 12, 10
RTOL = 1e-4  # max |ours - PEFT| / max |PEFT| over the logits
ALL_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(HF model, our config, our backbone params, its directory): random weights, norm scales included."""
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg)
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32 ** -0.5)
  randomise(model, d_kv=8)
  model.eval()
  path = tmp_path_factory.mktemp("t5")
  model.save_pretrained(path, safe_serialization=True)
  ours = config_from_hf(path, dtype="float32")
  return model, ours, load_hf_t5(path, ours), path


def _inputs():
  rng = np.random.default_rng(0)
  enc = rng.integers(2, VOCAB, (2, ENC_LEN)).astype(np.int32)
  enc[0, -4:] = 0  # right padding
  dec = rng.integers(2, VOCAB, (2, DEC_LEN)).astype(np.int32)
  dec[:, 0] = 0  # decoder start token
  return enc, dec


def _hf_logits(model) -> np.ndarray:
  enc, dec = _inputs()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(enc).long(), attention_mask=torch.from_numpy(enc > 0).long(),
                decoder_input_ids=torch.from_numpy(dec).long())
  return out.logits.numpy()


def _our_logits(config, backbone, tree) -> np.ndarray:
  modules, num_experts, rank = layout(tree)
  experts = ExpertConfig(num_experts=num_experts, rank=rank, modules=exact_modules(modules), router=Uniform())
  enc, dec = _inputs()
  return np.asarray(Transformer(config, experts).apply({"params": merge(backbone, tree)}, enc, dec))


def _rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _leaves(tree) -> dict[tuple[str, ...], np.ndarray]:
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


# name -> (LoraConfig kwargs, number of modules the adapter covers, a covered and an uncovered module of ours)
CASES = {
    "plain": (dict(r=4, lora_alpha=16, target_modules=ALL_TARGETS), 36, None),
    # rsLoRA (alpha / sqrt(r)) on a subset chosen by a regex string.
    "rslora_regex": (dict(r=4, lora_alpha=6, use_rslora=True,
                          target_modules=r".*(SelfAttention|EncDecAttention)\.(q|v)|.*encoder.*DenseReluDense\.wo"),
                     14, ("decoder/layers_1/encoder_decoder_attention/value", "encoder/layers_0/attention/key")),
    # Per-module ranks (zero-padded to 4 on import) and alphas.
    "patterns": (dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS,
                      rank_pattern={"wo": 2, "decoder.block.1.layer.1.EncDecAttention.k": 3},
                      alpha_pattern={"q": 5, "wi_1": 3}), 36, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_peft(base, tmp_path, case):
  hf_model, config, backbone, _ = base
  kwargs, count, covered = CASES[case]
  peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(init_lora_weights=False, **kwargs))
  torch.manual_seed(1)
  with torch.no_grad():  # A and B random, so a transposed, mis-scaled or mis-mapped tensor shows
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, p.shape[1] ** -0.5 if "lora_A" in name else 0.3 / p.shape[1])
  peft_model.eval()
  peft_model.save_pretrained(tmp_path, safe_serialization=True)

  tree, info = import_peft(tmp_path, config)
  assert len(info["modules"]) == count and info["rank"] == 4
  assert info["lora_alpha"] == kwargs["lora_alpha"] and info["peft_config"]["peft_type"] == "LORA"
  if covered:
    assert covered[0] in info["modules"] and covered[1] not in info["modules"]
  leaves = _leaves(tree)
  assert all(v.dtype == np.float32 for v in leaves.values())
  assert all(not v.any() for k, v in leaves.items() if k[-1] == "router")
  if case == "patterns":  # rank 2 padded to 4: the padding is zero
    wo = tree["encoder"]["layers_0"]["mlp"]["wo"]
    assert not wo["lora_a"][..., 2:].any() and not wo["lora_b"][:, 2:].any() and wo["lora_b"][:, :2].all()

  ref = _hf_logits(peft_model)
  ours = _our_logits(config, backbone, tree)
  err, change = _rel_err(ours, ref), _rel_err(_hf_logits(hf_model), ref)
  print(f"{case}: max rel err {err:.1e}, LoRA changes logits by {change:.1e}")
  assert err < RTOL and change > 100 * RTOL

  again, info_inferred = import_peft(tmp_path)  # config inferred from the keys
  assert info_inferred["modules"] == info["modules"]
  assert all(np.array_equal(v, _leaves(again)[k]) for k, v in leaves.items())


EXPORT_MODULES = (r"encoder/layers_0/attention/(query|out)|encoder/layers_1/mlp/wo|"
                  r"decoder/layers_1/(encoder_decoder_attention/key|self_attention/value|mlp/wi_1)")


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
  """A random one-expert tree (non-zero A, B, routers) on six modules, and the directory it was exported to."""
  _, config, _, _ = base
  tree = init_experts(config, ExpertConfig(num_experts=1, rank=3, modules=EXPORT_MODULES, init_std=0.2),
                      jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  tree = flax.traverse_util.unflatten_dict({
      k: np.asarray(v) if k[-1] == "lora_a" else rng.normal(0, 0.2, v.shape).astype(np.float32)
      for k, v in flax.traverse_util.flatten_dict(tree).items()})
  path = tmp_path_factory.mktemp("exported")
  export_peft(tree, path, "local/tiny-t5", config)
  return tree, path


def test_export_loads_in_peft(base, exported):
  hf_model, config, backbone, _ = base
  tree, path = exported
  assert sorted(os.listdir(path)) == sorted([CONFIG_FILE, WEIGHTS_FILE, ROUTER_FILE])
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), path).eval()
  lora = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
  assert len(lora) == 6 and all(m.scaling["default"] == 1 / 3 for m in lora.values())  # LoRA here and nowhere else
  ref = _hf_logits(peft_model)
  err, change = _rel_err(_our_logits(config, backbone, tree), ref), _rel_err(_hf_logits(hf_model), ref)
  print(f"export: max rel err {err:.1e}, LoRA changes logits by {change:.1e}")
  assert err < RTOL and change > 100 * RTOL


def test_round_trip_is_exact(base, exported, tmp_path):
  tree, path = exported
  want = _leaves(tree)
  for config in (None, base[1]):
    back, info = import_peft(path, config)
    got = _leaves(back)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  assert info["base_model"] == "local/tiny-t5" and info["rank"] == 3 and info["task"] == "SEQ_2_SEQ_LM"
  assert info["modules"] == layout(tree)[0]
  for name in (CONFIG_FILE, WEIGHTS_FILE):  # without the router file: same LoRA, zero routers
    (tmp_path / name).write_bytes((path / name).read_bytes())
  got = _leaves(import_peft(tmp_path)[0])
  assert all(np.array_equal(got[k], want[k]) if k[-1] != "router" else not got[k].any() for k in want)


def test_export_rejects_several_experts(exported, tmp_path):
  tree, _ = exported
  two = jax.tree_util.tree_map(lambda x: np.concatenate([x, x]), tree)
  with pytest.raises(ConfigError, match="2 experts"):
    export_peft(two, tmp_path)
  assert not os.listdir(tmp_path)


def _copy_adapter(source: Path, target: Path, config_edit: dict | None = None, extra: dict | None = None) -> Path:
  target.mkdir(exist_ok=True)
  config = json.loads((source / CONFIG_FILE).read_text()) | (config_edit or {})
  (target / CONFIG_FILE).write_text(json.dumps(config))
  save_file(load_file(source / WEIGHTS_FILE) | (extra or {}), target / WEIGHTS_FILE)
  return target


def test_missing_files(exported, tmp_path):
  with pytest.raises(MissingFileError, match=f"{CONFIG_FILE}.*nowhere"):
    import_peft(tmp_path / "nowhere")
  _, path = exported
  (tmp_path / CONFIG_FILE).write_text((path / CONFIG_FILE).read_text())
  (tmp_path / "adapter_model.bin").write_bytes(b"")
  with pytest.raises(MissingFileError, match=rf"{WEIGHTS_FILE}.*adapter_model\.bin.*only safetensors"):
    import_peft(tmp_path)


@pytest.mark.parametrize("edit,field", [({"peft_type": "IA3"}, "peft_type"), ({"use_dora": True}, "use_dora")])
def test_unsupported_config(exported, tmp_path, edit, field):
  adapter = _copy_adapter(exported[1], tmp_path / "a", edit)
  with pytest.raises(ConfigError, match=f"{CONFIG_FILE}: {field}="):
    import_peft(adapter)


@pytest.mark.parametrize("key", ["encoder.block.0.layer.0.SelfAttention.q.lora_magnitude_vector",
                                 "encoder.block.0.layer.0.SelfAttention.q.lora_B.bias",
                                 "shared.lora_embedding_A"])
def test_unknown_key(exported, tmp_path, key):
  adapter = _copy_adapter(exported[1], tmp_path / "a", extra={f"base_model.model.{key}": np.zeros((3, 4), np.float32)})
  with pytest.raises(MismatchError, match=f"{WEIGHTS_FILE}: tensor 'base_model.model.{key}'"):
    import_peft(adapter)


def test_lora_on_lm_head(base, tmp_path):
  hf_model, _, _, _ = base
  model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(r=2, target_modules=["q", "lm_head"]))
  model.save_pretrained(tmp_path / "a", safe_serialization=True, save_embedding_layers=False)
  with pytest.raises(MismatchError, match=r"'lm_head' \(key base_model\.model\.lm_head\.lora_A\.weight\)"):
    import_peft(tmp_path / "a")
  model.save_pretrained(tmp_path / "b", safe_serialization=True)  # PEFT adds the head's own weight here
  with pytest.raises(MismatchError, match=r"tensor 'base_model\.model\.lm_head\.base_layer\.weight'"):
    import_peft(tmp_path / "b")


def test_adapter_for_another_model_size(base, exported):
  _, _, _, hf_path = base
  with pytest.raises(MismatchError,
                     match=r"DenseReluDense\.wi_1 is LoRA for a \(64, 32\) weight .*\(128, 32\).*another model size"):
    import_peft(exported[1], config_from_hf(hf_path, d_ff=128))


def test_module_does_not_import_torch():
  code = "import sys, moe_jax.checkpoints.peft; assert 'torch' not in sys.modules and 'peft' not in sys.modules"
  root = Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=os.environ | {"PYTHONPATH": str(root)})


def test_library_command_line_imports_and_exports_peft_adapters(base, tmp_path):
  """`python -m moe_jax.library import --peft` / `export --peft`, as users type them: the library expert is the
  adapter (PEFT's logits), it records the backbone as trained experts do, and PEFT loads the export unchanged."""
  from moe_jax.checkpoints.identity import weights_checksum
  from moe_jax.library import ExpertLibrary

  hf_model, config, backbone, hf_dir = base
  peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=ALL_TARGETS, init_lora_weights=False))
  peft_model.eval()
  peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
  uri = f"local://{tmp_path}/library"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cli = lambda *args: subprocess.run([sys.executable, "-m", "moe_jax.library", *args], capture_output=True,
                                     text=True, cwd=repo, timeout=300)
  done = cli("import", "--peft", str(tmp_path / "adapter"), "--library", uri, "--name", "peft/sentiment",
             "--backbone", str(hf_dir), "--task", "sentiment")
  assert done.returncode == 0, done.stderr
  expert = ExpertLibrary(uri).get("peft/sentiment")
  assert expert.info.tasks == ("sentiment",) and "peft" in expert.info.tags
  assert expert.info.backbone["weights"] == weights_checksum(load_hf_t5(hf_dir, config_from_hf(hf_dir)))
  ref = _hf_logits(peft_model)
  assert _rel_err(_our_logits(config, backbone, expert.weights), ref) < RTOL

  done = cli("export", "--peft", str(tmp_path / "out"), "--library", uri, "--name", "peft/sentiment")
  assert done.returncode == 0, done.stderr
  reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "out").eval()
  assert _rel_err(_hf_logits(reloaded), ref) < RTOL
  again = cli("import", "--peft", str(tmp_path / "adapter"), "--library", uri, "--name", "peft/sentiment")
  assert again.returncode == 1 and "already has an expert 'peft/sentiment'" in again.stderr
  assert again.stderr.count("\n") == 1
