"""Hugging Face PEFT LoRA adapters for T5 <-> our one-expert trees (import and export), with NumPy and safetensors only.

A PEFT LoRA on a linear adds `x A^T B^T * scaling` (lora_A.weight [r, d_in], lora_B.weight [d_out, r],
scaling = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern`/`alpha_pattern` give per-module
r/alpha). Our expert adds `x A B / r` (lora_a [E, d_in, r], lora_b [E, r, d_out], Uniform routing over E=1). So:

  import: A = lora_A^T, B = lora_B^T * (scaling * r_max). Modules whose rank is below the largest one, r_max, are
    zero-padded to it (zero rows of B and columns of A add nothing), since our experts share one rank; the scale of
    1/r_max is folded into B with the factor above, so every module's update is PEFT's to float32 rounding.
  export: lora_A = A^T, lora_B = B^T, `lora_alpha = 1`, `r` = our rank. PEFT's scaling 1/r is then our 1/r, so the
    tensors are written as they are (no arithmetic on them) and import(export(tree)) gives the tree back bit for bit
    (the import factor is 1 * r / r == 1.0 exactly). `lora_alpha = r` would instead need B / r, which rounds.

PEFT has no router vectors: export writes them to ROUTER_FILE beside the adapter and import reads them back when the
file is there (zero vectors otherwise). The tensor keys of `adapter_model.safetensors`, not `target_modules`, say which
modules an adapter covers; they are mapped to our paths with `hf.name_map`. Only q/k/v/o and the feed-forward linears
are supported; any other key (lm_head, DoRA magnitudes, embeddings, biases) fails naming the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import flax
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy, which safetensors' NumPy API needs for bf16 adapters
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from moe_jax import fs
from moe_jax.checkpoints.hf import expected_shapes, name_map
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models.config import T5Config
from moe_jax.models.experts import layout

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ROUTER_FILE = "moe_jax_router.safetensors"  # our router vectors, keyed by module path; PEFT ignores the file
PREFIX = "base_model.model."  # PEFT's prefix of tensor keys (the LoraModel wrapping the HF model)
LORA_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
# LoraConfig fields that change the forward pass or the model beyond plain LoRA on linears (PEFT's LoRA variants
# and extras); an adapter that sets any of them cannot be represented by our experts.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
                "kasa_config", "velora_config", "monteclora_config", "layer_replication", "modules_to_save",
                "trainable_token_indices", "target_parameters")

Params = dict[str, Any]


def _lora_modules(cfg: T5Config) -> dict[str, tuple[str, ...]]:
  """HF module name (e.g. "encoder.block.0.layer.0.SelfAttention.q") -> our module path for every LoRA target."""
  out = {}
  for ours, (name, _) in name_map(cfg).items():
    module = name.removesuffix(".weight")
    if ours[-1] == "kernel" and module.rsplit(".", 1)[-1] in LORA_TARGETS and module != "lm_head":
      out[module] = ours[:-1]
  return out


def _infer_config(names: Iterable[str], layer: str, mlp: str, where: str) -> T5Config:
  """A T5Config whose `name_map` covers `names` (HF module names or our paths): layer counts from the largest index
  per stack (`layer` captures stack and index), gated or not from the feed-forward names (`mlp` captures them).
  Only the name map is used, so every other field keeps its default."""
  layers = {"encoder": 1, "decoder": 1}
  ffn = set()
  for name in names:
    if m := re.search(layer, name):
      layers[m[1]] = max(layers[m[1]], int(m[2]) + 1)
    if m := re.search(mlp, name):
      ffn.add(m[1])
  if "wi" in ffn and ffn & {"wi_0", "wi_1"}:
    raise MismatchError(f"{where} has both gated (wi_0/wi_1) and non-gated (wi) feed-forward LoRAs; pass `config=`")
  return T5Config(num_encoder_layers=layers["encoder"], num_decoder_layers=layers["decoder"],
                  feed_forward="relu" if "wi" in ffn else "gated-gelu", name="T5")


def _kernel_shapes(cfg: T5Config, modules: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[int, int]]:
  """(d_in, d_out) of each module's kernel in the model `cfg` describes."""
  shapes = expected_shapes(cfg)
  return {m: shapes[m + ("kernel",)] for m in modules}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
  """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name (after a dot)."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _read_adapter_config(directory: str) -> dict[str, Any]:
  path = fs.join(directory, CONFIG_FILE)
  if not fs.isfile(path):
    raise MissingFileError(f"no PEFT {CONFIG_FILE} at {path}; is {directory} a PEFT adapter directory?")
  peft_config = json.loads(fs.read_text(path))
  if peft_config.get("peft_type") != "LORA":
    raise ConfigError(f"{path}: peft_type={peft_config.get('peft_type')!r}; only 'LORA' adapters can be imported")
  for field in _UNSUPPORTED:
    if peft_config.get(field):
      raise ConfigError(f"{path}: {field}={peft_config[field]!r} is not plain LoRA on linears, which is all our "
                        "experts represent; use an adapter without it")
  if str(peft_config.get("init_lora_weights", "")).lower().startswith("mica"):
    raise ConfigError(f"{path}: init_lora_weights='mica' is a LoRA variant our experts do not represent")
  return peft_config


def _read_weights(directory: str) -> tuple[str, dict[str, np.ndarray]]:
  path = fs.join(directory, WEIGHTS_FILE)
  if not fs.isfile(path):
    found = fs.listdir(directory) if fs.isdir(directory) else "the directory does not exist"
    raise MissingFileError(f"no {WEIGHTS_FILE} in {directory} (found {found}); only safetensors adapters are "
                           "supported: re-save with save_pretrained(..., safe_serialization=True)")
  return path, load_safetensors(fs.read_bytes(path))


def _parse_keys(path: str, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """HF module name -> {"A": lora_A.weight, "B": lora_B.weight}; any other key is an error naming it."""
  pattern = re.compile(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight")
  out: dict[str, dict[str, np.ndarray]] = {}
  for key in sorted(tensors):
    m = pattern.fullmatch(key)
    if not m:
      raise MismatchError(f"{path}: tensor {key!r} is not a LoRA A/B weight; only plain LoRA on T5's attention and "
                          "feed-forward linears can be imported")
    out.setdefault(m[1], {})[m[2]] = tensors[key]
  if not out:
    raise MismatchError(f"{path} holds no LoRA weights")
  return out


def import_peft(directory: str | os.PathLike, config: T5Config | None = None) -> tuple[Params, dict[str, Any]]:
  """A PEFT LoRA adapter directory as one expert: (expert tree, info).

  The tree is nested dicts {path parts...: {"lora_a": [1, d_in, r], "lora_b": [1, r, d_out], "router": [1, d_in]}}
  of float32 NumPy arrays, r the adapter's largest rank (smaller ones are zero-padded, see the module docstring),
  ready for `moe_jax.models.experts.merge` with a backbone and `layout_config(info["modules"], 1, info["rank"])`.
  Router vectors come from ROUTER_FILE when present (an `export_peft` directory), else zeros.
  info: "modules" (sorted module paths), "rank", "base_model" (base_model_name_or_path), "lora_alpha",
  "peft_config" (the adapter_config dict) and "task" (its task_type).

  `config` (our T5Config of the base model) also checks every tensor's shape against the model; without it the
  layer counts and feed-forward kind are inferred from the keys and shapes are only checked against each other.
  """
  directory = os.fspath(directory)
  peft_config = _read_adapter_config(directory)
  path, tensors = _read_weights(directory)
  pairs = _parse_keys(path, tensors)
  cfg = config or _infer_config(pairs, r"(encoder|decoder)\.block\.(\d+)\.", r"DenseReluDense\.(wi|wi_0|wi_1|wo)$",
                                path)
  targets = _lora_modules(cfg)
  for module, pair in pairs.items():
    if module not in targets:
      raise MismatchError(f"{path}: LoRA on {module!r} (key {PREFIX}{module}.lora_A.weight) is not on a T5 "
                          f"attention or feed-forward linear of {cfg.name}; only {'/'.join(LORA_TARGETS)} are "
                          "supported")
    if set(pair) != {"A", "B"}:
      missing = ({"A", "B"} - set(pair)).pop()
      raise MismatchError(f"{path}: {PREFIX}{module}.lora_{missing}.weight is missing")
  expected = _kernel_shapes(cfg, [targets[m] for m in pairs]) if config is not None else {}

  ranks = {}
  for module, pair in pairs.items():
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise MismatchError(f"{path}: {module} has lora_A {a.shape} and lora_B {b.shape}; expected [r, d_in], "
                          "[d_out, r]")
    found = (a.shape[1], b.shape[0])
    ours = targets[module]
    if expected and found != tuple(expected[ours]):
      raise MismatchError(f"{path}: {module} is LoRA for a ({found[1]}, {found[0]}) weight but {config.name}'s "
                          f"{'/'.join(ours)} is {tuple(expected[ours])[::-1]} (HF layout); is the adapter for "
                          "another model size?")
    ranks[module] = a.shape[0]
    want = _pattern_value(peft_config.get("rank_pattern") or {}, module, peft_config.get("r", a.shape[0]))
    if want != a.shape[0]:
      raise MismatchError(f"{path}: {module} has rank {a.shape[0]} but {CONFIG_FILE} says r={want}")

  r_max = max(ranks.values())
  routers = _read_routers(directory, {"/".join(targets[m]) for m in pairs})
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for module, pair in pairs.items():
    r = ranks[module]
    alpha = _pattern_value(peft_config.get("alpha_pattern") or {}, module, peft_config.get("lora_alpha", 8))
    # scaling * r_max, in float64; with lora_alpha == r_max == r (an export) it is exactly 1.0, so B is untouched.
    factor = alpha * r_max / (np.sqrt(r) if peft_config.get("use_rslora") else r)
    a = np.zeros((1, pair["A"].shape[1], r_max), np.float32)
    b = np.zeros((1, r_max, pair["B"].shape[0]), np.float32)
    a[0, :, :r] = pair["A"].T.astype(np.float32)
    b[0, :r, :] = (pair["B"].T.astype(np.float64) * factor).astype(np.float32)
    ours = targets[module]
    router = routers.get("/".join(ours), np.zeros((1, a.shape[1]), np.float32))
    if router.shape != (1, a.shape[1]):
      raise MismatchError(f"{fs.join(directory, ROUTER_FILE)}: router of {'/'.join(ours)} is {router.shape}, "
                          f"expected {(1, a.shape[1])}")
    flat.update({ours + ("lora_a",): a, ours + ("lora_b",): b, ours + ("router",): router.astype(np.float32)})

  info = {"modules": sorted("/".join(targets[m]) for m in pairs), "rank": r_max,
          "base_model": peft_config.get("base_model_name_or_path"), "lora_alpha": peft_config.get("lora_alpha"),
          "peft_config": peft_config, "task": peft_config.get("task_type")}
  return flax.traverse_util.unflatten_dict(flat), info


def _read_routers(directory: str, modules: set[str]) -> dict[str, np.ndarray]:
  """Router vectors from ROUTER_FILE, which must cover exactly `modules`; {} when the file is absent."""
  path = fs.join(directory, ROUTER_FILE)
  if not fs.isfile(path):
    return {}
  routers = load_safetensors(fs.read_bytes(path))
  if set(routers) != modules:
    odd = sorted(set(routers) ^ modules)[0]
    raise MismatchError(f"{path} and {WEIGHTS_FILE} cover different modules (first: {odd}); delete {ROUTER_FILE} "
                        "to import with zero router vectors")
  return routers


def export_peft(expert_tree: Params, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                config: T5Config | None = None) -> None:
  """Write one expert as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained(hf_t5, directory)` loads.

  Writes adapter_model.safetensors, ROUTER_FILE and, last, adapter_config.json, each atomically (so a directory
  with a config has the weights of the same export). `expert_tree` holds lora_a/lora_b/router leaves (other leaves
  are ignored, so a full parameter tree works) of exactly one expert; `target_modules` lists the exact HF module
  names, so PEFT puts LoRA on these modules and no others. `config` checks shapes against the model; without it
  the name mapping is inferred from the module paths.
  """
  directory = os.fspath(directory)
  modules, num_experts, rank = layout(expert_tree)
  if num_experts != 1:
    raise ConfigError(f"export_peft: the tree has {num_experts} experts; a PEFT adapter is one LoRA, so export one "
                      "expert at a time (slice each leaf's first axis to i:i+1)")
  flat = flax.traverse_util.flatten_dict(expert_tree)
  paths = [tuple(m.split("/")) for m in modules]
  cfg = config or _infer_config(modules, r"(encoder|decoder)/layers_(\d+)/", r"mlp/(wi|wi_0|wi_1|wo)$",
                                "the expert tree")
  hf_names = {ours: hf for hf, ours in _lora_modules(cfg).items()}
  expected = _kernel_shapes(cfg, [p for p in paths if p in hf_names]) if config is not None else {}
  tensors, routers = {}, {}
  for path in paths:
    name = "/".join(path)
    if path not in hf_names:
      raise MismatchError(f"export_peft: module {name} has no PEFT counterpart for {cfg.name}; only attention "
                          "query/key/value/out and feed-forward linears can be exported")
    absent = [k for k in ("lora_b", "router") if path + (k,) not in flat]
    if absent:
      raise MismatchError(f"export_peft: module {name} has lora_a but no {absent[0]}")
    a, b, router = (np.asarray(flat[path + (k,)], np.float32) for k in ("lora_a", "lora_b", "router"))
    if a.shape[::2] != (1, rank) or b.shape[:2] != (1, rank) or router.shape != (1, a.shape[1]):
      raise MismatchError(f"export_peft: {name} has lora_a {a.shape}, lora_b {b.shape}, router {router.shape}; "
                          f"expected [1, d_in, {rank}], [1, {rank}, d_out], [1, d_in]")
    if expected and (a.shape[1], b.shape[2]) != tuple(expected[path]):
      raise MismatchError(f"export_peft: {name} is LoRA for a {(a.shape[1], b.shape[2])} kernel but {cfg.name}'s is "
                          f"{tuple(expected[path])}")
    key = PREFIX + hf_names[path]
    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[0].T)
    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[0].T)
    routers[name] = router
  adapter_config = {
      "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": rank, "lora_alpha": 1, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
      "target_modules": sorted(hf_names[p] for p in paths), "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
  fs.write_bytes(fs.join(directory, WEIGHTS_FILE), save_safetensors(tensors, metadata={"format": "pt"}))
  fs.write_bytes(fs.join(directory, ROUTER_FILE), save_safetensors(routers))
  fs.write_text(fs.join(directory, CONFIG_FILE), json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")

