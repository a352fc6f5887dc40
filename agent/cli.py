"""The `fieldgate` command line: verbs -> exit codes (SPEC §1). Each verb lives in agent/verbs/<verb>.py."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__

DEFAULT_CONFIG = Path("/etc/fieldgate/fieldgate.yaml")


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
    "fleet",
]


def default_config() -> Path:
    return Path(os.environ.get("FIELDGATE_CONFIG") or DEFAULT_CONFIG)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb, or of `only` that one (its module alone is imported: faster start, less RSS)."""
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
        if only is not None and verb != only:
            continue
        try:
            module = importlib.import_module(f"agent.verbs.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name != f"agent.verbs.{verb}":
                raise
            continue  # verb not built yet
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_in if not a.startswith("-")), None)
    # `fieldgate run ...` imports the run verb only; `--help`, `--version` or a typo build every verb.
    only = first if first in VERBS and "--version" not in args_in else None
    if first == "run":
        from agent.verbs.run import pause_gc_for_start_up, take_signals_for_start_up

        take_signals_for_start_up()  # before anything slow: a stop during start-up is a clean stop
        pause_gc_for_start_up()
    from agent.config import modelkit

    # The one choice of the process's config model kit, before any config module is imported: the daemon
    # runs on plain models (it validates in a child), every other verb on pydantic (agent/config/modelkit.py).
    modelkit.select("plain" if first == "run" else "pydantic")
    parser = build_parser(only)
    try:
        args = parser.parse_args(args_in)
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
