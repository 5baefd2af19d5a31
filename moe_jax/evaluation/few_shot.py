"""Few-shot transfer, as CrossFit and Task-level MoE report it: fine-tune a model on each (task, seed) few-shot run,
score it on the task's test set, and compare two models (a base, e.g. multi-task BART, and a new one) per task by
the mean and std over seeds and overall by ARG, the average relative gain: mean over tasks of (new - base) / base.

The grid of runs (`few_shot_transfer`) is long (160 tasks x 5 seeds in CrossFit), so it records every finished
score in a JSON file as soon as it has it, written atomically (`moe_jax.fs`), and a restarted grid skips what that
file holds. The file, `{"<task>": {"<seed>": score, ...}, ...}`, is also what `read_scores` gives the report.
Nothing here touches a model or TensorFlow: `train_and_score` brings the fine-tuning and the scoring.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from moe_jax import fs
from moe_jax.errors import ConfigError, MismatchError

Scores = dict[tuple[str, int], float]  # (task, seed) -> test score


def read_scores(path: str) -> Scores:
  """The scores a `few_shot_transfer` results file holds."""
  try:
    raw = json.loads(fs.read_text(path))
    return {(task, int(seed)): float(score) for task, by_seed in raw.items() for seed, score in by_seed.items()}
  except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
    raise ConfigError(f"{path}: expected few-shot scores as JSON {{\"<task>\": {{\"<seed>\": score}}}}") from None


def write_scores(path: str, scores: Mapping[tuple[str, int], float]) -> None:
  """Write scores atomically: a reader (or a resumed grid) sees the previous file or this one, never part."""
  nested: dict[str, dict[str, float]] = defaultdict(dict)
  for (task, seed), score in scores.items():
    nested[task][str(seed)] = float(score)
  fs.write_text(path, json.dumps(nested, indent=1, sort_keys=True) + "\n")


def few_shot_transfer(train_and_score: Callable[[str, int], float], tasks: Sequence[str], seeds: Sequence[int],
                      results_path: str | None = None) -> Scores:
  """Score every (task, seed) with `train_and_score(task, seed)` (fine-tune on the run, return its test score),
  tasks outer, seeds inner, behind a progress bar. With `results_path`, runs already in that file are not run again
  and each new score is saved before the next run starts; scores of other runs in the file are kept.
  Returns the grid's scores."""
  scores = read_scores(results_path) if results_path and fs.exists(results_path) else {}
  grid = [(task, int(seed)) for task in tasks for seed in seeds]
  todo = [run for run in grid if run not in scores]
  with tqdm(total=len(grid), initial=len(grid) - len(todo), desc="few-shot transfer", unit="run") as bar:
    for task, seed in todo:
      bar.set_postfix_str(f"{task} seed {seed}")
      scores[(task, seed)] = float(train_and_score(task, seed))
      if results_path:
        write_scores(results_path, scores)
      bar.update()
  return {run: scores[run] for run in grid}


def _by_task(scores: Mapping[tuple[str, int], float]) -> dict[str, dict[int, float]]:
  grouped: dict[str, dict[int, float]] = defaultdict(dict)
  for (task, seed), score in scores.items():
    grouped[task][seed] = score
  return grouped


def _check_same_runs(base: Mapping[tuple[str, int], float], new: Mapping[tuple[str, int], float]) -> None:
  """Both models must be scored on the same (task, seed) runs, or the means would compare different samples."""
  only_base, only_new = sorted(set(base) - set(new)), sorted(set(new) - set(base))
  if only_base or only_new:
    raise MismatchError(f"the two models were scored on different runs: base only {only_base[:5]}, "
                        f"new only {only_new[:5]} ({len(only_base)} and {len(only_new)} in all)")
  if not base:
    raise ConfigError("no few-shot scores to compare")


def transfer_report(base: Mapping[tuple[str, int], float], new: Mapping[tuple[str, int], float]) -> dict:
  """Per task, each model's mean and std over seeds (population std, numpy's default, as CrossFit's
  collect_results.py) and the relative gain (new - base) / base of the means; overall, ARG, the mean of the gains
  (Task-level MoE's compute_arg.py). All in float64. A task whose base mean is 0 has no relative gain: an error.
  A negative base mean (a correlation metric) flips the gain's sign, as the formula does in the paper."""
  _check_same_runs(base, new)
  base_by, new_by = _by_task(base), _by_task(new)
  report_tasks = {}
  for task in sorted(base_by):
    seeds = sorted(base_by[task])
    b = np.array([base_by[task][s] for s in seeds], np.float64)
    n = np.array([new_by[task][s] for s in seeds], np.float64)
    if b.mean() == 0:
      raise ConfigError(f"task {task!r}: the base model's mean score is 0, so (new - base) / base is undefined")
    report_tasks[task] = {"seeds": seeds, "base_mean": float(b.mean()), "base_std": float(b.std()),
                          "new_mean": float(n.mean()), "new_std": float(n.std()),
                          "relative_gain": float((n.mean() - b.mean()) / b.mean())}
  gains = np.array([t["relative_gain"] for t in report_tasks.values()], np.float64)
  return {"arg": float(gains.mean()), "num_tasks": len(report_tasks), "tasks": report_tasks}


def transfer_markdown(report: Mapping) -> str:
  """A `transfer_report` as a markdown table: mean ± std per model, the relative gain and ARG in percent."""
  rows = ["| task | seeds | base | new | relative gain |", "|---|---|---|---|---|"]
  for task, t in report["tasks"].items():
    rows.append(f"| {task} | {len(t['seeds'])} | {t['base_mean']:.2f} ± {t['base_std']:.2f} | "
                f"{t['new_mean']:.2f} ± {t['new_std']:.2f} | {100 * t['relative_gain']:+.2f}% |")
  rows.append(f"| **ARG** ({report['num_tasks']} tasks) | | | | {100 * report['arg']:+.2f}% |")
  return "\n".join(rows) + "\n"
