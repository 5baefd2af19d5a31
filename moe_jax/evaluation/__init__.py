"""Evaluation: rank-classification scores and greedy decoding (JAX), task metrics and result files.

Importing this package does not import TensorFlow: `evaluate_task` imports seqio when it is called.
"""

from moe_jax.evaluation.evaluate import evaluate_task, write_results
from moe_jax.evaluation.scoring import choice_log_likelihoods, greedy_generate, pad_tokens, rank_classify

__all__ = ["evaluate_task", "write_results", "choice_log_likelihoods", "greedy_generate", "pad_tokens",
           "rank_classify"]
