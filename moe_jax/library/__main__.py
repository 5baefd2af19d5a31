"""Look after an expert library from the shell.

  python -m moe_jax.library list URI [--json] [--removed] [--tag T]
  python -m moe_jax.library show URI NAME [--json]
  python -m moe_jax.library copy SOURCE TARGET [--name NAME ...]
  python -m moe_jax.library remove URI NAME [--purge]
  python -m moe_jax.library restore URI NAME
  python -m moe_jax.library rename URI OLD NEW
  python -m moe_jax.library import --peft DIR --library URI --name NAME [--backbone HF_DIR] [--task T] [--tag T]
  python -m moe_jax.library export --peft DIR --library URI --name NAME

URI: local://PATH (or a path), virtual://NAME, gs://BUCKET/PATH, hf://USER/REPO. Credentials come from the
environment (HF_TOKEN, Google application credentials), never from flags. Set MOE_JAX_DEBUG=1 for tracebacks of
input errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from moe_jax import gin_utils
from moe_jax.library.library import ExpertLibrary, copy_library


def _size(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def _rows(library: ExpertLibrary, removed: bool, tags: Sequence[str]) -> list[dict[str, Any]]:
  rows = []
  for entry in library.entries(include_removed=removed):
    info = entry.info
    if tags and not set(tags) <= set(info.tags):
      continue
    backbone = info.backbone or {}
    rows.append({"name": info.name, "task": ",".join(info.tasks), "rank": info.rank,
                 "modules": len(info.modules.split("|")) if info.modules else 0,
                 "backbone": f"{backbone.get('model', '?')} {str(backbone.get('weights') or '')[:8]}".strip(),
                 "size": entry.size, "tags": list(info.tags), "removed": entry.removed})
  return rows


def _table(rows: list[dict[str, Any]]) -> str:
  columns = ["name", "task", "rank", "modules", "backbone", "size"] + (["removed"] if any(r["removed"] for r in rows)
                                                                        else [])
  cells = [[str(_size(r[c]) if c == "size" else (r[c] or "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
  line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
  return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.library", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("list", help="the experts, as a table or JSON")
  p.add_argument("uri")
  p.add_argument("--json", action="store_true")
  p.add_argument("--removed", action="store_true", help="include removed experts")
  p.add_argument("--tag", action="append", default=[], help="only experts with this tag (repeatable)")
  p = sub.add_parser("show", help="one expert's info and auxiliary data")
  p.add_argument("uri")
  p.add_argument("name")
  p.add_argument("--json", action="store_true")
  p = sub.add_parser("copy", help="copy experts with their auxiliary data to another library")
  p.add_argument("source")
  p.add_argument("target")
  p.add_argument("--name", action="append", default=None, help="only this expert (repeatable)")
  for command in ("remove", "restore"):
    p = sub.add_parser(command, help=f"{command} an expert" + (" (soft; --purge deletes)" if command == "remove"
                                                                 else ""))
    p.add_argument("uri")
    p.add_argument("name")
    if command == "remove":
      p.add_argument("--purge", action="store_true")
  p = sub.add_parser("rename")
  p.add_argument("uri")
  p.add_argument("old")
  p.add_argument("new")
  for command in ("import", "export"):
    p = sub.add_parser(command, help=f"{command} a Hugging Face PEFT LoRA adapter")
    p.add_argument("--peft", required=True, metavar="DIR", help="the adapter directory")
    p.add_argument("--library", required=True, metavar="URI")
    p.add_argument("--name", required=True)
    p.add_argument("--backbone", metavar="HF_DIR",
                   help="the Hugging Face T5 directory the adapter is for (records its weights and vocabulary)")
    if command == "import":
      p.add_argument("--task", action="append", default=[])
      p.add_argument("--tag", action="append", default=[])
  return parser


def run(args: argparse.Namespace) -> None:
  if args.command == "list":
    rows = _rows(ExpertLibrary(args.uri, read_only=True), args.removed, args.tag)
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
  elif args.command == "show":
    library = ExpertLibrary(args.uri, read_only=True)
    record = {**library.info(args.name).to_json(), "auxiliary": library.auxiliary_entries(args.name)}
    if not args.json:
      record.pop("gin_config", None)  # long; --json has it
    print(json.dumps(record, indent=1))
  elif args.command == "copy":
    copied = copy_library(args.source, args.target, names=args.name)
    print(f"copied {len(copied)} expert(s) to {args.target}")
  elif args.command in ("remove", "restore"):
    library = ExpertLibrary(args.uri)
    library.remove(args.name, purge=args.purge) if args.command == "remove" else library.restore(args.name)
    print(f"{args.command}d {args.name}")
  elif args.command == "rename":
    ExpertLibrary(args.uri).rename(args.old, args.new)
    print(f"renamed {args.old} to {args.new}")
  elif args.command == "import":
    from moe_jax.library import interop  # pylint: disable=g-import-not-at-top
    interop.import_peft_expert(args.peft, ExpertLibrary(args.library), args.name, args.backbone, args.task, args.tag)
    print(f"imported {args.peft} as {args.name} into {args.library}")
  elif args.command == "export":
    from moe_jax.library import interop  # pylint: disable=g-import-not-at-top
    interop.export_peft_expert(ExpertLibrary(args.library, read_only=True), args.name, args.peft, args.backbone)
    print(f"exported {args.name} to {args.peft}")


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  gin_utils.run_job(lambda: run(args))


if __name__ == "__main__":
  main()
