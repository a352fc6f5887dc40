"""`fieldgate write DEVICE POINT VALUE`: one-shot write of a writable point, then a read-back, audited."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

import orjson

from agent.control.commands import CommandProcessor, commands_db_path
from agent.driver import Driver
from agent.errors import ConfigError, FieldgateError, WriteRefused
from agent.pipeline.reading import Value
from agent.verbs.read import format_value, with_driver


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "write",
        parents=[common],
        help="write a writable point, then read it back",
        description="Write one point with the same checks as a platform command (writable, type, min/max), "
        "read it back, and record it in the command audit (source cli; see `fieldgate commands`).",
    )
    p.add_argument("device")
    p.add_argument("point")
    p.add_argument("value", help="number, true/false/on/off, or text")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def parse_value(text: str) -> Value:
    lowered = text.strip().lower()
    if lowered in ("true", "on", "yes"):
        return True
    if lowered in ("false", "off", "no"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def main(args: argparse.Namespace) -> int:
    from agent.config.loader import load_config  # the loader pulls in every driver config: only when run

    value = parse_value(args.value)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1

    async def action(driver: Driver[Any]) -> tuple[Value, str | None]:
        spec = driver.points().get(args.point)
        unit = spec.unit if spec else None
        # The daemon may be running: this process opens commands.db beside it (WAL, busy timeout) and
        # never recovers pending ids, which would be the daemon's commands in flight.
        processor = CommandProcessor(
            commands_db_path(config.storage.path),
            lambda name: driver if name == args.device else None,
            lambda name: None,  # the write itself tells whether the device answers
            config.commands,
        )
        try:
            processor.open(recover=False)
        except (sqlite3.Error, OSError) as exc:
            print(f"warning: not recorded in the command audit: {exc}", file=sys.stderr)
            return await driver.write(args.point, value), unit
        try:
            result = await processor.execute(args.device, args.point, value, source="cli")
        finally:
            processor.close()
        if not result["ok"]:
            raise WriteRefused(result["error"])
        back: Value = result["value"]
        return back, unit

    try:
        back, unit = with_driver(args.config, args.device, action)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    except FieldgateError as exc:
        if args.json:
            print(orjson.dumps({"ok": False, "error": str(exc)}).decode())
        else:
            print(f"{args.device}.{args.point}: refused or failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps({"ok": True, "value": back}).decode())
    else:
        print(f"{args.device}.{args.point} = {format_value(back, unit)} (read back)")
    return 0
