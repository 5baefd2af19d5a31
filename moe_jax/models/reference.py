"""Float64 NumPy oracles for routing and routed LoRA, written from the published formulas, independent of JAX."""

from __future__ import annotations

import numpy as np


def standardize(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def phatgoose_routing(x: np.ndarray, gates: np.ndarray, k: int, eps: float = 1e-5):
  """PHATGOOSE as in the reference code: softmax over all experts, top-k, renormalise with a 1e-6 epsilon.

  Returns ([T, k] expert ids, [T, k] weights). Ties go to the lower expert index.
  """
  scores = standardize(x, eps) @ standardize(gates, eps).T / np.sqrt(x.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  top = np.take_along_axis(probs, experts, -1)
  return experts, top / (top.sum(-1, keepdims=True) + 1e-6)


def routed_lora(x: np.ndarray, a: np.ndarray, b: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Dense loop over tokens and chosen experts: sum_s w[t,s] * x[t] @ A[e] @ B[e], in float64."""
  x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
  out = np.zeros((x.shape[0], b.shape[-1]))
  for t in range(x.shape[0]):
    for e, w in zip(experts[t], weights[t]):
      out[t] += w * (x[t] @ a[e] @ b[e])
  return out
