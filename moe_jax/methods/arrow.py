"""Arrow prototypes: per expert module, the input direction that the expert's LoRA update changes most.

Expert i's update at a module is x -> x A_i B_i / r (`moe_jax.models.lora`: A [d_in, r], B [r, d_out]). Its
prototype is the unit vector u in the input space maximising |u A_i B_i|: the top left singular vector of the
[d_in, d_out] matrix A_i B_i, which is MTTL's top right-singular vector of B^T A^T in torch's [d_out, d_in] layout.
The 1/r scale (any positive LoRA scale) changes no singular vector, so it is left out, as MTTL does. The `Arrow`
router (`moe_jax.models.routers.Arrow`) scores a token by |<x, u_i>|.

The SVD works on the rank-r factors, never on the d_in x d_out product: A = Q_A R_A and B^T = Q_B R_B (reduced QR),
so A B = Q_A (R_A R_B^T) Q_B^T and the top left singular vector of A B is Q_A times that of the small core
R_A R_B^T (at most r x r). This is exact for any r, d_in and d_out (r > d_in or r > d_out shrinks the core) and for
rank-deficient factors (Householder QR keeps Q orthonormal when R is singular). It is done on the host in float64:
prototypes are computed once per library, and float32 SVDs lose digits when the top singular values are close.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.errors import MismatchError
from moe_jax.methods.registry import Experts, Method, register
from moe_jax.models.routers import Arrow

Params = dict[str, Any]


def _canonical_sign(u: np.ndarray) -> np.ndarray:
  """u [E, d] with each row's largest-magnitude entry made positive (the first such entry on an exact tie).

  The SVD fixes singular vectors only up to sign; Arrow's |<x, u>| ignores it, but a fixed convention makes the
  prototypes reproducible across LAPACK builds and comparable in tests and files."""
  rows = np.arange(u.shape[0])
  sign = np.sign(u[rows, np.argmax(np.abs(u), axis=-1)])
  return u * np.where(sign == 0, 1.0, sign)[:, None]


def arrow_prototypes(lora_a, lora_b):
  """Prototypes [E, d_in] of E experts from lora_a [E, d_in, r] and lora_b [E, r, d_out] (NumPy or JAX arrays).

  Row i is the unit top left singular vector of A_i B_i, signed so that its largest-magnitude entry is positive. An
  expert whose update is exactly zero (B = 0, as freshly initialised) has no preferred direction and gets a zero
  row, so Arrow scores it 0 on every token (MTTL would return an arbitrary unit vector of span(A)).

  Computed in float64; returned as the kind of array given (a `jax.Array` if `lora_a` is one, else NumPy), in
  float32, or float64 when both inputs are float64. A host computation (NumPy LAPACK), not traceable under jit.
  Raises MismatchError when the shapes do not fit together.
  """
  a, b = np.asarray(lora_a), np.asarray(lora_b)
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
    raise MismatchError(f"arrow_prototypes: lora_a {a.shape} and lora_b {b.shape} are not [E, d_in, r] and "
                        "[E, r, d_out]")
  q_a, r_a = np.linalg.qr(a.astype(np.float64))  # [E, d_in, ka], [E, ka, r]; ka = min(d_in, r)
  _, r_b = np.linalg.qr(np.swapaxes(b.astype(np.float64), 1, 2))  # B^T [E, d_out, r] -> R_B [E, kb, r]
  core = r_a @ np.swapaxes(r_b, 1, 2)  # [E, ka, kb]
  u_core, s, _ = np.linalg.svd(core)  # singular values descending
  u = np.einsum("edk,ek->ed", q_a, u_core[:, :, 0])
  u = np.where(s[:, :1] > 0, _canonical_sign(u), 0.0)
  dtype = np.float64 if a.dtype == np.float64 and b.dtype == np.float64 else np.float32
  u = u.astype(dtype)
  return jnp.asarray(u) if isinstance(lora_a, jax.Array) else u


def arrow_routers(moe_tree: Params) -> Params:
  """Router tree {module path parts: {"router": [E, d_in] float32 NumPy}} of every module of `moe_tree` that holds
  `lora_a` and `lora_b` (any nesting, e.g. the expert tree of `moe_jax.models.experts.split`).

  `moe_jax.models.experts.merge(moe_tree, arrow_routers(moe_tree))` gives the tree an `Arrow` router reads, as
  `average_activation_routers` does for its router vectors.
  """
  flat = flax.traverse_util.flatten_dict(moe_tree)
  modules = sorted({key[:-1] for key in flat if key[-1] == "lora_a"})
  if not modules:
    raise MismatchError("arrow_routers: the tree has no lora_a leaves")
  routers = {}
  for path in modules:
    if path + ("lora_b",) not in flat:
      raise MismatchError(f"arrow_routers: {'/'.join(path)} has lora_a but no lora_b")
    routers[path + ("router",)] = np.asarray(
        arrow_prototypes(np.asarray(flat[path + ("lora_a",)]), np.asarray(flat[path + ("lora_b",)])), np.float32)
  return flax.traverse_util.unflatten_dict(routers)


@register("arrow", auxiliary=("arrow_prototypes",))
def build_arrow(experts: Experts) -> Method:
  """Every expert behind the Arrow router, its prototypes cached in the library."""
  routers = experts.per_expert_routers("arrow_prototypes", {}, lambda i, task: arrow_routers(
      jax.tree.map(np.asarray, experts.one_expert(i))))
  return experts.routed(Arrow(k=experts.top_k), routers)
