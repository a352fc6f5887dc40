"""The `fieldgate` command line: verbs -> exit codes (SPEC §1). Each verb lives in agent/verbs/<verb>.py."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import DEFAULT_CONFIG

# One line per verb, in the order `--help` lists them. Each module defines
# `register(subparsers)`, which adds its parser and sets `func=main(args) -> int`.
VERBS = [
    "run",
    "check",
    "schema",
    "read",
    "write",
    "scan",
    "status",
    "buffer",
    "commands",
    "decode",
    "demo",
    "reload",
    "diff",
    "migrate",
]


def default_config() -> Path:
    return Path(os.environ.get("FIELDGATE_CONFIG") or DEFAULT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldgate", description="Edge-gateway agent for field equipment.")
    parser.add_argument("--version", action="version", version=f"fieldgate {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $FIELDGATE_CONFIG, else /etc/fieldgate/fieldgate.yaml)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"agent.verbs.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name != f"agent.verbs.{verb}":
                raise
            continue  # verb not built yet
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "config", "absent") is None:
        args.config = default_config()
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
