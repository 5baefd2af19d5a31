"""Where a product came from: the backbone's weight identity and a hash of the run's effective configuration.

The architecture fingerprint (`T5Config.fingerprint`) cannot tell t5-xl-lm-adapt, T0-3B and FLAN-T5-XL apart: same
shapes, other weights. `weights_checksum` can: a checksum of every tensor, computed once per load, on the device
where the tensors already are (a jitted integer reduction, so it costs one pass over the weights and never gathers
a sharded tree to a host) and independent of how the tree is sharded (integer sums do not depend on order).

Each element's float32 bit pattern is mixed with its flat index (a MurmurHash3-style finaliser) and summed modulo
2^32 in two independent lanes; the per-leaf sums, paths, shapes and dtypes are hashed with SHA-256. It detects any
changed, moved or swapped value with overwhelming probability; it is not meant to resist an adversary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

_LANES = ((0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35), (0x7FEB352D, 0x846CA68B, 0x27D4EB2F))


def _mix(bits: jax.Array, index: jax.Array, lane: tuple[int, int, int]) -> jax.Array:
  golden, m1, m2 = (jnp.uint32(c) for c in lane)
  h = bits ^ (index * golden)
  h = h ^ (h >> 16)
  h = h * m1
  h = h ^ (h >> 13)
  h = h * m2
  return h ^ (h >> 16)


@jax.jit
def _leaf_sums(x: jax.Array) -> jax.Array:
  """[2] uint32: the two lanes' sums over one tensor."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
  index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  return jnp.stack([jnp.sum(_mix(bits, index, lane), dtype=jnp.uint32) for lane in _LANES])


def weights_checksum(params: Any) -> str:
  """16 hex digits identifying the values of a parameter tree (device or host arrays, any sharding).

  Values are read as float32, so a bf16 checkpoint has the same checksum loaded as bf16 or as float32."""
  flat = flax.traverse_util.flatten_dict(params)
  digest = hashlib.sha256()
  sums = {key: _leaf_sums(value) for key, value in sorted(flat.items())}  # dispatched together, fetched once
  for key, value in jax.device_get(sums).items():
    leaf = flat[key]
    digest.update(json.dumps(["/".join(key), list(leaf.shape)]).encode())
    digest.update(np.asarray(value, np.uint32).tobytes())
  return digest.hexdigest()[:16]


def plain(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record as it reads back from JSON metadata (tuples become lists, other values their str), so a record built
  in Python compares equal to the one a file stored."""
  return json.loads(json.dumps(record, sort_keys=True, default=str))


def config_hash(record: Mapping[str, Any]) -> str:
  """16 hex digits of a JSON-able record (sorted keys): equal records, equal hashes."""
  return hashlib.sha256(json.dumps(plain(record), sort_keys=True).encode()).hexdigest()[:16]


def differences(found: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
  """`key: found -> expected` for every leaf that differs between two nested records, in key order."""
  out = []
  for key in sorted(set(found) | set(expected)):
    a, b = found.get(key, "<absent>"), expected.get(key, "<absent>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out
