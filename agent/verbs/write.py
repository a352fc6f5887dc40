"""`fieldgate write DEVICE POINT VALUE`: one-shot write of a writable point, then a read-back."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from agent.driver import Driver
from agent.errors import ConfigError, FieldgateError
from agent.reading import Value
from agent.verbs.read import format_value, with_driver


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("write", parents=[common], help="write a writable point, then read it back")
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
    value = parse_value(args.value)

    async def action(driver: Driver[Any]) -> tuple[Value, str | None]:
        back = await driver.write(args.point, value)
        spec = driver.points().get(args.point)
        return back, spec.unit if spec else None

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
