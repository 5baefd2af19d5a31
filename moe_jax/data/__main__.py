"""`python -m moe_jax.data prepare p3|flan|bigbench --out DIR`: lay out a dataset under a data root.

Downloading needs the network (the Hugging Face hub); `prepare flan --source DIR` only splits a local copy of the
FLAN collection release and works offline. Afterwards train and evaluate with `--gin.DATA_DIR=DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

P3_REPO, FLAN_REPO = "bigscience/P3", "Open-Orca/FLAN"
BIGBENCH_REPO, BBH_REPO = "tasksource/bigbench", "lukaemon/bbh"


def _download(repo: str, local_dir: str, patterns: Sequence[str] | None = None) -> str:
  from huggingface_hub import snapshot_download

  print(f"downloading {repo} to {local_dir} ...")
  return snapshot_download(repo_id=repo, repo_type="dataset", local_dir=local_dir, allow_patterns=patterns)


def prepare_p3(out: str) -> None:
  """The P3 configs of the T0 held-in pool, the T0 held-out sets and the FLAN pool's extra P3 datasets."""
  from tasks import p3

  prefixes = sorted({p for d in p3.DATASETS.values() for p in d.prefixes})
  _download(P3_REPO, os.path.join(out, "p3"), [f"data/{p}_*" for p in prefixes])


def prepare_flan(out: str, source: str | None, niv2_categories: str | None) -> None:
  from tasks import flan

  if source is None:
    source = _download(FLAN_REPO, os.path.join(out, ".flan_release"))
  counts = flan.split_release(source, out, niv2_categories)
  print(json.dumps({name: dict(c) for name, c in sorted(counts.items())}, indent=1))
  missing = [m for m in flan.MEMBERS.values() if m not in counts]
  if missing:
    print(f"warning: {len(missing)} pool members got no rows: {missing}")


def prepare_bigbench(out: str) -> None:
  import datasets

  from tasks import bigbench

  for task in {t.name: t for suite in bigbench.SUITES.values() for t in suite}.values():
    if task.bbh_choices is not None:
      rows = datasets.load_dataset(BBH_REPO, task.name, split="test")
      rows.to_json(os.path.join(out, "bbh", f"{task.name}.jsonl"))
    else:
      for split, rows in datasets.load_dataset(BIGBENCH_REPO, task.name).items():
        rows.to_json(os.path.join(out, "bigbench", task.name, f"{split}.jsonl"))


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  prepare = commands.add_parser("prepare", help="download and lay out a dataset under --out")
  prepare.add_argument("dataset", choices=("p3", "flan", "bigbench"))
  prepare.add_argument("--out", required=True, help="the data root (DATA_DIR)")
  prepare.add_argument("--source", help="flan: a local copy of the FLAN collection release to split (no download)")
  prepare.add_argument("--niv2_categories", help="flan: NIV2 task -> category JSON, or a natural-instructions "
                       "tasks/ folder")
  args = parser.parse_args(argv)
  if args.dataset != "flan" and (args.source or args.niv2_categories):
    parser.error("--source and --niv2_categories apply to `prepare flan` only")
  if args.source and not os.path.isdir(args.source):
    parser.error(f"--source {args.source!r} is not a folder")
  os.makedirs(args.out, exist_ok=True)
  if args.dataset == "p3":
    prepare_p3(args.out)
  elif args.dataset == "flan":
    prepare_flan(args.out, args.source, args.niv2_categories)
  else:
    prepare_bigbench(args.out)
  print(f"done: use --gin.DATA_DIR={os.path.abspath(args.out)!r}")


if __name__ == "__main__":
  main(sys.argv[1:])
