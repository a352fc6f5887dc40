"""`fieldgate status`: ask the running daemon's local API, print a one-screen summary (or --json)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.control.localapi import DEFAULT_LISTEN, parse_listen

TIMEOUT = 5.0  # seconds; the daemon answers from memory, so a slow answer means a stuck daemon


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "status",
        parents=[common],
        help="ask the running daemon: upstream, backlog, per-device health, last readings",
        description="Ask the running daemon (its local API, local.listen) for upstream, backlog and devices.",
    )
    parser.add_argument("--json", action="store_true", help="print the daemon's status document as JSON")
    parser.add_argument(
        "--url",
        default=None,
        help="daemon's local API, e.g. http://127.0.0.1:8470 (default: from local.listen)",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.url:
        base, where = args.url.rstrip("/"), args.url
    else:
        listen = _listen_from_config(args.config)
        if not listen:
            print(
                f'the local API is disabled in {args.config} (local.listen is ""): no status to ask for',
                file=sys.stderr,
            )
            return 1
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # wildcard binds
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        base = f"http://{where}"
    try:
        with urllib.request.urlopen(f"{base}/api/status", timeout=TIMEOUT) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"the daemon on {where} answered HTTP {exc.code}: {_error_of(exc)}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, TimeoutError):
        print(
            f"no fieldgate daemon answers on {where}: is it running? systemctl status fieldgate",
            file=sys.stderr,
        )
        return 1
    except ValueError:
        print(f"{where} answered something that is not fieldgate's status JSON", file=sys.stderr)
        return 1
    if not isinstance(doc, dict):
        print(f"{where} answered something that is not fieldgate's status JSON", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc))
    return 0


def _listen_from_config(path: Path) -> str:
    """local.listen from the config; the default when the file is absent or invalid (said on stderr)."""
    from agent.config.loader import load_config
    from agent.errors import ConfigError

    try:
        return load_config(path).local.listen
    except ConfigError as exc:
        first = exc.problems[0] if exc.problems else str(exc)
        print(f"note: cannot use {path} ({first}); trying {DEFAULT_LISTEN}", file=sys.stderr)
    except OSError as exc:
        print(f"note: cannot read {path} ({exc.strerror}); trying {DEFAULT_LISTEN}", file=sys.stderr)
    return DEFAULT_LISTEN


def _error_of(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


def age(ms: float | None) -> str:
    """A duration in words a technician reads at a glance: '42 s', '3 min', '5 h', '2 d'."""
    if ms is None:
        return "never"
    s = max(0, round(ms / 1000))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    if s < 172800:
        return f"{round(s / 3600)} h"
    return f"{round(s / 86400)} d"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _size(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} MB"
    if n >= 1000:
        return f"{n / 1e3:.1f} kB"
    return f"{n} B"


def render(doc: dict[str, Any]) -> str:
    """The one-screen summary: header, upstream, backlog, then one line per device (errors beneath)."""
    now = doc.get("ts") or int(time.time() * 1000)  # ages on the gateway's clock
    gw = doc.get("gateway") or {}
    name = f' "{gw["name"]}"' if gw.get("name") else ""
    uptime = age(doc.get("uptime_s", 0) * 1000)
    lines = [f"fieldgate {doc.get('version', '?')}: {gw.get('id', '?')}{name}, up {uptime}"]

    up = doc.get("upstream") or {}
    since = f" for {age(now - up['since_ts'])}" if up.get("since_ts") else ""
    if up.get("connected"):
        line = f"upstream  connected to {up.get('url', '?')}{since}, {up.get('sent', 0)} readings sent"
    else:
        line = f"upstream  DISCONNECTED from {up.get('url', '?')}{since}, {up.get('sent', 0)} readings sent"
    lines.append(line)
    if up.get("last_error"):
        lines.append(f"          last error: {up['last_error']}")

    buf = doc.get("buffer") or {}
    oldest = f", oldest {age(now - buf['oldest_ts'])} old" if buf.get("oldest_ts") else ""
    evicted = buf.get("evicted", 0)
    lines.append(
        f"backlog   {buf.get('pending', 0)} pending{oldest}, {_size(buf.get('bytes', 0))} on disk, "
        f"{evicted} evicted{' (readings lost: buffer full)' if evicted else ''}"
    )
    if buf.get("disk_errors"):
        lines.append(f"          {buf['disk_errors']} disk errors, last: {buf.get('last_error') or '?'}")

    devices = doc.get("devices") or {}
    states = [d.get("state", "unknown") for d in devices.values()]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("ok", "failing", "unknown") if states.count(s))
    lines.append(f"devices   {len(devices)}{': ' + counts if counts else ''}")
    width = max((len(n) for n in devices), default=0)
    for dname in sorted(devices):
        dev = devices[dname]
        state = dev.get("state", "unknown")
        readings = dev.get("readings") or {}
        values = ", ".join(
            f"{p} {_value(r.get('value'))}{' ' + r['unit'] if r.get('unit') else ''}"
            f"{' (' + r['quality'] + ')' if r.get('quality') else ''}"
            for p, r in sorted(readings.items())
        )
        stamps = [r["ts"] for r in readings.values() if isinstance(r.get("ts"), int)]
        when = f" ({age(now - max(stamps))} ago)" if stamps else ""
        shown = state.upper() if state == "failing" else state
        lines.append(f"  {dname:<{width}}  {shown:<7}  {values or 'no reading yet'}{when}")
        pad = " " * (width + 13)
        if dev.get("last_error"):
            last_ok = f"last ok {age(now - dev['last_ok_ts'])} ago" if dev.get("last_ok_ts") else "never ok"
            nxt = dev.get("next_attempt_ts")
            retry = f", next try in {age(nxt - now)}" if nxt and nxt > now else ""
            lines.append(f"{pad}{dev['last_error']} ({dev.get('errors', 0)} errors, {last_ok}{retry})")
        for point, message in sorted((dev.get("point_errors") or {}).items()):
            lines.append(f"{pad}{point}: {message}")
    return "\n".join(lines)
