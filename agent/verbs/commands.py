"""`fieldgate commands`: the audit trail of commands (platform, schedules, local API), newest first."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from datetime import datetime
from typing import Any

import orjson

from agent.control.commands import commands_db_path, read_audit
from agent.errors import ConfigError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "commands",
        parents=[common],
        help="list the recent commands and schedule actions (the audit trail)",
        description="List the audit trail kept in commands.db beside storage.path: every command received, "
        "refused or executed, with its source (mqtt, schedule, local, cli) and outcome.",
    )
    p.add_argument("--limit", type=int, default=50, help="how many entries, newest first (default 50)")
    p.add_argument("--json", action="store_true", help='one JSON object: {"commands": [ENTRY, ...]}')
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from agent.config.loader import load_config  # the loader pulls in every driver config: only when run

    if args.limit < 1:
        print("--limit must be at least 1", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    path = commands_db_path(config.storage.path)
    if not path.exists():
        entries: list[dict[str, Any]] = []
    else:
        try:
            # Read-only: the daemon may be writing (WAL lets both go on).
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                entries = read_audit(db, args.limit)
            finally:
                db.close()
        except sqlite3.Error as exc:
            print(f"{path}: cannot read the command audit: {exc}", file=sys.stderr)
            return 1
    if args.json:
        sys.stdout.write(orjson.dumps({"commands": entries}).decode() + "\n")
        return 0
    if not entries:
        print(f"no commands recorded yet ({path})")
        return 0
    for e in entries:
        print(_line(e))
    return 0


def _line(e: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(e["received_ts"] / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    target = f"{e['device']}.{e['point']}" if e["device"] else "-"
    value = "" if e["value"] is None else f" = {orjson.dumps(e['value']).decode()}"
    if e["outcome"] == "executed":
        detail = f"read back {orjson.dumps(e['result_value']).decode()}"
    else:
        detail = e["error"] or ""
    return f"{when}  {e['source']:<8} {e['outcome']:<11} {target}{value}  id={e['id']}  {detail}".rstrip()
