"""`fieldgate read DEVICE [POINT...]` and the shared one-shot driver plumbing of read/write."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from agent.config.loader import load_config
from agent.driver import Driver
from agent.errors import ConfigError, DeviceError, FieldgateError
from agent.pipeline.devices import make_context, make_driver

T = TypeVar("T")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("read", parents=[common], help="one-shot read of a device through its real driver")
    p.add_argument("device")
    p.add_argument("points", nargs="*", metavar="POINT")
    p.add_argument("--json", action="store_true", help="one JSON object, values keyed by point name")
    p.set_defaults(func=main)


def with_driver(config_path: Path, device: str, action: Callable[[Driver[Any]], Awaitable[T]]) -> T:
    """Open the device's driver as the daemon would, run `action`, close it. Raises FieldgateError."""
    config = load_config(config_path)
    cfg = config.devices.get(device)
    if cfg is None:
        known = ", ".join(sorted(config.devices)) or "none"
        raise ConfigError([f"unknown device '{device}' (devices: {known})"])

    async def run() -> T:
        context = make_context(config, config_path)
        driver = make_driver(device, cfg, context)
        timeout = cfg.cycle_timeout()
        try:
            await asyncio.wait_for(driver.open(), timeout)
            return await asyncio.wait_for(action(driver), timeout)
        except TimeoutError:
            raise DeviceError(f"{device}: no answer within {timeout:g}s") from None
        finally:
            await driver.close()
            await context.shared.aclose()

    return asyncio.run(run())


def format_value(value: Any, unit: str | None) -> str:
    text = (
        f"{value:.6g}"
        if isinstance(value, float)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )
    return f"{text} {unit}" if unit else text


def main(args: argparse.Namespace) -> int:
    async def action(driver: Driver[Any]) -> tuple[list[Any], dict[str, str]]:
        readings = await driver.read_points(list(args.points))
        return readings, dict(driver.point_errors)

    try:
        readings, point_errors = with_driver(args.config, args.device, action)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    except FieldgateError as exc:
        if args.json:
            print(orjson.dumps({"device": args.device, "ok": False, "error": str(exc)}).decode())
        else:
            print(f"{args.device}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = {
            "device": args.device,
            "ok": not point_errors,
            "values": {r.point: r.value for r in readings},
            "units": {r.point: r.unit for r in readings if r.unit},
            "errors": point_errors,
        }
        print(orjson.dumps(doc).decode())
    else:
        width = max((len(r.point) for r in readings), default=0)
        for r in readings:
            flag = f"  ({r.quality})" if r.quality else ""
            print(f"{r.point:<{width}}  {format_value(r.value, r.unit)}{flag}")
        for point, message in point_errors.items():
            print(f"{point:<{width}}  error: {message}")
    return 1 if point_errors and not readings else 0
