"""Model-Based Clustering end to end (`python -m moe_jax.train --gin_file=gin/mbc.gin`): cluster a library's experts
by their weights (`moe_jax.methods.mbc`), train one expert and its gate per cluster on the union of the cluster's
tasks, from the backbone the clustered experts were trained on, and write them as a new library
(`mbc_cluster_<i>`, tagged "mbc"), which every method of the PHATGOOSE pipeline can then route or merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax

from moe_jax import fs
from moe_jax.errors import MismatchError
from moe_jax.library import Expert, ExpertLibrary
from moe_jax.methods import mbc
from moe_jax.methods.pipeline import expert_identity, library_expert
from moe_jax.models.config import ExpertConfig, T5Config
from moe_jax.models.interface import build_model
from moe_jax.training import loop
from moe_jax.training import partitioning as part


@gin.configurable(denylist=["gin_config_str"])
def mbc_experts(library: str = gin.REQUIRED, output_library: str = gin.REQUIRED, run_dir: str = gin.REQUIRED,
                k: int = 10, names: Sequence[str] | None = None, keep: float = 0.2, dims: int = 64, seed: int = 42,
                expert_steps: int = 1000, gate_steps: int = 100, model_config: Any = None,
                experts: ExpertConfig | None = None, feature_lengths: Mapping[str, int] | None = None,
                train_seed: int | None = None, gin_config_str: str = "") -> str:
  """Cluster `names` (default: every expert) of `library` into `k` clusters and add one gated expert per cluster to
  `output_library`, trained under `run_dir` (seeded by `train_seed`, default `train.seed`); returns
  `output_library`. Clusters whose expert the output library already holds with the same identity are not
  retrained. Each cluster's task union is registered as the seqio mixture `mbc_cluster_<i>`."""
  from tasks import common as task_common  # pylint: disable=g-import-not-at-top  (seqio)

  source = ExpertLibrary(library, read_only=True)
  chosen = source.select(names)
  backbones = {(source.info(n).backbone or {}).get("weights"): n for n in chosen}
  if len(backbones) != 1:
    raise MismatchError(f"{library}: the experts to cluster were trained on {len(backbones)} backbones "
                        f"({sorted(backbones.values())[:3]}...); cluster one backbone's experts")
  record = source.info(chosen[0]).backbone or {}
  clusters = mbc.library_clusters(source, k, chosen, keep, dims, seed)
  mixtures = mbc.cluster_mixtures(clusters, lambda name: list(source.info(name).tasks) or [name])
  config = model_config or T5Config()
  lengths = dict(feature_lengths or {"inputs": 512, "targets": 128})
  mesh, rules = part.make_mesh(), part.axis_rules()
  backbone = loop.load_backbone(record.get("source"), config, part.logical_shardings(
      part.abstract_params(build_model(config)), mesh, rules))
  if backbone.weights != record.get("weights"):
    raise MismatchError(f"the backbone at {record.get('source')} has weights {backbone.weights}, but the experts of "
                        f"{library} were trained on {record.get('weights')}")
  output = ExpertLibrary(output_library)
  common = dict(model_config=config, feature_lengths=lengths, init_from=record.get("source"), experts=experts,
                backbone=backbone, gin_config_str=gin_config_str)
  if train_seed is not None:
    common["seed"] = train_seed
  for name, cluster_tasks in mixtures.items():
    task_common.add_mixture(name, cluster_tasks)
    identity_hash = expert_identity(backbone, name, config, experts, expert_steps, gate_steps, lengths, train_seed)
    if name in output and output.info(name).identity == identity_hash:
      continue
    expert_dir = fs.join(run_dir, name, "expert")
    loop.train(model_dir=expert_dir, mixture_or_task_name=name, stage="expert", total_steps=expert_steps, **common)
    gate_file = loop.train(model_dir=fs.join(run_dir, name, "gate"), mixture_or_task_name=name, stage="gate",
                           total_steps=gate_steps, expert_from=expert_dir, **common)
    if jax.process_index() == 0:
      expert = library_expert(name, expert_dir, gate_file, identity_hash, gin_config_str)
      members = clusters[int(name.rsplit("_", 1)[1])]
      info = dataclasses.replace(expert.info, tasks=tuple(cluster_tasks), tags=("mbc", *expert.info.tags),
                                 parent=",".join(members))  # the clustered experts it stands for
      (output.replace if name in output else output.add)(Expert(info, expert.weights))
  return output_library
