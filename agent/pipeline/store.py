"""The durable store-and-forward buffer: readings in SQLite, seq assignment, fetch/ack, eviction, recovery.

Rules this module keeps (docs/STORE.md explains them for operators):

- `seq` is assigned here, in memory, when a batch is appended, and inserted explicitly: it grows by exactly
  1 per stored reading. The table is AUTOINCREMENT, so `sqlite_sequence` remembers the high-water mark even
  when every row has been acknowledged and deleted; at open, next seq = max(sqlite_sequence, max(seq)) + 1.
  A seq is only consumed by a committed append (a failed append consumes none).
- Rows leave the buffer only through `ack` (after the broker's PUBACK), `purge` (an operator's decision) or
  eviction at the size bound. Eviction and purge are counted in the persisted `evicted` counter, which is
  therefore the count of every gap in `seq`.
- A row handed to an upstream is *pinned* (`pin`, called by the uplink just before it publishes, or for the
  rows of the last append `AsyncStore.pin_fresh`, queued ahead of any call that could evict them) and is not
  evictable until that upstream's `ack` (after the PUBACK) takes it out: a message in flight may reach the
  platform, so evicting its rows would count as lost readings that arrive. A pin outlives a lost connection
  (the PUBACK may have been lost, not the message); the rows are sent again on the next one and acked then.
  `pin` gives back only the rows still present: a row evicted between its fetch (or its append) and its
  publish is not sent. Hence gaps == `evicted` exactly, per lane too (`lane_evicted`).
- `seq` never goes backwards, even when the file loses its tail (a lost `-wal`) or its content (a 0-byte
  file): a side file `<name>.seq` (0600, replaced atomically) holds a mark H that every handed-out seq is
  below, reserved `SEQ_BLOCK` seqs ahead of use (one side-file write per block), and says whether the store was
  closed cleanly (then H is exactly the next seq). A start that finds the database behind the mark (a clean
  close, but the database is older or empty; an unclean stop whose `-wal` has vanished) resumes at H, logs
  one ERROR and counts one `recovered`.
- A corrupt or unreadable file is moved aside (`<name>.corrupt-<UTC time>`, with its -wal/-shm renamed the
  same way so that the set still opens in sqlite3 for forensics) and a fresh buffer is started; `recovered`
  is incremented and persisted. The new buffer continues from the old high-water mark when it can still be
  read. When it cannot, seq restarts at `max(1, unix_ms * 1000)`: strictly greater than any seq this gateway
  sent before (that would need more than 1000 readings per millisecond since the first one), still below
  2**53 until the year 2255 (exact in JavaScript), and the platform sees a gap, which is the truth: the
  readings pending in the corrupt file were lost.
- The size bound covers the database file and its WAL: the WAL gets a fixed share (`max_bytes / 16`, between
  64 KiB and 4 MiB, through `wal_autocheckpoint` and `journal_size_limit`) and the rows may use the rest.
  Eviction bursts and file shrinking are sized so that no transaction writes more than the WAL's share.
- Lanes (several upstreams): each upstream is a lane with one bit in the row's `acked` mask (`lanes` table:
  name -> bit, persisted). With one lane (the default) `ack` deletes at once, exactly as before; with several,
  `ack(seqs, lane)` sets the lane's bit and deletes the rows every active lane has acknowledged. `fetch` for a
  lane skips the rows that lane already acknowledged. Eviction and purge take rows out for every lane.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import contextlib
import functools
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import starmap
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import orjson

from agent.errors import StoreError
from agent.pipeline.reading import Reading
from agent.safefiles import create_private
from agent.upstream.payloads import reading_body

log = logging.getLogger("fieldgate.store")

T = TypeVar("T")

SCHEMA_VERSION = 1
MIN_MAX_BYTES = 256 * 1024
"""Below this the WAL share and SQLite's own pages leave no useful room for readings."""

_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_CANTOPEN = 14

