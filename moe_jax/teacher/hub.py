"""TeacherLM's four evaluation benchmarks from the Hugging Face hub, prepared under a data root:
`python -m moe_jax.teacher download --benchmark mmlu creak ecqa strategyqa --data_root DIR`.

Each benchmark is one `datasets.load_dataset(hub id, config, split=...)` call (`HUB_SOURCES`), turned into prepared
rows by its `moe_jax.teacher.formats` kind and written atomically to `DIR/teacherlm/<benchmark>/<split>.jsonl`, the
layout `evaluate_students(eval_sets=[...], data_root=DIR)` reads. Where the hub is out of reach, the same file comes
from a copy made elsewhere: `datasets.load_dataset(...).save_to_disk(COPY)` on a machine that reaches the hub, then
`python -m moe_jax.teacher prepare --dataset COPY --kind <kind> --out DIR/teacherlm/<benchmark>/<split>.jsonl`.

The sources are the seed's where it names one (CREAK: amydeng2000/CREAK) and public copies with the seed's columns
otherwise: cais/mmlu "all" (question, subject, choices, answer index), tasksource/ecqa (q_text, q_op1..q_op5, q_ans;
its test split is ECQA's 2,194 questions, the seed's cqa_data_test.csv), wics/strategy-qa (question, boolean answer;
its one split, "test", is StrategyQA's 2,290 labelled questions, the seed's evaluation set). The seed scores MMLU on
its validation split; `--split validation` gives that, the default follows the common test-split report.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from moe_jax import fs
from moe_jax.errors import ConfigError, MissingFileError
from moe_jax.teacher import formats

LAYOUT_DIR = "teacherlm"  # DATA_ROOT/teacherlm/<benchmark>/<split>.jsonl


class HubSource(NamedTuple):
  """Where a benchmark lives on the hub and which `formats` kind reads its columns."""

  hub_id: str
  config: str | None
  split: str  # the split the paper reports (the default of `download` and of `evaluate_students(eval_sets=...)`)
  kind: str


HUB_SOURCES: dict[str, HubSource] = {
    "mmlu": HubSource("cais/mmlu", "all", "test", "mmlu"),  # 57 subjects: question, subject, choices, answer
    "creak": HubSource("amydeng2000/CREAK", None, "validation", "creak"),  # sentence, label ("true"/"false")
    "ecqa": HubSource("tasksource/ecqa", None, "test", "ecqa"),  # q_text, q_op1..q_op5, q_ans (text)
    "strategyqa": HubSource("wics/strategy-qa", None, "test", "strategyqa"),  # question, answer (bool)
}


class HubUnreachableError(MissingFileError):
  """A benchmark could not be loaded from the hub (no network, a gated or moved dataset); the message says how to
  get the same prepared file from a local copy."""


def source(benchmark: str) -> HubSource:
  if benchmark not in HUB_SOURCES:
    raise ConfigError(f"benchmark {benchmark!r}; expected one of {sorted(HUB_SOURCES)}")
  return HUB_SOURCES[benchmark]


def prepared_path(data_root: str, benchmark: str, split: str | None = None) -> str:
  """The prepared file of `benchmark`'s `split` (default: the paper's) under `data_root`."""
  return fs.join(data_root, LAYOUT_DIR, benchmark, f"{split or source(benchmark).split}.jsonl")


def _load_call(src: HubSource, split: str) -> str:
  config = "" if src.config is None else f", {src.config!r}"
  return f"datasets.load_dataset({src.hub_id!r}{config}, split={split!r})"


def offline_recipe(data_root: str, benchmark: str, split: str | None = None) -> str:
  """What to run where the hub is out of reach: the copy to make elsewhere and the `prepare` that lays it out."""
  src = source(benchmark)
  split = split or src.split
  return (f"on a machine that reaches the hub run {_load_call(src, split)}.save_to_disk(COPY), copy COPY here and "
          f"run `python -m moe_jax.teacher prepare --dataset COPY --kind {src.kind} "
          f"--out {prepared_path(data_root, benchmark, split)}`")


def load_rows(benchmark: str, split: str | None = None, data_root: str = "DATA_ROOT") -> Any:
  """The raw split as `datasets.load_dataset` gives it (downloaded, or from the `datasets` cache). Network and
  hub failures (all OSError: ConnectionError, DatasetNotFoundError, HTTP errors) become one line with the offline
  recipe; an unknown split or config (ValueError) one line naming it."""
  import datasets  # pylint: disable=g-import-not-at-top
  src = source(benchmark)
  split = split or src.split
  try:
    return datasets.load_dataset(src.hub_id, src.config, split=split)
  except OSError as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise HubUnreachableError(f"cannot load {benchmark} from the Hugging Face hub ({_load_call(src, split)}: "
                              f"{reason}); {offline_recipe(data_root, benchmark, split)}") from None
  except ValueError as e:
    raise ConfigError(f"{benchmark}: {_load_call(src, split)} failed: {' '.join(str(e).split())}") from None


def download(benchmark: str, data_root: str, split: str | None = None) -> tuple[str, int]:
  """Load `benchmark`'s split from the hub and write its prepared rows (atomically) to `prepared_path`; returns the
  path and the row count. The rows are prepared in full before anything is written, so a failure leaves no file."""
  src = source(benchmark)
  split = split or src.split
  rows = list(formats.prepare_rows(load_rows(benchmark, split, data_root), src.kind))
  path = prepared_path(data_root, benchmark, split)
  fs.write_text(path, formats.to_jsonl(rows))
  return path, len(rows)
