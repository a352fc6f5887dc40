"""`fieldgate diff OLD NEW`: what a new config changes (devices, points, buses, upstream), in words."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.config.diff import describe
from agent.config.loader import load_config
from agent.errors import ConfigError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "diff",
        parents=[common],
        help="what a new config file changes, in words",
        description="Compare two config files (both are validated first) and say what the second changes.",
    )
    p.add_argument("old", type=Path, help="the config file running now")
    p.add_argument("new", type=Path, help="the config file to compare with it")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    configs = []
    for path in (args.old, args.new):
        try:
            configs.append(load_config(path))
        except ConfigError as exc:
            for line in exc.problems:
                print(line)
            print(f"{path}: invalid configuration, nothing compared", file=sys.stderr)
            return 1
    lines = describe(configs[0], configs[1])
    for line in lines:
        print(line)
    if not lines:
        print("no change")
    return 0