_EVICT_FRACTION = 0.05
"""An eviction burst frees this fraction of the bound (at most a WAL step), not just the bytes needed."""
_EVICT_LOG_INTERVAL = 10.0
_ROW_OVERHEAD = 16
"""Approximate bytes a row costs beyond its body, device and point (record header, cell pointer, rowid)."""
_VACUUM_MIN_FREE_BYTES = 1024 * 1024
_TXN_OVERHEAD_PAGES = 8
_SEQ_MAX = 2**63 - 1
SEQ_BLOCK = 10_000
"""Seqs reserved per write of the side file (`<buffer>.seq`): the hot path writes it once per block."""
_monotonic = time.monotonic  # the eviction log's rate limit; a seam for tests

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    device TEXT NOT NULL,
    point TEXT NOT NULL,
    body BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lanes(name TEXT PRIMARY KEY, bit INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS inflight(seq INTEGER PRIMARY KEY, lanes INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('evicted', 0), ('recovered', 0);
"""

_INSERT = "INSERT INTO readings(seq, ts, device, point, body) VALUES (?, ?, ?, ?, ?)"
_FETCH_AFTER = "SELECT seq, ts, body, device, point FROM readings WHERE seq > ? ORDER BY seq LIMIT ?"
_FETCH_WINDOW = (
    "SELECT seq, ts, body, device, point FROM readings WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?"
)
_FETCH_LANE = "SELECT seq, ts, body, device, point FROM readings WHERE seq > ? AND seq < ? AND (acked & ?) = 0 ORDER BY seq LIMIT ?"
DEFAULT_LANE = "mqtt"
MAX_LANES = 62
_PAGES = (
    "SELECT (SELECT page_count FROM pragma_page_count()),"
    " (SELECT freelist_count FROM pragma_freelist_count())"
)


class StoredRow(NamedTuple):
    """One buffered reading: its seq, its timestamp (ms) and its SPEC §3 READING object, JSON-encoded.

    A named tuple, as `Reading` (agent/pipeline/reading.py): built in one C call, where a frozen dataclass
    set each field through object.__setattr__ (2 % of the daemon's CPU on the reference workload)."""

    seq: int
    ts: int
    body: bytes
    device: str = ""  # for the per-device counters of GET /metrics (agent/pipeline/metrics.py)
    point: str = ""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The buffer's figures, for health messages and `fieldgate buffer stats`."""

    pending: int
    oldest_ts: int | None
    evicted: int
    bytes: int
    next_seq: int
    recovered: int
    """Times a corrupt/unreadable buffer file was moved aside (persisted)."""
    disk_errors: int
    """SQLite errors (disk full, I/O) raised by this store since it was constructed."""
    last_error: str | None
    lanes: dict[str, int] = field(default_factory=dict)
    """Rows each upstream lane has not acknowledged yet."""
    lane_evicted: dict[str, int] = field(default_factory=dict)
    """Rows each lane lost to eviction or purge before it acknowledged them (its platform's gaps)."""
    pinned: int = 0
    """Rows in flight on some upstream (not evictable until acknowledged)."""


class _CorruptBuffer(StoreError):
    """The file at the buffer path is not a usable SQLite database (internal: triggers the recovery)."""


@dataclass(frozen=True, slots=True)
class _Salvage:
    high_water: int | None
    evicted: int
    recovered: int


def _errorcode(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = _errorcode(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _time_floor_seq() -> int:
    return max(1, time.time_ns() // 1_000_000 * 1000)


class Store:
    """The buffer on disk. Not thread-safe: one thread uses it at a time (AsyncStore gives it one thread)."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        synchronous: Literal["full", "normal"] = "full",
        *,
        max_page_count: int | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES} bytes, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.synchronous = synchronous
        self._max_page_count = max_page_count
        self._wal_bytes = min(4 * 1024 * 1024, max(64 * 1024, max_bytes // 16))
        # Each transaction also rewrites pages beyond the rows it adds or frees (page 1, the tables' interior
        # pages, the freelist trunk, the pointer map, meta, sqlite_sequence), and a WAL frame is a page plus a
        # 24-byte header: measured, the WAL of a 1 MB buffer under eviction reached its share + 5 frames. The
        # rows' budget leaves room for that, so that db + WAL stay within max_bytes (tests/faults/test_disk.py).
        self._data_budget = max_bytes - self._wal_bytes - _TXN_OVERHEAD_PAGES * (4096 + 24)
        # A transaction writes about one WAL frame per page it fills or frees. The WAL's share is split in
        # quarters: up to one quarter before a checkpoint, one quarter of eviction (or of shrinking) per
        # transaction, and half for the batch itself.
        self._wal_step = self._wal_bytes // 4
        self._evict_target = self._data_budget - min(int(self._data_budget * _EVICT_FRACTION), self._wal_step)
        self._conn: sqlite3.Connection | None = None
        self._page_size = 4096
        self._next_seq = 1
        self._pending = 0
        self._evicted = 0
        self._recovered = 0
        self._disk_errors = 0
        self._last_error: str | None = None
        self._evict_unlogged = 0
        self._evict_logged_at: float | None = None
        self._lanes: dict[str, int] = {DEFAULT_LANE: 1}  # name -> bit mask; one lane: ack deletes at once
        self._full_mask = 1
        self._lane_pending: dict[str, int] = {}  # several lanes only (one lane: `_pending`)
        self._lane_gone: dict[str, int] = {}  # rows taken out per lane by the running eviction/purge
        self._lane_evicted: dict[str, int] = {}  # several lanes only (one lane: `_evicted`)
        # seq -> mask of the lanes that have it in flight (handed to the client, no PUBACK deleted it yet).
        # Only touched on the store's thread (AsyncStore), like everything else here.
        self._pins: dict[int, int] = {}
        self.seq_path = Path(f"{self.path}.seq")
        self._seq_mark = 0  # every seq handed out is below it (the side file says so, durably)
        self._mark_floor: int | None = None  # during open: the side file's H - 1
        self._wal_mode = True  # False where the filesystem refused WAL (then no -wal is ever left behind)

    # -- opening, recovery -------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the buffer; a corrupt file is moved aside and replaced, never a reason to stop."""
        if self._conn is not None:
            raise StoreError(f"the buffer {self.path} is already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the buffer directory {self.path.parent}: {exc.strerror}"
            ) from exc
        mark = self._read_mark()
        # Looked at before SQLite opens the file (which creates an empty -wal).
        had_db = _file_size(self.path) > 0
        had_wal = Path(f"{self.path}-wal").exists()
        self._mark_floor = mark[0] - 1 if mark is not None else None
        recovered_now = False
        try:
            conn = self._connect_checked()
        except _CorruptBuffer as corrupt:
            conn = self._recover(str(corrupt))
            recovered_now = True
        try:
            self._load_state(conn)
        except sqlite3.Error as exc:
            conn.close()
            if not _is_corruption(exc):
                raise self._error("open", exc) from exc
            conn = self._recover(str(exc))
            recovered_now = True
            self._load_state(conn)
        try:
            if mark is not None and not recovered_now:
                self._check_mark(conn, mark, had_db=had_db, had_wal=had_wal)
            self._seq_mark = 0
            self._reserve(self._next_seq)
        except (StoreError, sqlite3.Error) as exc:
            conn.close()
            if isinstance(exc, StoreError):
                raise
            raise self._error("open", exc) from exc
        self._conn = conn

    # -- the seq mark (side file) --------------------------------------------------------------------------

    def _read_mark(self) -> tuple[int, bool] | None:
        """The side file's (H, closed cleanly), or None when there is none (a first start, an older version)."""
        try:
            text = self.seq_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("seq mark %s unreadable (%s): ignored", self.seq_path, exc)
            return None
        parts = text.split()
        # a seq is an SQLite INTEGER: a mark of 2**63 or more (a damaged file) is no mark, not an OverflowError
        if (
            len(parts) != 2
            or not parts[0].isdigit()
            or len(parts[0]) > 19
            or int(parts[0]) >= 2**63
            or parts[1] not in ("open", "closed")
        ):
            log.warning("seq mark %s unreadable (%r): ignored", self.seq_path, text[:80])
            return None
        return int(parts[0]), parts[1] == "closed"

    def _write_mark(self, high: int, closed: bool) -> None:
        """Replace the side file atomically and durably: temp file, fsync, rename, fsync of the directory."""
        tmp = Path(f"{self.seq_path}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, f"{high} {'closed' if closed else 'open'}\n".encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.seq_path)
            dfd = os.open(self.seq_path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            self._disk_errors += 1
            self._last_error = f"buffer seq mark {self.seq_path} not written: {exc.strerror or exc}"
            raise StoreError(self._last_error) from exc

    def _reserve(self, next_seq: int) -> None:
        """Make the side file cover every seq below `next_seq` (one write per SEQ_BLOCK seqs)."""
        if next_seq > self._seq_mark:
            high = next_seq + SEQ_BLOCK
            self._write_mark(high, closed=False)
            self._seq_mark = high

    def _check_mark(
        self, conn: sqlite3.Connection, mark: tuple[int, bool], *, had_db: bool, had_wal: bool
    ) -> None:
        """Resume at the mark when the database went back behind it (lost -wal, emptied or older file)."""
        high, closed = mark
        if self._next_seq >= high:
            return
        if closed:
            why = (
                f"it was closed cleanly at seq {high - 1}, but the file only goes to seq {self._next_seq - 1}"
            )
        elif not had_db:
            why = "the database file is missing or empty"
        elif not had_wal and self._wal_mode:
            why = (
                "the process stopped without closing it and its write-ahead log (-wal) is gone (lost, or merged"
                " by another program that opened the file read-write)"
            )
        else:
            return  # an unclean stop, its -wal intact: the file is right, the seqs reserved beyond it unused
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'readings'")
            conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('readings', ?)", (high - 1,))
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'recovered'")
            conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback(conn)
            raise
        log.error(
            "buffer %s went back: %s; readings pending in the lost part are gone, and seq resumes at %d "
            "(the mark in %s) so that no seq already sent is used again",
            self.path,
            why,
            high,
            self.seq_path,
        )
        self._next_seq = high
        self._recovered += 1

    def _connect_checked(self) -> sqlite3.Connection:
        """Connect, check integrity, apply pragmas and schema; raise _CorruptBuffer for an unusable file."""
        new = _file_size(self.path) == 0
        if new and _file_size(Path(f"{self.path}-wal")) > 0:
            # A log without its database cannot be trusted to continue seq: treat the set as unreadable.
            raise _CorruptBuffer("the database file is missing or empty but its write-ahead log remains")
        create_private(self.path)  # 0600 before SQLite creates it: its -wal/-shm take its mode
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            if _is_corruption(exc):
                raise _CorruptBuffer(str(exc)) from exc
            raise self._error("open", exc) from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if new:
                # Only effective before the first table exists; lets acks give space back (see _maybe_vacuum).
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._wal_mode = mode == "wal"
            if mode != "wal":
                log.warning("buffer %s: the filesystem refused WAL mode (journal_mode=%s)", self.path, mode)
            if not new:
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
                if problems != ["ok"]:
                    raise _CorruptBuffer("integrity check failed: " + "; ".join(problems))
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the buffer {self.path} was written by a newer fieldgate (format {version}, "
                        f"this one reads {SCHEMA_VERSION}); upgrade fieldgate or move the file away"
                    )
            self._apply_pragmas(conn)
            conn.execute("BEGIN IMMEDIATE")
            # Statement by statement: executescript() would commit the transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(readings)").fetchall()}
            if "acked" not in columns:  # a buffer written before lanes existed: every row unacknowledged
                conn.execute("ALTER TABLE readings ADD COLUMN acked INTEGER NOT NULL DEFAULT 0")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except (_CorruptBuffer, StoreError):
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise _CorruptBuffer(str(exc)) from exc
            raise self._error("open", exc) from exc
        return conn

    def _apply_pragmas(self, conn: sqlite3.Connection) -> None:
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        # Debian builds SQLite with secure_delete on; FAST skips zeroing whole freed pages (a few % fewer
        # writes per ack) and still scrubs deleted rows from the pages that are written anyway.
        conn.execute("PRAGMA secure_delete = FAST")
        conn.execute(f"PRAGMA journal_size_limit = {self._wal_bytes}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, self._wal_step // self._page_size)}")
        if self._max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(self._max_page_count)}")

    def set_max_page_count(self, pages: int | None) -> None:
        """Test hook: cap (or uncap, with None) the database's pages to simulate a full disk."""
        self._max_page_count = pages
        if self._conn is not None:
            # 4294967294 is SQLite's own ceiling for max_page_count.
            self._conn.execute(f"PRAGMA max_page_count = {int(pages) if pages is not None else 4294967294}")

    def _recover(self, reason: str) -> sqlite3.Connection:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self._move_aside(stamp)
        salvage = self._salvage(aside)
        conn = self._connect_checked_fresh()
        floors = [h for h in (salvage.high_water, self._mark_floor) if h is not None]
        high_water = max(floors) if floors else _time_floor_seq() - 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'evicted'", (salvage.evicted,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'recovered'", (salvage.recovered + 1,))
            # Persist the high-water mark now: a restart before the first append must not go back to seq 1.
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'readings'")
            conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('readings', ?)", (high_water,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise self._error("recovery", exc) from exc
        how = (
            "continuing after the old file's last seq and the seq mark"
            if floors
            else "its last seq was unreadable, so seq jumps to a time-based value"
        )
        log.error(
            "buffer %s was unusable (%s); moved it aside to %s and started a fresh buffer at seq %d (%s); "
            "readings still pending in the old file were lost",
            self.path,
            reason,
            aside,
            high_water + 1,
            how,
        )
        return conn

    def _connect_checked_fresh(self) -> sqlite3.Connection:
        try:
            return self._connect_checked()
        except _CorruptBuffer as again:
            raise StoreError(f"cannot create a fresh buffer at {self.path}: {again}") from again

    def _move_aside(self, stamp: str) -> Path:
        base = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while base.exists():
            base = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            for suffix in ("-wal", "-shm", ""):
                member = Path(f"{self.path}{suffix}")
                if member.exists():
                    member.rename(f"{base}{suffix}")
        except OSError as exc:
            raise StoreError(
                f"the buffer {self.path} is corrupt and cannot be moved aside: {exc.strerror}"
            ) from exc
        return base

    @staticmethod
    def _salvage(path: Path) -> _Salvage:
        """Read what can still be read from a corrupt buffer: its seq high-water mark and its counters."""
        high: list[int] = []
        counters = {"evicted": 0, "recovered": 0}
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error:
            return _Salvage(None, 0, 0)
        try:
            # Lets SQLite read a truncated file (fewer pages than its header says) instead of refusing it.
            conn.execute("PRAGMA writable_schema = ON")
            queries = (
                "SELECT seq FROM sqlite_sequence WHERE name = 'readings'",
                "SELECT max(seq) FROM readings",
            )
            for query in queries:
                try:
                    row = conn.execute(query).fetchone()
                except sqlite3.Error:
                    continue
                if row is not None and isinstance(row[0], int) and 0 <= row[0] < 2**62:
                    high.append(row[0])
            for key in counters:
                try:
                    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                except sqlite3.Error:
                    continue
                if row is not None and isinstance(row[0], int) and row[0] >= 0:
                    counters[key] = row[0]
        finally:
            conn.close()
        return _Salvage(max(high) if high else None, counters["evicted"], counters["recovered"])

    def _load_state(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        high = row[0] if row is not None else 0
        high = max(high, conn.execute("SELECT coalesce(max(seq), 0) FROM readings").fetchone()[0])
        self._next_seq = high + 1
        self._pending = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self._evicted = int(meta.get("evicted", 0))
        self._recovered = int(meta.get("recovered", 0))
        # Rows in flight when the last run stopped (kept by close): still maybe delivered, still pinned.
        # A lane's bit goes once that lane acknowledged the row; a row gone (acked) is no longer held.
        self._pins = {
            int(seq): int(mask) & ~int(acked)
            for seq, mask, acked in conn.execute(
                "SELECT i.seq, i.lanes, r.acked FROM inflight i JOIN readings r ON r.seq = i.seq"
            )
            if int(mask) & ~int(acked)
        }

    # -- lanes (one per upstream) ------------------------------------------------------------------------

    def set_lanes(self, names: Sequence[str]) -> None:
        """Declare the upstreams' lanes. Bits of known lanes are kept (persisted); a lane no longer declared
        is forgotten (its bit cleared from every row) and rows every remaining lane acknowledged are deleted.
        A new lane starts with every pending row to send."""
        conn = self._require_open()
        wanted = list(dict.fromkeys(names)) or [DEFAULT_LANE]
        if len(wanted) > MAX_LANES:
            raise ValueError(f"at most {MAX_LANES} upstreams, not {len(wanted)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            known = {str(n): int(b) for n, b in conn.execute("SELECT name, bit FROM lanes").fetchall()}
            if not known and wanted == [DEFAULT_LANE]:
                conn.execute("COMMIT")  # the single-upstream buffer of every version: nothing to record
                self._set_lane_state(conn, {DEFAULT_LANE: 1})
                return
            kept = {n: 1 << known[n] for n in wanted if n in known}
            kept_mask = sum(kept.values())
            if set(known) != set(kept):
                # A forgotten lane's bit may serve a new lane: clear it from every row first.
                conn.execute(
                    "UPDATE readings SET acked = acked & ? WHERE acked & ~? != 0", (kept_mask, kept_mask)
                )
            free = (b for b in range(MAX_LANES) if (1 << b) & kept_mask == 0)
            lanes = {n: kept.get(n) or 1 << next(free) for n in wanted}
            mask = sum(lanes.values())
            conn.execute("DELETE FROM lanes")
            conn.executemany(
                "INSERT INTO lanes(name, bit) VALUES (?, ?)",
                [(n, m.bit_length() - 1) for n, m in lanes.items()],
            )
            deleted = 0
            if set(known) != set(wanted):
                deleted = int(conn.execute("DELETE FROM readings WHERE acked & ? = ?", (mask, mask)).rowcount)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise self._error("setting the upstream lanes", exc) from exc
        self._pending -= deleted
        self._set_lane_state(conn, lanes)

    def _set_lane_state(self, conn: sqlite3.Connection, lanes: dict[str, int]) -> None:
        self._lanes = lanes
        self._full_mask = sum(lanes.values())
        self._lane_pending = {}
        self._lane_evicted = {}
        # A forgotten lane's in-flight messages no longer hold rows (nothing will ack them for it).
        full = self._full_mask
        self._pins = {s: m & full for s, m in self._pins.items() if m & full}
        if len(lanes) > 1:
            for name, bit in lanes.items():
                row = conn.execute("SELECT count(*) FROM readings WHERE acked & ? = 0", (bit,)).fetchone()
                self._lane_pending[name] = int(row[0])
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"evicted:{name}",)).fetchone()
                self._lane_evicted[name] = int(row[0]) if row is not None else 0

    def lanes(self) -> list[str]:
        return list(self._lanes)

    def lane_evicted(self) -> dict[str, int]:
        """Rows each lane lost (evicted or purged before it acknowledged them): its platform's gaps."""
        if len(self._lanes) > 1:
            return dict(self._lane_evicted)
        return dict.fromkeys(self._lanes, self._evicted)

    def lane_pending(self) -> dict[str, int]:
        """Rows each lane has not acknowledged yet."""
        if len(self._lanes) > 1:
            return dict(self._lane_pending)
        return dict.fromkeys(self._lanes, self._pending)

    def _count_lane_rows(self, conn: sqlite3.Connection, where: str, args: Sequence[object]) -> None:
        """Before a delete of `where` rows (several lanes): note how many each lane had not acknowledged."""
        if len(self._lanes) <= 1:
            return
        names = list(self._lanes)
        columns = ", ".join(f"coalesce(sum((acked & {self._lanes[n]}) = 0), 0)" for n in names)
        row = conn.execute(f"SELECT {columns} FROM readings WHERE {where}", args).fetchone()
        for name, count in zip(names, row, strict=True):
            self._lane_gone[name] = self._lane_gone.get(name, 0) + int(count)

    def _persist_lane_gone(self, conn: sqlite3.Connection) -> None:
        """In the eviction's (purge's) transaction: what each lane lost, added to its `evicted:<lane>`."""
        for name, gone in self._lane_gone.items():
            if gone:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                    (f"evicted:{name}", gone),
                )

    def _apply_lane_gone(self, added: int) -> None:
        if len(self._lanes) > 1:
            for name in self._lane_pending:
                gone = self._lane_gone.get(name, 0)
                self._lane_pending[name] += added - gone
                self._lane_evicted[name] = self._lane_evicted.get(name, 0) + gone
        self._lane_gone = {}

    # -- the hot path ----------------------------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the buffer {self.path} is not open")
        return self._conn

    def append(self, readings: Sequence[Reading]) -> list[StoredRow]:
        """Store readings in one transaction, assigning consecutive seqs; returns the rows stored.

        A reading that cannot be encoded as JSON (e.g. an integer beyond 64 bits) is logged and skipped
        without consuming a seq. On a disk error nothing is stored, no seq is consumed, StoreError is raised.
        """
        conn = self._require_open()
        first = self._next_seq
        seq = first
        params: list[tuple[int, int, str, str, bytes]] = []
        incoming = 0
        for r in readings:
            try:
                body = reading_body(seq, r)
            except orjson.JSONEncodeError as exc:
                log.warning(
                    "reading %s/%s at %s not stored: cannot encode it as JSON (%s)",
                    r.device,
                    r.point,
                    r.ts,
                    exc,
                )
                continue
            params.append((seq, r.ts, r.device, r.point, body))
            incoming += len(body) + len(r.device) + len(r.point)
            seq += 1
        if not params:
            return []
        self._reserve(seq)  # before any of these seqs can be committed (and then sent)
        # Generous on purpose: an estimate too low would let the inserts grow the file past the bound.
        incoming = int((incoming + _ROW_OVERHEAD * len(params)) * 1.1) + 2 * self._page_size
        evicted = 0
        cutoff = 0
        self._lane_gone = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            used = self._used_bytes(conn)
            if used + incoming > self._data_budget and self._pending:
                # Make room first, so that the inserts reuse the freed pages instead of growing the file.
                evicted, cutoff = self._evict_oldest(conn, used + incoming, self._pending, first - 1)
            conn.executemany(_INSERT, params)
            rows_in_table = self._pending - evicted + len(params)
            for _ in range(16):
                used = self._used_bytes(conn)
                if used <= self._data_budget or rows_in_table == 0:
                    break
                # The batch's own rows go last, and only when they alone exceed the bound.
                older_left = rows_in_table - len(self._pins) > len(params)
                n, last = self._evict_oldest(conn, used, rows_in_table, first - 1 if older_left else _SEQ_MAX)
                if n == 0:
                    break
                cutoff = max(cutoff, last)
                evicted += n
                rows_in_table -= n
            if evicted:
                conn.execute("UPDATE meta SET value = value + ? WHERE key = 'evicted'", (evicted,))
                self._persist_lane_gone(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise self._error(f"append of {len(params)} readings", exc) from exc
        self._next_seq = seq
        self._pending += len(params) - evicted
        self._apply_lane_gone(len(params))
        if evicted:
            self._evicted += evicted
            self._note_eviction(evicted)
            if cutoff >= first:
                params = params[cutoff - first + 1 :]
        return [StoredRow(p[0], p[1], p[4], p[2], p[3]) for p in params]

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        total, free = conn.execute(_PAGES).fetchone()
        return int(total - free) * self._page_size

    def _evict_oldest(
        self, conn: sqlite3.Connection, used: int, rows_in_table: int, max_seq: int
    ) -> tuple[int, int]:
        """Delete the oldest rows (seq <= max_seq) to bring `used` bytes down to the target.

        Returns (rows deleted, highest seq considered). Rows are sized from the average. Pinned rows (in
        flight) are skipped: the cutoff moves past them so that `count` evictable rows go, and the DELETE is
        one range per run between pinned rows.
        """
        excess = used - self._evict_target
        if excess <= 0 or rows_in_table <= 0:
            return 0, 0
        count = max(1, math.ceil(excess / max(1.0, used / rows_in_table)))
        pinned = sorted(self._pins) if self._pins else []
        held = 0
        while True:
            row = conn.execute(
                "SELECT seq FROM readings ORDER BY seq LIMIT 1 OFFSET ?", (count - 1 + held,)
            ).fetchone()
            cutoff = min(row[0], max_seq) if row is not None else max_seq
            below = bisect.bisect_right(pinned, cutoff)  # pinned rows are in the table (see pin/ack)
            if below <= held or row is None or cutoff == max_seq:
                break
            held = below
        ranges = _complement(pinned[:below], cutoff)
        deleted = 0
        for lo, hi in ranges:
            self._count_lane_rows(conn, "seq BETWEEN ? AND ?", (lo, hi))
            deleted += int(conn.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount)
        return deleted, cutoff

    def _note_eviction(self, count: int) -> None:
        self._evict_unlogged += count
        now = _monotonic()
        if self._evict_logged_at is None or now - self._evict_logged_at >= _EVICT_LOG_INTERVAL:
            self._log_eviction()
            self._evict_logged_at = now

    def _log_eviction(self) -> None:
        log.warning(
            "buffer full (max_size %d bytes): evicted the %d oldest unsent readings (%d evicted in total)",
            self.max_bytes,
            self._evict_unlogged,
            self._evicted,
        )
        self._evict_unlogged = 0

    def fetch(
        self, after_seq: int, before_seq: int | None, limit: int, lane: str | None = None
    ) -> list[StoredRow]:
        """Pending rows with after_seq < seq (< before_seq when given), in seq order, at most `limit`.

        With several lanes and `lane` given: only the rows that lane has not acknowledged yet.
        """
        conn = self._require_open()
        if limit <= 0:
            return []
        try:
            if lane is not None and len(self._lanes) > 1:
                bit = self._lane_bit(lane)
                before = _SEQ_MAX if before_seq is None else before_seq
                rows = conn.execute(_FETCH_LANE, (after_seq, before, bit, limit)).fetchall()
            elif before_seq is None:
                rows = conn.execute(_FETCH_AFTER, (after_seq, limit)).fetchall()
            else:
                rows = conn.execute(_FETCH_WINDOW, (after_seq, before_seq, limit)).fetchall()
        except sqlite3.Error as exc:
            raise self._error("fetch", exc) from exc
        return list(starmap(StoredRow, rows))

    def _pin_mask(self, lane: str | None) -> int:
        if lane is None or len(self._lanes) <= 1:
            return self._full_mask
        return self._lane_bit(lane)

    def pin(
        self, rows: Sequence[StoredRow], lane: str | None = None, *, known: bool = False
    ) -> list[StoredRow]:
        """Rows about to be published on `lane`: those still in the buffer are pinned (not evictable until
        `ack` for that lane) and returned; those evicted since they were fetched or appended are dropped, so
        that an evicted row is never sent (it is counted in `evicted`, and is a gap, exactly once).

        `known`: the caller knows that every row is in the buffer (`AsyncStore.pin_fresh`: rows of the
        last append, no call that deletes rows made since), so they are pinned without looking."""
        conn = self._require_open()
        if not rows:
            return []
        mask = self._pin_mask(lane)
        if known:
            pins = self._pins
            for r in rows:
                pins[r.seq] = pins.get(r.seq, 0) | mask
            return list(rows)
        seqs = [r.seq for r in rows]
        try:
            present: set[int] = set()
            for lo, hi in _ranges(seqs):
                present.update(
                    r[0] for r in conn.execute("SELECT seq FROM readings WHERE seq BETWEEN ? AND ?", (lo, hi))
                )
        except sqlite3.Error as exc:
            raise self._error(f"pin of {len(seqs)} readings", exc) from exc
        pins = self._pins
        for s in present:
            pins[s] = pins.get(s, 0) | mask
        if len(present) == len(rows):
            return list(rows)
        return [r for r in rows if r.seq in present]

    def _unpin(self, seqs: Sequence[int], mask: int) -> None:
        pins = self._pins
        if not pins:
            return
        for s in seqs:
            m = pins.get(s)
            if m is not None:
                m &= ~mask
                if m:
                    pins[s] = m
                else:
                    del pins[s]

    def _lane_bit(self, lane: str) -> int:
        try:
            return self._lanes[lane]
        except KeyError:
            raise StoreError(f"unknown upstream lane {lane!r} (lanes: {', '.join(self._lanes)})") from None

    def ack(self, seqs: Sequence[int], lane: str | None = None) -> int:
        """Rows an upstream acknowledged: deleted (one lane), or marked for `lane` and deleted once every
        lane has acknowledged them. Returns how many rows were deleted. Seqs already gone are fine."""
        conn = self._require_open()
        if not seqs:
            return 0
        if lane is not None and len(self._lanes) > 1:
            return self._ack_lane(conn, seqs, lane)
        ranges = _ranges(seqs)
        try:
            conn.execute("BEGIN IMMEDIATE")
            deleted = int(conn.executemany("DELETE FROM readings WHERE seq BETWEEN ? AND ?", ranges).rowcount)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise self._error(f"ack of {len(seqs)} readings", exc) from exc
        self._pending -= deleted
        self._unpin(seqs, self._full_mask)
        if (
            deleted and len(self._lanes) > 1
        ):  # rows gone for every lane: each lane's count from the file again
            for name, bit in self._lanes.items():
                row = conn.execute("SELECT count(*) FROM readings WHERE acked & ? = 0", (bit,)).fetchone()
                self._lane_pending[name] = int(row[0])
        self._maybe_vacuum(conn)
        return deleted

    def _ack_lane(self, conn: sqlite3.Connection, seqs: Sequence[int], lane: str) -> int:
        bit = self._lane_bit(lane)
        full = self._full_mask
        ranges = _ranges(seqs)
        try:
            conn.execute("BEGIN IMMEDIATE")
            marked = int(
                conn.executemany(
                    "UPDATE readings SET acked = acked | ? WHERE seq BETWEEN ? AND ? AND (acked & ?) = 0",
                    [(bit, lo, hi, bit) for lo, hi in ranges],
                ).rowcount
            )
            deleted = int(
                conn.executemany(
                    "DELETE FROM readings WHERE seq BETWEEN ? AND ? AND acked = ?",
                    [(lo, hi, full) for lo, hi in ranges],
                ).rowcount
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise self._error(f"ack of {len(seqs)} readings for upstream {lane!r}", exc) from exc
        self._lane_pending[lane] -= marked
        self._pending -= deleted
        self._unpin(seqs, bit)
        if deleted:
            self._maybe_vacuum(conn)
        return deleted

    def purge(self, *, device: str | None = None, before_ts: int | None = None) -> int:
        """Operator purge of pending rows (all, one device's, older than a time); counted as evicted."""
        conn = self._require_open()
        clauses: list[str] = []
        args: list[object] = []
        if device is not None:
            clauses.append("device = ?")
            args.append(device)
        if before_ts is not None:
            clauses.append("ts < ?")
            args.append(before_ts)
        where = " AND ".join(clauses) if clauses else "1"
        # In chunks of about a WAL step, each its own transaction: purging a full buffer at once would
        # write a WAL as large as the file.
        chunk = max(100, self._wal_step // 128)
        sql = (
            f"DELETE FROM readings WHERE seq IN (SELECT seq FROM readings WHERE {where} ORDER BY seq LIMIT ?)"
        )
        deleted = 0
        while True:
            self._lane_gone = {}
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._count_lane_rows(
                    conn,
                    f"seq IN (SELECT seq FROM readings WHERE {where} ORDER BY seq LIMIT ?)",
                    [*args, chunk],
                )
                n = int(conn.execute(sql, [*args, chunk]).rowcount)
                conn.execute("UPDATE meta SET value = value + ? WHERE key = 'evicted'", (n,))
                self._persist_lane_gone(conn)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise self._error(f"purge (after {deleted} readings deleted)", exc) from exc
            self._pending -= n
            self._apply_lane_gone(0)
            self._evicted += n
            deleted += n
            if n < chunk:
                break
        log.warning(
            "buffer purged by the operator (device=%s, before_ts=%s): %d unsent readings deleted, "
            "counted as evicted",
            device,
            before_ts,
            deleted,
        )
        self._maybe_vacuum(conn)
        return deleted

    def _maybe_vacuum(self, conn: sqlite3.Connection) -> None:
        """Give free pages back to the filesystem once most of the file is free (a drained backlog).

        Waiting until three quarters are free keeps the page moves cheap (few live pages left to move) and
        avoids shrinking a file that live traffic would grow again at once. Not done after an eviction: the
        freed pages are refilled by the next appends.
        """
        try:
            total, free = conn.execute(_PAGES).fetchone()
            if free * self._page_size < _VACUUM_MIN_FREE_BYTES or free * 4 < total * 3:
                return
            step = max(1, self._wal_step // self._page_size)
            for _ in range(free // step + 2):
                # executescript steps the pragma to completion; execute() would free a single page.
                # In WAL-step chunks, each its own transaction, so that the WAL stays within its share.
                conn.executescript(f"PRAGMA incremental_vacuum({step});")
                if conn.execute("PRAGMA freelist_count").fetchone()[0] == 0:
                    break
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            self._rollback(conn)
            error = self._error("shrinking the file", exc)
            log.warning("%s (the acknowledged rows are deleted; the file keeps its size)", error)

    # -- figures, errors, closing ----------------------------------------------------------------------

    def stats(self) -> StoreStats:
        conn = self._require_open()
        try:
            row = conn.execute("SELECT ts FROM readings ORDER BY seq LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            raise self._error("stats", exc) from exc
        return StoreStats(
            pending=self._pending,
            oldest_ts=row[0] if row is not None else None,
            evicted=self._evicted,
            bytes=_file_size(self.path) + _file_size(Path(f"{self.path}-wal")),
            next_seq=self._next_seq,
            recovered=self._recovered,
            disk_errors=self._disk_errors,
            last_error=self._last_error,
            lanes=self.lane_pending(),
            lane_evicted=self.lane_evicted(),
            pinned=len(self._pins),
        )

    def _rollback(self, conn: sqlite3.Connection) -> None:
        # SQLite may already have rolled back by itself (e.g. on SQLITE_FULL); then there is nothing to undo.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("rollback after an error failed too: %s", exc)

    def _error(self, action: str, exc: sqlite3.Error) -> StoreError:
        """Count a SQLite failure and turn it into a StoreError whose message says what happened, in words."""
        code = _errorcode(exc)
        if code == _SQLITE_FULL:
            message = (
                f"buffer {action} failed: the disk is full (or the buffer reached its page limit); "
                f"the operation was rolled back, nothing was stored or deleted by it"
            )
        elif code == _SQLITE_IOERR:
            message = f"buffer {action} failed: I/O error on {self.path} ({exc})"
        elif code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            message = f"buffer {action} failed: {self.path} is locked by another process ({exc})"
        elif code == _SQLITE_READONLY:
            message = f"buffer {action} failed: {self.path} is read-only ({exc})"
        elif code == _SQLITE_CANTOPEN:
            message = f"buffer {action} failed: cannot open {self.path} ({exc})"
        elif code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            message = f"buffer {action} failed: {self.path} is corrupt ({exc}); the next start replaces it"
        else:
            message = f"buffer {action} failed: {exc}"
        self._disk_errors += 1
        self._last_error = message
        return StoreError(message)

    def _keep_pins(self, conn: sqlite3.Connection) -> None:
        """At a stop, the rows still in flight (no PUBACK came) stay pinned for the next run: they may have
        reached the platform, so evicting them before they are sent again would count a delivered reading."""
        try:
            if not self._pins and conn.execute("SELECT 1 FROM inflight LIMIT 1").fetchone() is None:
                return  # nothing to record (the usual case): no write at close
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM inflight")
            conn.executemany("INSERT INTO inflight(seq, lanes) VALUES (?, ?)", self._pins.items())
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            log.warning("buffer %s: the rows in flight were not recorded at close: %s", self.path, exc)

    def close(self) -> None:
        """Close the file (SQLite checkpoints the WAL into it). Safe to call twice."""
        if self._evict_unlogged:
            self._log_eviction()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._keep_pins(conn)
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("closing the buffer %s failed: %s", self.path, exc)
                return
            try:
                # Closed cleanly: the mark is now exactly the next seq (the next start checks the file against it).
                self._write_mark(self._next_seq, closed=True)
            except StoreError as exc:
                log.warning("%s (the next start resumes at the reserved mark instead)", exc)


def _complement(pinned: Sequence[int], cutoff: int) -> list[tuple[int, int]]:
    """The runs of [0, cutoff] between the sorted `pinned` seqs (all <= cutoff)."""
    out: list[tuple[int, int]] = []
    lo = 0
    for p in pinned:
        if p > lo:
            out.append((lo, p - 1))
        lo = p + 1
    if lo <= cutoff:
        out.append((lo, cutoff))
    return out


def _ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted seqs as contiguous (first, last) runs: one statement per run instead of one per row."""
    ordered = sorted(set(seqs))
    ranges: list[tuple[int, int]] = []
    start = prev = ordered[0]
    for s in ordered[1:]:
        if s != prev + 1:
            ranges.append((start, prev))
            start = s
        prev = s
    ranges.append((start, prev))
    return ranges


_Job = tuple[Callable[[], Any], "asyncio.Future[Any] | None", asyncio.AbstractEventLoop | None]
"""A call, and where its outcome goes (None, None: nobody waits for it, a failure is logged: `pin_fresh`)."""

_STOP = None
_serving: dict[threading.Thread, queue.SimpleQueue[_Job | None]] = {}
"""The store threads still running (AsyncStore not closed): stopped at the interpreter's exit (`_stop_all`)."""


def _deliver(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop: hand one call's outcome to its caller, unless the caller went away (cancelled)."""
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """The store thread: each job in order, its outcome handed back with one `call_soon_threadsafe`."""
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        fn, fut, loop = job
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn()
        except StopIteration as exc:  # an asyncio future refuses it (it would end a coroutine silently)
            error = RuntimeError(f"store call raised StopIteration: {exc!r}")
        except BaseException as exc:  # every failure goes back to the caller, with its type
            error = exc
        if fut is None or loop is None:
            if error is not None:
                log.error("buffer call %r failed: %s", fn, error, exc_info=error)
        else:
            # RuntimeError: the loop is closed, nobody waits for this outcome any more (the work was done).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, fut, result, error)
        del job, fn, fut, loop, result, error


def _stop_all() -> None:
    """At exit, for every AsyncStore never closed: finish the queued calls, then end the thread (what
    ThreadPoolExecutor does for its workers), so that the interpreter neither hangs nor cuts a commit."""
    for thread, jobs in list(_serving.items()):
        jobs.put(_STOP)
        thread.join()
    _serving.clear()


atexit.register(_stop_all)


class AsyncStore:
    """Same methods as coroutines, run on ONE dedicated thread, `fieldgate-store` (fsync never blocks the loop).

    A call is queued (`queue.SimpleQueue`) to the thread, which runs the calls one at a time in order and hands
    each outcome back with one `loop.call_soon_threadsafe`: no `concurrent.futures.Future` in between (a
    ThreadPoolExecutor's submit, wrap_future and its chaining were ~6 % of the reference daemon's CPU).

    **A call once made always runs**, even when its caller is cancelled before or while it runs: an append
    still commits (its rows come back through `fetch`), an ack still deletes. (A ThreadPoolExecutor only let
    the *running* call survive; a queued one was dropped.) A cancelled caller just does not get the outcome.
    Exceptions reach the caller with their type. The thread starts at the first call (a process forks before
    it has a second thread: docs/ARCHITECTURE.md) and ends at `close`, after the store's own close; a
    process that never closes still finishes the queued calls and ends the thread at exit (`_stop_all`).

    `pin_fresh` pins the rows of the last append without a round trip (docs/STORE.md, "Fetch, pins and ack").
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Calls that can delete rows (append's eviction, purge, set_lanes) made so far, and (that count when
        # it was made, first seq of its rows) of the last append that returned rows. (A closed store: `_closed`.)
        self._removers = 0
        self._fresh: tuple[int, int] | None = None

    def _start(self) -> None:
        # A daemon thread, stopped by `_stop_all` at exit (atexit runs before daemon threads are cut).
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name="fieldgate-store", daemon=True
        )
        _serving[self._thread] = self._jobs
        self._thread.start()

    def _submit(self, fn: Callable[[], T], *, removes: bool = False) -> asyncio.Future[T]:
        if self._closed:
            raise StoreError(f"the buffer {self.store.path} is closed")
        loop = asyncio.get_running_loop()
        if removes:
            self._removers += 1
        if self._thread is None:
            self._start()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, fut, loop))
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        return await self._submit(fn)

    async def open(self) -> None:
        await self._call(self.store.open)

    async def append(self, readings: Sequence[Reading]) -> list[StoredRow]:
        done = self._submit(functools.partial(self.store.append, readings), removes=True)
        mine = self._removers
        rows = await done
        if rows:  # fresh only while no call that can delete rows follows this one (`pin_fresh` checks)
            self._fresh = (mine, rows[0].seq)
        return rows

    async def fetch(
        self, after_seq: int, before_seq: int | None, limit: int, lane: str | None = None
    ) -> list[StoredRow]:
        return await self._call(functools.partial(self.store.fetch, after_seq, before_seq, limit, lane))

    async def pin(self, rows: Sequence[StoredRow], lane: str | None = None) -> list[StoredRow]:
        return await self._call(functools.partial(self.store.pin, rows, lane))

    def pin_fresh(self, rows: Sequence[StoredRow], lane: str | None = None) -> bool:
        """Pin rows of the last append without waiting, when that is as safe as `pin`; False: call `pin`.

        True when every row comes from the last append (seq at or above its first row) and no call that can
        delete rows (an append, whose eviction could take them; a purge; set_lanes) was made since it: then
        the rows are in the buffer, and the pin, queued now, runs on the store's thread before any call that
        could evict them (the calls run in the order they were made). An ack cannot take them either: it
        deletes rows that every lane acknowledged, and this lane has not sent these yet. So the rows can be
        published at once, and no outcome has to come back to the loop (the live lane's pin: one round trip
        of the store thread per message less)."""
        fresh = self._fresh
        if self._closed or not rows or fresh is None or fresh[0] != self._removers or rows[0].seq < fresh[1]:
            return False
        lanes = self.store._lanes  # stable here: set_lanes, which changes them, would have made rows stale
        if lane is not None and len(lanes) > 1 and lane not in lanes:
            return False  # an unknown lane: `pin` says so to its caller
        if self._thread is None:  # cannot be (an append ran), but a pin must never be lost
            self._start()
        self._jobs.put((functools.partial(self.store.pin, rows, lane, known=True), None, None))
        return True

    async def ack(self, seqs: Sequence[int], lane: str | None = None) -> int:
        return await self._call(functools.partial(self.store.ack, seqs, lane))

    async def set_lanes(self, names: Sequence[str]) -> None:
        await self._submit(functools.partial(self.store.set_lanes, names), removes=True)

    async def purge(self, *, device: str | None = None, before_ts: int | None = None) -> int:
        return await self._submit(
            functools.partial(self.store.purge, device=device, before_ts=before_ts), removes=True
        )

    async def stats(self) -> StoreStats:
        return await self._call(self.store.stats)

    async def close(self) -> None:
        """Close the store on its thread after every call queued before, then end the thread. Safe to call
        twice; every call after the first close raises StoreError."""
        if self._closed:
            return
        done = self._submit(self.store.close)
        self._closed = True
        thread, self._thread = self._thread, None
        self._jobs.put(_STOP)  # behind the close: the thread ends once the store is closed
        try:
            await done
        finally:
            # The thread has handed back the close's outcome (or is finishing it when we were cancelled):
            # joining it takes at most what is left of the store's close.
            if thread is not None:
                thread.join()
                _serving.pop(thread, None)
