"""`fieldgate buffer stats|export|purge`: inspect, export and (daemon stopped) purge the store-and-forward buffer.

Built on the standard library's sqlite3 and csv rather than sqlite-utils: measured on the dev machine,
`import sqlite_utils` brings 7 more distributions (click, click-default-group, python-dateutil, pluggy,
sqlite-fts4, tabulate, tzdata; 21 MB installed) and +13.6 MiB of peak RSS against +1.8 MiB for
sqlite3+csv+json, for three queries we write in a few lines. A gateway's SD card and RAM are better spent
on the buffer itself.

stats and export open the file read-only (`mode=ro`): in WAL mode a reader never blocks the daemon's
writer, so both work while the daemon runs. purge writes, and refuses while the daemon runs: the daemon
keeps `pending` and `evicted` in memory and would report figures that drift from the file (docs/STORE.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from agent.config.units import parse_duration
from agent.errors import ConfigError, FieldgateError, StoreError
from agent.safefiles import pid_file

CSV_COLUMNS = ("seq", "ts", "time", "device", "point", "value", "unit", "quality")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "buffer", parents=[common], help="inspect the local store-and-forward buffer: stats, export, purge"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    # -c works before or after the action; SUPPRESS keeps the action's parser from overwriting a value
    # given before it (`buffer -c FILE stats`) with its own default.
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS, help="config file")
    where.add_argument(
        "--buffer",
        type=Path,
        default=None,
        metavar="FILE",
        help="the buffer file (default: storage.path of the config)",
    )

    s = actions.add_parser(
        "stats", parents=[where], help="pending readings, their age, evicted, size, per device"
    )
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=main_stats)

    e = actions.add_parser("export", parents=[where], help="write the pending readings as CSV or JSON Lines")
    e.add_argument("--format", choices=["csv", "jsonl"], default="csv", help="default csv")
    e.add_argument("--device", action="append", help="only this device (repeatable)")
    e.add_argument("--since", help="readings at or after: ISO time (UTC unless an offset is given) or 2h ago")
    e.add_argument("--until", help="readings before: ISO time or a duration ago, like --since")
    e.add_argument("--output", "-o", type=Path, help="write to FILE instead of stdout")
    e.set_defaults(func=main_export)

    g = actions.add_parser(
        "purge",
        parents=[where],
        help="delete unsent readings (counted as evicted); only with the daemon stopped",
    )
    g.add_argument("--device", help="only this device's readings")
    g.add_argument("--before", help="only readings older than: ISO time or a duration ago (e.g. 7d)")
    g.add_argument("--all", action="store_true", help="every pending reading")
    g.add_argument("--yes", action="store_true", help="really delete (without it: say how many would go)")
    g.set_defaults(func=main_purge)


# -- shared ------------------------------------------------------------------------------------------


class BufferVerbFailed(FieldgateError):
    """A reason in words to stop with exit 1."""


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Unix ms from an ISO 8601 time (naive = UTC, the gateway's clock) or a duration ago (`2h`, `30m`)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        return now - round(parse_duration(text) * 1000)
    except ValueError:
        pass
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise BufferVerbFailed(
            f"{text!r} is neither a time (2024-05-01T12:00:00Z, 2024-05-01) nor a duration ago (2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def age_words(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def buffer_path(args: argparse.Namespace) -> tuple[Path, int]:
    """The buffer file and its max_size, from --buffer or the config's storage section."""
    from agent.config.loader import load_config

    if args.buffer is not None:
        return Path(args.buffer), 256 * 1000**2
    config = load_config(Path(args.config))
    return config.storage.path, config.storage.max_size


def connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection; BufferVerbFailed when there is no buffer or it is not one."""
    if not path.exists():
        raise BufferVerbFailed(f"no buffer at {path} (has the daemon run yet? is storage.path right?)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout = 5000")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise BufferVerbFailed(f"cannot read the buffer {path}: {exc}") from None
    if not {"readings", "meta"} <= tables:
        conn.close()
        raise BufferVerbFailed(f"{path} is not a fieldgate buffer (no readings/meta tables)")
    return conn


def daemon_pid(path: Path) -> int | None:
    """The pid of a running daemon using this buffer (its pid file next to it), or None."""
    pidfile = pid_file(path)
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale pid file (kill -9, power cut)
    except PermissionError:
        pass  # alive, another user's (the service's)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid  # cannot tell: assume it is the daemon (refusing is the safe side)
    if b"fieldgate" not in cmdline and b"agent.cli" not in cmdline:
        return None  # the pid was reused by an unrelated process after a crash
    return pid


def _fail(exc: Exception) -> int:
    if isinstance(exc, ConfigError):
        for line in exc.problems:
            print(line, file=sys.stderr)
    else:
        print(f"buffer: {exc}", file=sys.stderr)
    return 1


# -- stats -------------------------------------------------------------------------------------------


def collect_stats(path: Path, now_ms: int | None = None) -> dict[str, Any]:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    with closing(connect_ro(path)) as conn:
        try:
            pending, oldest, newest, first_seq, last_seq = conn.execute(
                "SELECT count(*), min(ts), max(ts), min(seq), max(seq) FROM readings"
            ).fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            devices = dict(
                conn.execute(
                    "SELECT device, count(*) FROM readings GROUP BY device ORDER BY device"
                ).fetchall()
            )
        except sqlite3.Error as exc:
            raise BufferVerbFailed(f"cannot read the buffer {path}: {exc}") from None
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    pid = daemon_pid(path)
    return {
        "path": str(path),
        "daemon_running": pid is not None,
        "pending": int(pending),
        "first_seq": first_seq,
        "last_seq": last_seq,
        "oldest_ts": oldest,
        "oldest": iso(oldest),
        "oldest_age_s": (now - oldest) / 1000 if oldest is not None else None,
        "newest_ts": newest,
        "newest": iso(newest),
        "newest_age_s": (now - newest) / 1000 if newest is not None else None,
        "evicted": int(meta.get("evicted", 0)),
        "recovered": int(meta.get("recovered", 0)),
        "bytes": size,
        "devices": {str(k): int(v) for k, v in devices.items()},
    }


def render_stats(doc: dict[str, Any]) -> str:
    running = "daemon running" if doc["daemon_running"] else "daemon not running"
    lines = [f"buffer    {doc['path']} ({running})", f"pending   {doc['pending']} readings"]
    if doc["pending"]:
        lines[-1] += f" (seq {doc['first_seq']}..{doc['last_seq']})"
        lines.append(f"oldest    {doc['oldest']} ({age_words(doc['oldest_age_s'])} ago)")
        lines.append(f"newest    {doc['newest']} ({age_words(doc['newest_age_s'])} ago)")
    lost = " (readings lost: buffer full or purged)" if doc["evicted"] else ""
    lines.append(f"evicted   {doc['evicted']}{lost}")
    recovered = " (a corrupt file was moved aside)" if doc["recovered"] else ""
    lines.append(f"recovered {doc['recovered']}{recovered}")
    lines.append(f"size      {doc['bytes']} bytes on disk")
    if doc["devices"]:
        width = max(len(d) for d in doc["devices"])
        lines.append("devices")
        lines += [f"  {d:<{width}}  {n}" for d, n in doc["devices"].items()]
    return "\n".join(lines)


def main_stats(args: argparse.Namespace) -> int:
    try:
        path, _ = buffer_path(args)
        doc = collect_stats(path)
    except (BufferVerbFailed, ConfigError) as exc:
        return _fail(exc)
    print(orjson.dumps(doc).decode() if args.json else render_stats(doc))
    return 0


# -- export ------------------------------------------------------------------------------------------


def select_rows(
    conn: sqlite3.Connection,
    devices: list[str] | None,
    since_ms: int | None,
    until_ms: int | None,
) -> Iterator[tuple[int, int, str, str, bytes]]:
    clauses: list[str] = []
    params: list[Any] = []
    if devices:
        clauses.append(f"device IN ({', '.join('?' * len(devices))})")
        params += devices
    if since_ms is not None:
        clauses.append("ts >= ?")
        params.append(since_ms)
    if until_ms is not None:
        clauses.append("ts < ?")
        params.append(until_ms)
    where = " AND ".join(clauses) or "1"
    # Streamed in seq order: a full buffer (hundreds of MB) never sits in memory.
    yield from conn.execute(
        f"SELECT seq, ts, device, point, body FROM readings WHERE {where} ORDER BY seq", params
    )


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float | str):
        return str(value)
    return orjson.dumps(value).decode()


def export(
    conn: sqlite3.Connection,
    out: IO[str],
    fmt: str,
    devices: list[str] | None,
    since_ms: int | None,
    until_ms: int | None,
) -> int:
    """Write the selected rows; returns how many. Bodies that do not decode are skipped and said on stderr."""
    count = bad = 0
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    for seq, ts, device, point, body in select_rows(conn, devices, since_ms, until_ms):
        if writer is None:
            text = bytes(body).decode("utf-8", errors="replace")
            out.write(text + "\n")  # the stored SPEC §3 READING object, as the platform receives it
            count += 1
            continue
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        writer.writerow(
            [
                seq,
                ts,
                iso(ts),
                device,
                point,
                _csv_value(doc.get("value")),
                doc.get("unit") or "",
                doc.get("quality") or "",
            ]
        )
        count += 1
    if bad:
        print(f"buffer export: {bad} rows with an undecodable body skipped", file=sys.stderr)
    return count


def main_export(args: argparse.Namespace) -> int:
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        path, _ = buffer_path(args)
        conn = connect_ro(path)
    except (BufferVerbFailed, ConfigError) as exc:
        return _fail(exc)
    with closing(conn):
        try:
            if args.output is None:
                count = export(conn, sys.stdout, args.format, args.device, since, until)
            else:
                with open(args.output, "w", encoding="utf-8", newline="") as out:
                    count = export(conn, out, args.format, args.device, since, until)
        except sqlite3.Error as exc:
            return _fail(BufferVerbFailed(f"reading {path} failed: {exc}"))
        except OSError as exc:
            return _fail(BufferVerbFailed(f"cannot write {args.output}: {exc.strerror or exc}"))
    if args.output is not None:
        print(f"{count} readings written to {args.output}", file=sys.stderr)
    return 0


# -- purge -------------------------------------------------------------------------------------------


def main_purge(args: argparse.Namespace) -> int:
    from agent.pipeline.store import Store

    if not (args.all or args.device or args.before):
        print("buffer purge: say what to delete: --device D, --before TIME, or --all", file=sys.stderr)
        return 2
    if args.all and (args.device or args.before):
        print("buffer purge: --all cannot be combined with --device or --before", file=sys.stderr)
        return 2
    try:
        before = parse_time(args.before) if args.before else None
        path, max_size = buffer_path(args)
        pid = daemon_pid(path)
        if pid is not None:
            raise BufferVerbFailed(
                f"the daemon (pid {pid}) is using {path}: stop it first (sudo systemctl stop fieldgate); "
                "a purge under it would leave its pending/evicted counters wrong"
            )
        with closing(connect_ro(path)) as conn:
            clauses, params = [], []
            if args.device:
                clauses.append("device = ?")
                params.append(args.device)
            if before is not None:
                clauses.append("ts < ?")
                params.append(before)
            where = " AND ".join(clauses) or "1"
            matching = int(conn.execute(f"SELECT count(*) FROM readings WHERE {where}", params).fetchone()[0])
    except (BufferVerbFailed, ConfigError) as exc:
        return _fail(exc)
    except sqlite3.Error as exc:
        return _fail(BufferVerbFailed(f"cannot read the buffer {path}: {exc}"))
    if not args.yes:
        print(
            f"would delete {matching} unsent readings from {path} (they would count as evicted); "
            "run again with --yes to do it",
            file=sys.stderr,
        )
        return 1
    store = Store(path, max_size)
    try:
        store.open()
        deleted = store.purge(device=args.device, before_ts=before)
    except StoreError as exc:
        return _fail(exc)
    finally:
        store.close()
    print(f"purged {deleted} unsent readings from {path} (counted as evicted)")
    return 0
