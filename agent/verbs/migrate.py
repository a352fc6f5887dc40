"""`fieldgate migrate`: convert a config file of an older format version; print the diff, write on --write."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from agent.config.migrate import CURRENT_VERSION, MigrationError, migrate_text, unified_diff
from agent.errors import ConfigError
from agent.safefiles import read_regular


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "migrate",
        parents=[common],
        help="convert a config file to the current format version (prints the diff)",
        description="Convert the -c config file (or FILE) to config format version "
        f"{CURRENT_VERSION}. Prints the changes as a diff; writes nothing without --write "
        "(then the original is kept as FILE.vN).",
    )
    p.add_argument("file", nargs="?", type=Path, help="config file (default: the -c file)")
    p.add_argument("--write", action="store_true", help="replace the file (the original is kept beside it)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    path: Path = args.file or args.config
    try:
        text = read_regular(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    try:
        result = migrate_text(text)
    except MigrationError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    if not result.steps:
        print(f"{path}: already config version {CURRENT_VERSION}, nothing to migrate")
        return 0
    diff = unified_diff(text, result.text, str(path))
    print(diff, end="")
    problems = _validate(result.text, path)
    if problems:
        for line in problems:
            print(line)
        print(
            f"{path}: migrated to version {result.new_version} but the result is not valid (above): "
            "fix the original and run migrate again; nothing written",
            file=sys.stderr,
        )
        return 1
    if not args.write:
        print(
            f"{path}: version {result.old_version} -> {result.new_version}; "
            "run again with --write to save it",
            file=sys.stderr,
        )
        return 0
    backup = path.with_name(f"{path.name}.v{result.old_version}")
    try:
        backup.write_text(text, encoding="utf-8")
        _write_atomic(path, result.text)
    except OSError as exc:
        print(f"{path}: not written: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"{path}: written (version {result.new_version}); the original is kept as {backup}", file=sys.stderr
    )
    return 0


def _validate(text: str, path: Path) -> list[str]:
    """Load the migrated text with the real loader, from beside the original (profiles resolve the same)."""
    from agent.config.loader import load_config

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".migrated", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        load_config(Path(tmp))
    except ConfigError as exc:
        return exc.problems
    finally:
        os.unlink(tmp)
    return []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
