"""`fieldgate reload`: validate the config file, signal the running daemon (SIGHUP), wait for its verdict."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config.loader import load_config
from agent.control.localapi import parse_listen
from agent.errors import ConfigError
from agent.safefiles import file_hash, pid_file, read_regular

POLL = 0.2  # seconds between two looks at the daemon's status


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "reload",
        parents=[common],
        help="validate the config, make the running daemon apply it without a restart, wait for the result",
        description="Validate the -c file (errors as `check` prints them), send SIGHUP to the daemon "
        "(pid file beside the buffer; under systemd `systemctl reload fieldgate` does the same) and wait "
        "for its status API to show the new config, or the reason it refused it.",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon (default 30)")
    p.add_argument("--pid", type=int, default=None, help="the daemon's pid (default: from its pid file)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    path: Path = args.config
    try:
        data = read_regular(path)  # a FIFO or a device is refused at once, as the loader does
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line)
        print("invalid configuration: the daemon was not asked to reload", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    want = file_hash(data)
    pidfile = pid_file(config.storage.path)
    pid = args.pid
    if pid is None:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            print(
                f"no running daemon found (no pid file {pidfile}); under systemd: systemctl reload fieldgate",
                file=sys.stderr,
            )
            return 1
    base = _status_url(config.local.listen)
    before = _status(base) if base else None
    reloads = _reloads(before)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no process {pid} (stale pid file {pidfile}?): is fieldgate running?", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"not allowed to signal pid {pid}: run as root, or systemctl reload fieldgate", file=sys.stderr)
        return 1
    if base is None or before is None:
        print(
            f"signalled fieldgate (pid {pid}); its status API does not answer, see the journal for the result"
        )
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(POLL)
        doc = _status(base)
        cfg = (doc or {}).get("config") or {}
        if doc is None or _reloads(doc) <= reloads:
            continue
        if cfg.get("reload_error"):
            print(f"the daemon refused the new config, it keeps running the old one: {cfg['reload_error']}")
            return 1
        if cfg.get("hash") == want:
            print(f"reloaded: the daemon runs {path} (sha256 {want[:12]}, version {cfg.get('version')})")
            return 0
        print(
            f"the daemon reloaded another file content (sha256 {str(cfg.get('hash'))[:12]}): was {path} "
            "changed meanwhile, or is the daemon using another config file?",
            file=sys.stderr,
        )
        return 1
    print(f"the daemon did not report the reload within {args.timeout:g} s: see the journal", file=sys.stderr)
    return 1


def _status_url(listen: str) -> str | None:
    if not listen:
        return None
    try:
        host, port = parse_listen(listen)
    except ValueError:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _status(base: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{base}/api/status", timeout=5) as response:
            doc = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _reloads(doc: dict[str, Any] | None) -> int:
    cfg = (doc or {}).get("config") or {}
    value = cfg.get("reloads", 0)
    return value if isinstance(value, int) else 0
