"""`fieldgate run`: the daemon in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import signal
import sys

from agent.errors import ConfigError
from agent.loader import load_config


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)


def setup_logging(level: str) -> None:
    from agent.logsetup import setup_logging as journald_logging

    journald_logging(level)


async def serve(config_path: str) -> int:
    from pathlib import Path

    from agent.runtime import Runtime

    config = load_config(Path(config_path))
    runtime = Runtime(config, Path(config_path))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop)
    loop.add_signal_handler(signal.SIGHUP, runtime.request_reload)
    await runtime.run()
    return 0


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    faulthandler.enable()  # a watchdog kill (SIGABRT) prints every thread's traceback to the journal
    try:
        return asyncio.run(serve(str(args.config)))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
