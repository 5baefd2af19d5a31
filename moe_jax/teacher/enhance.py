"""Enhance a prepared dataset with a teacher's rationales: `python -m moe_jax.teacher enhance --gin_file=...`.

Each row's prompt field (`cot`, `error` or `fundamental` of `moe_jax.teacher.formats`) is continued by the teacher
with `moe_jax.models.decoding.generate`, and the row gains `cot` (the generated text, after the trigger), `all`
(prompt and generation decoded as one sequence, as the seed's `decode(output[0])`) and `cot_tail` (`all` with runs
of spaces collapsed); as in the seed, `cot` replaces the prompt field of that name. A T5 teacher reads the prompt
in its encoder and generates the continuation; `all` is then the prompt and the continuation decoded as one
sequence too. A row whose prompt does not fit `max_prompt_length`, or whose prompt or generation the tokenizer cannot
encode or decode, keeps `enhance_error` instead (and None in those three fields); nothing about one row stops the
run.

Output does not depend on batching or on interruptions:
- every row is sampled with its own key, `fold_in(PRNGKey(seed), row index)`, through a vmap of batch-1
  generations, and every prompt is padded to the same `max_prompt_length`, so a row's computation is the
  same whatever its batchmates and batch size (one compilation, too);
- rows are written in chunks of `chunk_size`, each an atomic file `OUTPUT.parts/part-NNNNN.jsonl` (`moe_jax.fs`);
  a rerun skips the chunks that exist and, when all do, writes OUTPUT as their concatenation (atomically). A kill
  at any moment leaves whole chunks or none, so the rerun's OUTPUT is byte for byte the uninterrupted run's.
- over processes (multi-host), chunk c is process c mod P's: each process generates its own chunks on a mesh of
  its local devices (no collective between processes, so uneven leftovers after a resume cannot deadlock), each
  batch's rows split over that mesh's batch axes, and writes its own part files; after a barrier process 0 writes
  OUTPUT. The output is the one-process output (tested with two processes).
`OUTPUT.parts/manifest.json` records what decides the rows (input file hash, teacher weights, field, sampling,
lengths, chunking); a rerun with other settings stops instead of mixing two runs' rows (`overwrite=True` starts
afresh).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.errors import ConfigError, MismatchError, MissingFileError
from moe_jax.models import decoding
from moe_jax.models.causal import causal_step_fn, init_cache
from moe_jax.models.interface import START_ID, is_decoder_only
from moe_jax.models.t5 import t5_step_fn
from moe_jax.teacher import formats
from moe_jax.teacher.lm import load_lm, model_config_for
from moe_jax.teacher.text import Codec
from moe_jax.training import partitioning as part

PARTS_SUFFIX = ".parts"
MANIFEST = "manifest.json"
OUTPUT_FIELDS = ("cot", "all", "cot_tail")


def part_path(parts_dir: str, chunk: int) -> str:
  return fs.join(parts_dir, f"part-{chunk:05d}.jsonl")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "temperature", "top_k", "top_p"))
def _generate_rows(model: nn.Module, params: Any, cache: Any, tokens: jax.Array, mask: jax.Array, keys: jax.Array,
                   *, max_new_tokens: int, eos_id: int, temperature: float, top_k: int,
                   top_p: float) -> jax.Array:
  """[B, max_new_tokens] tokens, each row generated alone (batch 1, its own key) under a vmap: a row's tokens
  are a function of the row, not of its batchmates. A causal LM continues its left-padded prompt (`cache` is its
  empty batch-1 cache); a T5 encodes its right-padded prompt and decodes from the start token."""
  def one(row_tokens: jax.Array, row_mask: jax.Array, key: jax.Array) -> jax.Array:
    if is_decoder_only(model):
      step_fn, start, prompt, prompt_mask = causal_step_fn(model, params), cache, row_tokens[None], row_mask[None]
    else:
      step_fn, start = t5_step_fn(model, params, row_tokens[None], max(max_new_tokens, 1))
      prompt = jnp.full((1, 1), START_ID, jnp.int32)
      prompt_mask = jnp.ones_like(prompt)
    return decoding.generate(step_fn, start, prompt, prompt_mask, max_new_tokens, eos_id,
                             rng=key if temperature > 0 else None, temperature=temperature, top_k=top_k,
                             top_p=top_p)[0]
  return jax.vmap(one)(tokens, mask, keys)


def _until_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
  hits = np.flatnonzero(tokens == eos_id)
  return [int(t) for t in tokens[:hits[0] if len(hits) else len(tokens)]]


def _file_hash(path: str) -> str:
  return hashlib.sha256(fs.read_bytes(path)).hexdigest()[:16]


def _start_parts(parts_dir: str, manifest: dict[str, Any], overwrite: bool) -> None:
  """Start the parts folder, or continue it when it was made with these settings. Every process checks (a
  mismatch stops them all alike); process 0 alone clears and writes, and the others wait for it."""
  path = fs.join(parts_dir, MANIFEST)
  found = json.loads(fs.read_text(path)) if fs.exists(path) else None
  if found is not None and found != manifest and not overwrite:
    differs = [k for k in sorted(set(found) | set(manifest)) if found.get(k) != manifest.get(k)]
    raise MismatchError(f"{parts_dir} holds rows of another enhance run (differs in: {', '.join(differs)}): rerun "
                        "with enhance.overwrite=True to start afresh, or choose another output_file")
  if found != manifest and jax.process_index() == 0:
    if found is not None:
      fs.remove(parts_dir)
    fs.write_text(path, json.dumps(manifest, sort_keys=True) + "\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"enhance parts {parts_dir}")


@gin.configurable
def enhance(input_file: str = gin.REQUIRED, output_file: str = gin.REQUIRED, teacher: str | None = None,
            model_config: Any = None, field: str = "cot", batch_size: int = 8,
            chunk_size: int = 64, max_prompt_length: int = 512, max_new_tokens: int = 256,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
            teacher_seed: int = 0, overwrite: bool = False) -> str:
  """Write `output_file` (JSON lines): the rows of `input_file` with the teacher's continuation of `field`.

  `teacher`: a HF causal LM or T5 directory, a multitask run dir of this package (bind `model_config`: a
  `CausalLMConfig` or a `T5Config`), or None for a random model of `teacher_seed` (tests). The seed samples
  (do_sample) with temperature 1 and 2048 new tokens; `temperature=0` is greedy. `batch_size` rows are generated
  at once and `chunk_size` rows make one resumable part; neither changes a row's output (see the module
  docstring), but a resumed run must keep `chunk_size`, which numbers the parts.
  """
  if batch_size <= 0 or chunk_size <= 0 or max_prompt_length <= 0 or max_new_tokens <= 0:
    raise ConfigError(f"enhance: batch_size={batch_size}, chunk_size={chunk_size}, max_prompt_length="
                      f"{max_prompt_length} and max_new_tokens={max_new_tokens} must be positive")
  rows = formats.read_rows(input_file)
  for number, row in enumerate(rows):
    if not isinstance(row.get(field), str):
      raise ConfigError(f"{input_file} row {number}: no text field {field!r} (prepare it with "
                        "`python -m moe_jax.teacher prepare`)")
  mesh = part.make_mesh(devices=jax.local_devices())  # generation needs no other process: see the docstring
  shards = part.batch_shards(mesh, part.axis_rules())
  if batch_size % shards:
    raise ConfigError(f"enhance.batch_size={batch_size} is not a multiple of the {shards} batch shards of this "
                      "process's mesh (make_mesh data x fsdp x expert)")
  model, params, weights, codec = load_lm(teacher, model_config_for(teacher, model_config), teacher_seed, mesh)
  parts_dir = output_file + PARTS_SUFFIX
  manifest = {"input_sha256": _file_hash(input_file), "rows": len(rows), "teacher_weights": weights,
              "field": field, "chunk_size": chunk_size, "max_prompt_length": max_prompt_length,
              "max_new_tokens": max_new_tokens, "temperature": float(temperature), "top_k": top_k,
              "top_p": float(top_p), "seed": seed}
  _start_parts(parts_dir, manifest, overwrite)

  cache = init_cache(model, 1, max_prompt_length + max_new_tokens) if is_decoder_only(model) else None
  sampling = dict(max_new_tokens=max_new_tokens, eos_id=codec.eos_id, temperature=float(temperature),
                  top_k=top_k, top_p=float(top_p))
  chunks = range(0, len(rows), chunk_size)
  mine = [start for start in chunks if (start // chunk_size) % jax.process_count() == jax.process_index()]
  todo = [start for start in mine if not fs.exists(part_path(parts_dir, start // chunk_size))]
  total = sum(min(chunk_size, len(rows) - start) for start in mine)
  done = total - sum(min(chunk_size, len(rows) - start) for start in todo)
  bar = tqdm(total=total, initial=done, desc=f"enhance {field} (process {jax.process_index()})", unit="example")
  batch = part.batch_sharding(mesh, part.axis_rules())
  try:
    for start in todo:
      out = _enhance_chunk(rows, range(start, min(start + chunk_size, len(rows))), field, model, params,
                           cache, codec, batch_size, max_prompt_length, seed, sampling, bar, batch)
      fs.write_text(part_path(parts_dir, start // chunk_size), formats.to_jsonl(out))
  finally:
    bar.close()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"enhance {output_file}")
  missing = [c for c in range(len(chunks)) if not fs.exists(part_path(parts_dir, c))]
  if missing:
    raise MissingFileError(f"{parts_dir}: chunks {missing[:5]} are missing after the run (another process removed "
                           "them?); rerun to make them")
  if jax.process_index() == 0:
    fs.write_text(output_file, "".join(fs.read_text(part_path(parts_dir, c)) for c in range(len(chunks))))
  return output_file


def _enhance_chunk(rows: list[dict[str, Any]], indices: range, field: str, model: nn.Module, params: Any, cache: Any,
                   codec: Codec, batch_size: int, max_prompt_length: int, seed: int, sampling: dict[str, Any],
                   bar: Any, sharding: Any) -> list[dict[str, Any]]:
  """The output rows of `indices`: fitting prompts generated `batch_size` at a time (the last batch padded with
  empty rows, so every batch has one shape), rows split over the devices by `sharding`, the others recorded with
  their error."""
  out: dict[int, dict[str, Any]] = {}
  prompts: list[tuple[int, list[int]]] = []
  causal = is_decoder_only(model)
  def failed(i: int, error: str) -> None:
    out[i] = {**rows[i], **dict.fromkeys(OUTPUT_FIELDS), "enhance_error": error}

  for i in indices:
    try:
      ids = list(codec.prefix) + codec.encode(rows[i][field])
    except Exception as e:  # pylint: disable=broad-except  (one row the tokenizer cannot read is not the run's end)
      failed(i, f"encoding the prompt failed: {type(e).__name__}: {e}")
      bar.update(1)
      continue
    if len(ids) + (0 if causal else 1) > max_prompt_length:
      failed(i, f"prompt has {len(ids)} tokens > max_prompt_length={max_prompt_length}")
      bar.update(1)
    else:
      prompts.append((i, ids))
  root = jax.random.PRNGKey(seed)
  for b in range(0, len(prompts), batch_size):
    batch = prompts[b:b + batch_size]
    tokens = np.zeros((batch_size, max_prompt_length), np.int32)
    mask = np.zeros((batch_size, max_prompt_length), np.int32)
    index = np.zeros((batch_size,), np.int32)
    for r, (i, ids) in enumerate(batch):
      if causal:  # left-padded: every row's next position is max_prompt_length
        tokens[r, max_prompt_length - len(ids):] = ids
        mask[r, max_prompt_length - len(ids):] = 1
      else:  # the encoder's input, right-padded, ending in EOS as T5's training inputs do
        tokens[r, :len(ids) + 1] = ids + [codec.eos_id]
        mask[r, :len(ids) + 1] = 1
      index[r] = i
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index))
    tokens, mask, keys = jax.device_put((tokens, mask, keys), sharding)
    generated = np.asarray(jax.device_get(_generate_rows(model, params, cache, tokens, mask, keys, **sampling)))
    for r, (i, ids) in enumerate(batch):
      new = _until_eos(generated[r], codec.eos_id)
      try:
        whole, cot = codec.decode(ids[len(codec.prefix):] + new), codec.decode(new)
      except Exception as e:  # pylint: disable=broad-except  (kept with its error, as an unreadable prompt is)
        failed(i, f"decoding the generation failed: {type(e).__name__}: {e}")
        continue
      out[i] = {**rows[i], "cot": cot, "all": whole, "cot_tail": formats.collapse_spaces(whole)}
    bar.update(len(batch))
  return [out[i] for i in indices]
