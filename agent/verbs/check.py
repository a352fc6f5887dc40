"""`fieldgate check`: validate a config file; every error as FILE:LINE:COL: key.path: message."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.config.loader import load_config
from agent.errors import ConfigError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("check", parents=[common], help="validate the config file")
    p.add_argument("files", nargs="*", help="config files to check (default: the -c file)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    files = args.files or [args.config]
    bad = False
    for f in files:
        try:
            config = load_config(Path(f))
        except ConfigError as exc:
            bad = True
            for line in exc.problems:
                print(line)
            continue
        print(f"{f}: ok ({len(config.devices)} devices, {len(config.buses)} buses)")
    if bad:
        print("invalid configuration", file=sys.stderr)
        return 1
    return 0
