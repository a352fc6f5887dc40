"""Tests of the durable buffer: seq rules, fetch/ack, eviction, disk full, corruption, kill -9."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from agent.errors import StoreError
from agent.pipeline import store as store_module
from agent.pipeline.reading import Reading
from agent.pipeline.store import SEQ_BLOCK, AsyncStore, Store, StoredRow, StoreStats
from tests.vectors import REPO_ROOT

MiB = 1024 * 1024
T0 = 1_715_000_000_000


def readings(n: int, start: int = 0, device: str = "meter-1", unit: str | None = "W") -> list[Reading]:
    return [Reading(device, "power_w", T0 + (start + i) * 1000, 100.5 + i, unit) for i in range(n)]


def table_seqs(path: Path) -> list[int]:
    """The seqs really on disk, read through a connection of our own (WAL lets it read beside the store)."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT seq FROM readings ORDER BY seq")]
    finally:
        conn.close()


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "buffer.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db, 64 * MiB)
    s.open()
    yield s
    s.close()


# -- seq -----------------------------------------------------------------------------------------------


def test_seq_contiguous_from_one_and_persisted_across_reopen(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    first = s.append(readings(3))
    second = s.append(readings(500, start=3))
    assert [r.seq for r in first + second] == list(range(1, 504))
    s.close()

    s = Store(db, 64 * MiB, "normal")
    s.open()
    assert s.stats().next_seq == 504
    assert s.stats().pending == 503
    assert [r.seq for r in s.append(readings(2, start=503))] == [504, 505]
    s.close()
    assert table_seqs(db) == list(range(1, 506))


def test_seq_never_reused_after_every_row_acked_and_reopen(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    rows = s.append(readings(10))
    assert s.ack([r.seq for r in rows]) == 10
    s.close()

    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().pending == 0
    assert [r.seq for r in s.append(readings(1))] == [11]
    s.close()


def test_empty_append_stores_nothing_and_consumes_no_seq(store: Store) -> None:
    assert store.append([]) == []
    assert store.append(readings(1))[0].seq == 1


def test_unencodable_reading_is_skipped_without_consuming_a_seq(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [*readings(1), Reading("meter-1", "huge", T0, 2**70), *readings(1, start=1)]
    rows = store.append(batch)
    assert [r.seq for r in rows] == [1, 2]
    assert store.stats().pending == 2
    assert any("meter-1/huge" in rec.getMessage() for rec in caplog.records)


# -- body ----------------------------------------------------------------------------------------------


def test_body_is_the_spec_reading_object(store: Store) -> None:
    rows = store.append(
        [
            Reading("meter-1", "power_w", T0, 230.5, "W"),
            Reading("lamp-1", "on", T0 + 1, True),
            Reading("linky", "ADCO", T0 + 2, "021861348497", None, "uncertain"),
            Reading("lamp-1", "dim", T0 + 3, 40, "%"),
        ]
    )
    bodies = [orjson.loads(r.body) for r in rows]
    assert bodies == [
        {"seq": 1, "device": "meter-1", "point": "power_w", "ts": T0, "value": 230.5, "unit": "W"},
        {"seq": 2, "device": "lamp-1", "point": "on", "ts": T0 + 1, "value": True},
        {
            "seq": 3,
            "device": "linky",
            "point": "ADCO",
            "ts": T0 + 2,
            "value": "021861348497",
            "quality": "uncertain",
        },
        {"seq": 4, "device": "lamp-1", "point": "dim", "ts": T0 + 3, "value": 40, "unit": "%"},
    ]
    assert [r.ts for r in rows] == [T0, T0 + 1, T0 + 2, T0 + 3]
    assert store.fetch(0, None, 10) == rows


# -- fetch / ack ---------------------------------------------------------------------------------------


def test_fetch_windows(store: Store) -> None:
    store.append(readings(20))
    assert [r.seq for r in store.fetch(0, None, 5)] == [1, 2, 3, 4, 5]
    assert [r.seq for r in store.fetch(5, None, 100)] == list(range(6, 21))
    assert [r.seq for r in store.fetch(5, 9, 100)] == [6, 7, 8]
    assert [r.seq for r in store.fetch(5, 9, 2)] == [6, 7]
    assert store.fetch(20, None, 10) == []
    assert store.fetch(0, 1, 10) == []
    assert store.fetch(0, None, 0) == []


def test_ack_partial_ranges_duplicates_and_already_deleted(store: Store) -> None:
    store.append(readings(20))
    assert store.ack([3, 1, 2, 2, 7, 8, 9, 15]) == 7
    assert [r.seq for r in store.fetch(0, None, 100)] == [4, 5, 6, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20]
    # Already acked, never existed, and a range straddling deleted and pending rows.
    assert store.ack([1, 2, 3, 99, 1000]) == 0
    assert store.ack(list(range(1, 12))) == 5
    assert store.ack([]) == 0
    assert [r.seq for r in store.fetch(0, None, 100)] == [12, 13, 14, 16, 17, 18, 19, 20]
    assert store.stats().pending == 8


def test_pending_oldest_ts_and_bytes(db: Path, store: Store) -> None:
    empty = store.stats()
    assert (empty.pending, empty.oldest_ts, empty.evicted, empty.next_seq) == (0, None, 0, 1)
    assert empty.bytes > 0
    store.append(readings(1000))
    store.ack(list(range(1, 101)))
    stats = store.stats()
    assert stats.pending == 900 == len(table_seqs(db))
    assert stats.oldest_ts == T0 + 100 * 1000
    assert stats.bytes == disk_bytes(db)
    assert stats.bytes > 900 * 60  # each reading's JSON alone is over 60 bytes
    assert (stats.recovered, stats.disk_errors, stats.last_error) == (0, 0, None)


def test_purge_counts_as_evicted(db: Path, store: Store) -> None:
    store.append(readings(10, device="meter-1"))
    store.append(readings(10, start=10, device="air-1"))
    assert store.purge(device="air-1", before_ts=T0 + 15 * 1000) == 5
    assert store.purge(device="meter-1") == 10
    stats = store.stats()
    assert (stats.pending, stats.evicted) == (5, 15)
    assert table_seqs(db) == [16, 17, 18, 19, 20]
    assert store.purge() == 5
    assert store.stats().evicted == 20


def test_purge_of_a_large_buffer_goes_in_chunks_and_shrinks_the_file(db: Path, store: Store) -> None:
    store.append(readings(50_000))
    full = store.stats().bytes
    assert store.purge(before_ts=T0 + 45_000 * 1000) == 45_000
    stats = store.stats()
    assert (stats.pending, stats.evicted, stats.oldest_ts) == (5000, 45_000, T0 + 45_000 * 1000)
    assert table_seqs(db) == list(range(45_001, 50_001))
    assert stats.bytes < full // 3


def test_file_shrinks_back_when_the_backlog_is_drained(db: Path, store: Store) -> None:
    store.append(readings(40_000))
    full = store.stats().bytes
    after = 0
    while rows := store.fetch(after, None, 500):
        store.ack([r.seq for r in rows])
        after = rows[-1].seq
    drained = store.stats()
    assert drained.pending == 0
    assert full > 4 * MiB
    assert drained.bytes < full // 4


# -- bound and eviction --------------------------------------------------------------------------------


def test_eviction_keeps_the_file_bounded_and_counts_every_gap(
    db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(store_module, "_monotonic", lambda: clock[0])
    max_bytes = 2 * MiB
    s = Store(db, max_bytes, "normal")  # the bound does not depend on it; "full" only makes the test slower
    s.open()
    caplog.set_level(logging.WARNING, logger="fieldgate.store")
    peak = 0
    for k in range(300):
        s.append(readings(200, start=k * 200))
        peak = max(peak, disk_bytes(db))
        if k == 250:
            clock[0] += 10.0
    stats = s.stats()
    s.close()

    on_disk = table_seqs(db)
    assert peak <= max_bytes
    assert stats.evicted > 40_000  # 60,000 readings of ~135 bytes do not fit in 2 MiB
    # The survivors are the newest, contiguous up to the last seq; every missing seq is counted.
    assert on_disk == list(range(60_001 - len(on_disk), 60_001))
    assert stats.evicted == 60_000 - len(on_disk)
    assert stats.pending == len(on_disk)
    # Rate-limited to one line per 10 s: the first burst, one after the clock moved, the remainder at close.
    counts = [int(m[1]) for r in caplog.records if (m := re.search(r"evicted the (\d+)", r.getMessage()))]
    assert len(counts) == 3
    assert sum(counts) == stats.evicted

    s = Store(db, max_bytes)
    s.open()
    assert s.stats().evicted == stats.evicted
    assert s.append(readings(1))[0].seq == 60_001
    s.close()


def test_a_batch_larger_than_the_bound_keeps_its_newest_rows(db: Path) -> None:
    s = Store(db, 256 * 1024)
    s.open()
    s.append(readings(10))
    rows = s.append(readings(5000, start=10))
    stats = s.stats()
    assert rows == s.fetch(0, None, 10_000)
    assert rows[-1].seq == 5010
    assert [r.seq for r in rows] == list(range(5011 - len(rows), 5011))
    assert 0 < len(rows) < 5000
    assert stats.evicted == 5010 - len(rows) == 5010 - stats.pending
    s.close()


def test_max_bytes_below_minimum_is_refused(db: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        Store(db, 1000)


# -- disk full -----------------------------------------------------------------------------------------


def test_disk_full_raises_store_error_and_the_store_stays_usable(db: Path) -> None:
    s = Store(db, 64 * MiB, max_page_count=64)
    s.open()
    stored = 0
    with pytest.raises(StoreError, match="disk is full"):
        for k in range(1000):
            stored += len(s.append(readings(100, start=k * 100)))
    stats = s.stats()
    assert stored > 0
    assert stats.next_seq == stored + 1
    assert stats.pending == stored == len(table_seqs(db))
    assert stats.disk_errors == 1
    assert stats.last_error is not None and "disk is full" in stats.last_error

    s.set_max_page_count(None)
    rows = s.append(readings(100, start=stored))
    assert [r.seq for r in rows] == list(range(stored + 1, stored + 101))
    assert table_seqs(db) == list(range(1, stored + 101))
    s.close()


def test_operations_on_a_closed_store_raise_store_error(db: Path) -> None:
    s = Store(db, 64 * MiB)
    with pytest.raises(StoreError, match="not open"):
        s.append(readings(1))
    s.open()
    s.close()
    s.close()
    with pytest.raises(StoreError, match="not open"):
        s.stats()


# -- corruption ----------------------------------------------------------------------------------------


def aside_files(db: Path) -> list[Path]:
    """The database files moved aside (without their -wal/-shm companions)."""
    return sorted(p for p in db.parent.glob(f"{db.name}.corrupt-*") if not p.name.endswith(("-wal", "-shm")))


def damage_a_readings_page(db: Path) -> None:
    with db.open("r+b") as f:
        f.seek(4096 * 20)  # a leaf page in the middle of the readings table; schema and meta pages come first
        f.write(b"\xa5" * 4096)


def test_garbage_file_is_moved_aside_and_seq_jumps_past_anything_sent(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = os.urandom(3000)
    db.write_bytes(garbage)
    before = time.time_ns() // 1_000_000 * 1000
    s = Store(db, 64 * MiB)
    s.open()
    stats = s.stats()
    assert stats.recovered == 1
    assert stats.pending == 0
    assert stats.next_seq > before
    assert s.append(readings(1))[0].seq == stats.next_seq
    s.close()

    moved = aside_files(db)
    assert len(moved) == 1
    assert re.fullmatch(r"buffer\.db\.corrupt-\d{8}T\d{6}Z", moved[0].name)
    assert moved[0].read_bytes() == garbage
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "fieldgate.store"]
    assert len(errors) == 1
    assert "moved it aside" in errors[0].getMessage()


def test_truncated_database_is_moved_aside_and_its_seq_salvaged(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5000))
    s.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])

    s = Store(db, 64 * MiB)
    s.open()
    stats = s.stats()
    assert (stats.recovered, stats.pending, stats.next_seq) == (1, 0, 5001)
    s.close()
    assert len(aside_files(db)) == 1

    # The salvaged high-water mark and the counter are persisted: a restart before any append keeps them.
    s = Store(db, 64 * MiB)
    s.open()
    stats = s.stats()
    assert (stats.recovered, stats.next_seq) == (1, 5001)
    assert s.append(readings(1))[0].seq == 5001
    s.close()


def test_damaged_page_fails_the_integrity_check_and_is_replaced(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5000))
    s.close()
    damage_a_readings_page(db)

    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().recovered == 1
    assert s.stats().next_seq == 5001
    s.close()


def test_a_second_recovery_counts_two(db: Path) -> None:
    db.write_bytes(b"not a database at all" * 100)
    s = Store(db, 64 * MiB)
    s.open()
    first_seq = s.append(readings(3000))[0].seq
    s.close()
    damage_a_readings_page(db)

    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().recovered == 2
    assert s.stats().next_seq == first_seq + 3000
    s.close()
    assert len(aside_files(db)) == 2


def test_a_log_without_its_database_is_moved_aside(db: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    Path(f"{db}-wal").write_bytes(Path(f"{other}-wal").read_bytes())
    conn.close()

    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().recovered == 1
    assert s.stats().next_seq > 1  # unknown history: the time-based seq
    s.close()
    assert [p.name.endswith("-wal") for p in db.parent.glob(f"{db.name}.corrupt-*")] == [True]


def test_a_buffer_from_a_newer_format_is_refused_not_replaced(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer fieldgate"):
        Store(db, 64 * MiB).open()
    assert aside_files(db) == []


# -- kill -9 -------------------------------------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from typing import Any
from agent.pipeline.reading import Reading
from agent.pipeline.store import Store
store = Store(Path(sys.argv[1]), 64 * 1024 * 1024, sys.argv[2])
store.open()
i = 0
while True:
    rows = store.append([Reading("meter-1", "power_w", 1_715_000_000_000 + i, i, "W") for _ in range(10)])
    i += 1
    print(rows[-1].seq, flush=True)
"""


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_kill_9_loses_no_committed_reading_and_keeps_seq_contiguous(db: Path, synchronous: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), synchronous],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
        text=True,
    ) as child:
        assert child.stdout is not None
        printed = [int(child.stdout.readline()) for _ in range(150)]
        os.kill(child.pid, signal.SIGKILL)
        printed += [int(line) for line in child.stdout.read().split()]
        assert child.wait() == -signal.SIGKILL
    last_committed = printed[-1]
    assert Path(f"{db}-wal").exists()  # the crash left the log behind, as a real one does

    s = Store(db, 64 * MiB)
    s.open()
    stats = s.stats()
    on_disk = table_seqs(db)
    assert stats.recovered == 0
    assert stats.pending == len(on_disk)
    # Everything acknowledged to the writer is there, contiguous; at most the batch in flight beyond it.
    assert on_disk == list(range(1, len(on_disk) + 1))
    assert last_committed <= len(on_disk) <= last_committed + 10
    assert stats.next_seq == len(on_disk) + 1
    assert s.append(readings(1))[0].seq == len(on_disk) + 1
    s.close()


# -- AsyncStore ----------------------------------------------------------------------------------------


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fieldgate-store")]


async def test_async_store_round_trip(db: Path) -> None:
    astore = AsyncStore(Store(db, 64 * MiB))
    await astore.open()
    rows = await astore.append(readings(50))
    assert [r.seq for r in rows] == list(range(1, 51))
    assert len(store_threads()) == 1
    assert await astore.fetch(10, 15, 100) == rows[10:14]
    assert await astore.ack([r.seq for r in rows[:40]]) == 40
    assert await astore.purge(before_ts=T0 + 45 * 1000) == 5
    stats = await astore.stats()
    assert (stats.pending, stats.evicted, stats.next_seq) == (5, 5, 51)
    await astore.close()
    await astore.close()
    assert store_threads() == []
    with pytest.raises(StoreError, match="closed"):
        await astore.stats()


# -- found by mutation testing (docs/TESTING.md): the async wrappers' arguments, lanes in a purge, the words
# of each SQLite failure, corruption detection without an error code, the names of moved-aside files ------


async def test_async_store_passes_every_argument_through(db: Path) -> None:
    s = AsyncStore(Store(db, 64 * MiB))
    await s.open()
    try:
        await s.set_lanes(["a", "b"])
        assert s.store.lanes() == ["a", "b"]
        rows = await s.append(readings(4) + readings(2, start=10, device="meter-2"))
        assert [r.seq for r in await s.pin(rows[:2], "a")] == [1, 2]
        assert s.store.stats().pinned == 2
        assert await s.ack([1, 2], "a") == 0  # lane b has not acknowledged them: nothing deleted yet
        assert [r.seq for r in await s.fetch(0, None, 10, "a")] == [3, 4, 5, 6]
        assert [r.seq for r in await s.fetch(0, None, 10, "b")] == [1, 2, 3, 4, 5, 6]
        assert await s.ack([1], "b") == 1
        assert await s.purge(device="meter-2") == 2
        assert await s.purge(before_ts=T0 + 3000) == 2  # seqs 2 and 3
        stats = await s.stats()
        assert (stats.pending, stats.evicted) == (1, 4)
        # Each lane's gaps: b lost 2, 3, 5, 6; a had acknowledged 2 before the purge.
        assert stats.lane_evicted == {"a": 3, "b": 4}
        assert stats.lanes == {"a": 1, "b": 1}
    finally:
        await s.close()
    again = Store(db, 64 * MiB)
    again.open()
    try:
        again.set_lanes(["a", "b"])
        assert again.lane_evicted() == {"a": 3, "b": 4}  # persisted
    finally:
        again.close()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (13, "the disk is full (or the buffer reached its page limit)"),
        (778, "I/O error on {path} (boom)"),  # SQLITE_IOERR_WRITE: an extended code, its primary is 10
        (5, "{path} is locked by another process (boom)"),
        (6, "{path} is locked by another process (boom)"),
        (8, "{path} is read-only (boom)"),
        (14, "cannot open {path} (boom)"),
        (11, "{path} is corrupt (boom); the next start replaces it"),
        (26, "{path} is corrupt (boom); the next start replaces it"),
        (1, "boom"),
    ],
)
def test_each_sqlite_failure_is_said_in_words_and_counted(
    store: Store, db: Path, code: int, words: str
) -> None:
    exc = sqlite3.OperationalError("boom")
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    error = store._error("append", exc)
    message = f"buffer append failed: {words.format(path=db)}"
    assert str(error).startswith(message)
    stats = store.stats()
    assert (stats.disk_errors, stats.last_error) == (1, str(error))


def test_corruption_is_recognised_by_its_code_or_else_by_its_words() -> None:
    def error(text: str, code: int | None) -> sqlite3.DatabaseError:
        exc = sqlite3.DatabaseError(text)
        if code is not None:
            exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    assert store_module._is_corruption(error("x", 11))
    assert store_module._is_corruption(error("x", 26))
    assert store_module._is_corruption(error("x", 11 | (1 << 8)))  # an extended code of SQLITE_CORRUPT
    assert not store_module._is_corruption(error("database disk image is malformed", 10))  # the code decides
    assert store_module._is_corruption(error("database disk image is malformed", None))
    assert store_module._is_corruption(error("file is not a database", None))
    assert not store_module._is_corruption(error("disk I/O error", None))


def test_files_moved_aside_in_the_same_second_get_the_next_free_number(store: Store, db: Path) -> None:
    stamp = "20260101T000000Z"
    Path(f"{db}.corrupt-{stamp}").write_bytes(b"")
    Path(f"{db}.corrupt-{stamp}-1").write_bytes(b"")
    store.close()
    aside = store._move_aside(stamp)
    assert aside.name == f"{db.name}.corrupt-{stamp}-2"
    assert aside.exists() and not db.exists()


def recovery_log(caplog: pytest.LogCaptureFixture) -> str:
    (record,) = [
        r for r in caplog.records if r.levelno == logging.ERROR and "moved it aside" in r.getMessage()
    ]
    return record.getMessage()


def test_a_recovery_says_where_the_file_went_and_where_seq_resumes(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5000))
    s.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.ERROR):
        s = Store(db, 64 * MiB)
        s.open()
    s.close()
    (aside,) = aside_files(db)
    message = recovery_log(caplog)
    assert message.startswith(f"buffer {db} was unusable (")
    assert f"moved it aside to {aside} and started a fresh buffer at seq 5001 (" in message
    assert "(continuing after the old file's last seq and the seq mark)" in message


def test_a_recovery_without_any_seq_left_jumps_to_a_time_value_and_says_so(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db.write_bytes(os.urandom(3000))  # garbage, and no seq mark beside it
    with caplog.at_level(logging.ERROR):
        s = Store(db, 64 * MiB)
        s.open()
    next_seq = s.stats().next_seq
    s.close()
    assert next_seq % 1000 == 0  # exactly the time value (milliseconds x 1000), no seq below it skipped
    message = recovery_log(caplog)
    assert f"started a fresh buffer at seq {next_seq} (" in message
    assert "(its last seq was unreadable, so seq jumps to a time-based value)" in message


def salvage_file(path: Path, sequence: int | None, seqs: list[int], meta: dict[str, int]) -> Path:
    """A buffer-shaped file (as a corrupt one may still be readable) with the given seq state and counters."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY AUTOINCREMENT, x)")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
    conn.executemany("INSERT INTO readings (seq) VALUES (?)", [(s,) for s in seqs])
    conn.execute("DELETE FROM sqlite_sequence")
    if sequence is not None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('readings', ?)", (sequence,))
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    ("sequence", "seqs", "meta", "expected"),
    [
        (7, [3, 9], {"evicted": 4, "recovered": 2}, (9, 4, 2)),  # the higher of the counter and the rows
        (12, [3], {"evicted": 0}, (12, 0, 0)),  # a counter missing: 0, not guessed
        (0, [], {}, (0, 0, 0)),  # seq 0 is a seq
        (None, [], {"recovered": 1}, (None, 0, 1)),  # nothing says where seq was
        (2**62 - 1, [], {}, (2**62 - 1, 0, 0)),
        (2**62, [], {}, (None, 0, 0)),  # beyond any seq the store hands out: garbage, not a mark
        (-5, [], {"evicted": -1}, (None, 0, 0)),
    ],
)
def test_salvage_reads_what_it_can_and_nothing_implausible(
    tmp_path: Path, sequence: int | None, seqs: list[int], meta: dict[str, int], expected: tuple[Any, ...]
) -> None:
    path = salvage_file(tmp_path / "old.db", sequence, seqs, meta)
    got = Store._salvage(path)
    assert (got.high_water, got.evicted, got.recovered) == expected


def test_salvage_of_a_file_that_cannot_be_opened(tmp_path: Path) -> None:
    got = Store._salvage(tmp_path / "gone.db")
    assert (got.high_water, got.evicted, got.recovered) == (None, 0, 0)
    assert not (tmp_path / "gone.db").exists()  # read-only: never creates anything


def test_as_many_lanes_as_the_limit_are_accepted(store: Store) -> None:
    names = [f"up{i}" for i in range(store_module.MAX_LANES)]
    store.set_lanes(names)
    assert store.lanes() == names
    with pytest.raises(ValueError, match=f"at most {store_module.MAX_LANES} upstreams, not 63"):
        store.set_lanes([*names, "one-more"])


def test_an_operator_purge_is_logged_with_what_it_deleted(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.append(readings(3) + readings(2, device="meter-2"))
    with caplog.at_level(logging.WARNING):
        store.purge(device="meter-2", before_ts=T0 + 10_000)
    assert [r.getMessage() for r in caplog.records if "purged" in r.getMessage()] == [
        f"buffer purged by the operator (device=meter-2, before_ts={T0 + 10_000}): 2 unsent readings deleted, "
        "counted as evicted"
    ]


# == found by the second mutation run (docs/TESTING.md): the lanes' bits and counts, each write's failure path (a
# real SQLite error raised in the middle of the store's own transaction, by a trigger another connection adds),
# when the file gives its pages back, what close records, the one thread that keeps the calls in order, the
# connection's settings, unreadable seq marks, the reasons of a database behind its mark =====================


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """What is on disk, read through a connection of our own (closed at once: it must not hold the WAL)."""
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


def lane_bits(db: Path) -> dict[str, int]:
    return {str(name): int(bit) for name, bit in query(db, "SELECT name, bit FROM lanes")}


def seqs(rows: Sequence[StoredRow]) -> list[int]:
    return [r.seq for r in rows]


# -- lanes -------------------------------------------------------------------------------------------------


def test_the_default_lane_alone_records_nothing_and_acks_at_once(store: Store, db: Path) -> None:
    store.append(readings(5))
    for names in ([], ["mqtt"], ["mqtt", "mqtt"]):
        store.set_lanes(names)
        assert store.lanes() == ["mqtt"]
    assert lane_bits(db) == {}
    stats = store.stats()
    assert (stats.lanes, stats.lane_evicted, stats.pending) == ({"mqtt": 5}, {"mqtt": 0}, 5)
    assert seqs(store.fetch(0, None, 10, "mqtt")) == [1, 2, 3, 4, 5]
    assert store.ack([1, 2], "mqtt") == 2  # one lane: deleted at once
    assert store.stats().lanes == {"mqtt": 3}


def test_lane_bits_are_persisted_and_kept_in_any_order(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.set_lanes(["a", "b", "a"])
    assert s.lanes() == ["a", "b"]
    assert lane_bits(db) == {"a": 0, "b": 1}
    s.append(readings(6))
    assert s.ack([1, 2], "a") == 0
    assert s.ack([1], "a") == 0  # already acknowledged by a: not counted twice
    assert s.stats().lanes == {"a": 4, "b": 6}
    s.close()

    s = Store(db, 64 * MiB)
    s.open()
    s.set_lanes(["b", "a"])
    try:
        assert s.lanes() == ["b", "a"]
        assert lane_bits(db) == {"a": 0, "b": 1}
        stats = s.stats()
        assert (stats.lanes, stats.pending) == ({"b": 6, "a": 4}, 6)
        assert seqs(s.fetch(0, None, 10, "a")) == [3, 4, 5, 6]
        assert seqs(s.fetch(0, None, 10, "b")) == [1, 2, 3, 4, 5, 6]
        assert seqs(s.fetch(0, None, 10)) == [1, 2, 3, 4, 5, 6]  # no lane: every pending row
    finally:
        s.close()


def test_a_forgotten_lane_s_bit_is_cleared_and_serves_the_next_new_lane(store: Store, db: Path) -> None:
    store.set_lanes(["a", "b", "c"])
    store.append(readings(6))
    assert store.ack([1, 2, 3], "b") == 0
    assert store.ack([3, 4], "a") == 0
    assert store.ack([3], "c") == 1  # every lane has it now
    assert store.stats().pending == 5
    store.set_lanes(["a", "c", "d"])  # b is forgotten; d takes its bit, with every row still to send
    assert lane_bits(db) == {"a": 0, "c": 2, "d": 1}
    assert store.stats().lanes == {"a": 4, "c": 5, "d": 5}
    assert seqs(store.fetch(0, None, 10, "d")) == [1, 2, 4, 5, 6]  # b's acks are not d's
    assert seqs(store.fetch(0, None, 10, "a")) == [1, 2, 5, 6]
    assert store.ack([1, 2, 5, 6], "c") == 0
    assert store.ack([4], "c") == 0
    # Forgetting d: rows 4 (a and c) is acknowledged by every remaining lane, so it goes.
    store.set_lanes(["a", "c"])
    stats = store.stats()
    assert (stats.pending, stats.lanes) == (4, {"a": 4, "c": 0})
    assert seqs(store.fetch(0, None, 10)) == [1, 2, 5, 6]
    # Back to one lane (a): the rows a acknowledged go; the rest stay for a, now the only lane.
    assert store.ack([1], "a") == 1
    store.set_lanes(["a"])
    assert lane_bits(db) == {"a": 0}
    stats = store.stats()
    assert (stats.pending, stats.lanes) == (3, {"a": 3})
    assert seqs(store.fetch(0, None, 10, "a")) == [2, 5, 6]


def test_a_new_lane_starts_with_every_pending_row(store: Store) -> None:
    store.set_lanes(["a", "b"])
    store.append(readings(4))
    store.ack([1, 2], "a")
    store.ack([2, 3], "b")
    store.set_lanes(["a", "b", "c"])
    assert store.stats().lanes == {"a": 2, "b": 2, "c": 3}
    assert store.stats().pending == 3
    assert seqs(store.fetch(0, None, 10, "c")) == [1, 3, 4]


def test_lane_fetch_keeps_its_window_and_limit_and_refuses_an_unknown_lane(store: Store) -> None:
    store.set_lanes(["a", "b"])
    store.append(readings(10))
    store.ack([2, 4, 6], "a")
    assert seqs(store.fetch(0, 7, 10, "a")) == [1, 3, 5]
    assert seqs(store.fetch(1, None, 2, "a")) == [3, 5]
    assert seqs(store.fetch(5, 9, 10, "a")) == [7, 8]
    assert store.fetch(0, None, 0, "a") == []
    with pytest.raises(StoreError, match=r"unknown upstream lane 'z' \(lanes: a, b\)"):
        store.fetch(0, None, 10, "z")
    with pytest.raises(StoreError, match="unknown upstream lane 'z'"):
        store.ack([1], "z")
    with pytest.raises(StoreError, match="unknown upstream lane 'z'"):
        store.pin(store.fetch(0, None, 1), "z")


def test_a_forgotten_lane_no_longer_holds_its_rows_in_flight(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.set_lanes(["a", "b"])
    rows = s.append(readings(4))
    s.pin(rows[:1], "a")
    s.pin(rows, "b")
    assert s.stats().pinned == 4
    s.close()
    assert sorted(query(db, "SELECT seq, lanes FROM inflight")) == [(1, 3), (2, 2), (3, 2), (4, 2)]

    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().pinned == 4
    s.set_lanes(["a"])
    assert s.stats().pinned == 1
    s.close()
    # Recorded as it is now, not as it was at the last start.
    assert query(db, "SELECT seq, lanes FROM inflight") == [(1, 1)]

    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().pinned == 1
    assert s.ack([1]) == 1
    assert s.stats().pinned == 0
    s.close()
    assert query(db, "SELECT seq, lanes FROM inflight") == []


def test_an_ack_without_a_lane_takes_the_rows_out_for_every_lane(store: Store) -> None:
    store.set_lanes(["a", "b"])
    rows = store.append(readings(3))
    store.pin(rows, "a")
    store.pin(rows, "b")
    assert store.ack([1, 2]) == 2
    stats = store.stats()
    assert (stats.pending, stats.pinned) == (1, 1)
    assert store.lane_pending() == {"a": 1, "b": 1}  # each lane's count follows (it was 3 and 3)
    store.ack([3], "a")
    assert store.lane_pending() == {"a": 0, "b": 1}


def test_a_pin_of_a_lane_is_released_by_that_lane_only(store: Store) -> None:
    store.set_lanes(["a", "b"])
    rows = store.append(readings(3))
    assert store.pin([], "a") == []
    store.pin(rows, "a")
    store.pin(rows[1:], "b")
    store.ack([1, 2, 3], "b")  # b had 2, 3 in flight; a still has all three
    assert store.stats().pinned == 3
    store.ack([2], "a")
    assert store.stats().pinned == 2
    assert store.ack([1, 3], "a") == 2
    assert store.stats().pinned == 0


# -- failure paths: a real SQLite error in the middle of the store's transaction --------------------------


def fail(db: Path, event: str, table: str, name: str = "boom") -> None:
    """Make every `event` on `table` fail with SQLite's "boom" (a trigger: the store's statement fails, its
    transaction stays open, as with an I/O error on a page the statement writes)."""
    query(db, f"CREATE TRIGGER {name} BEFORE {event} ON {table} BEGIN SELECT RAISE(ABORT, 'boom'); END")


def heal(db: Path, name: str = "boom") -> None:
    query(db, f"DROP TRIGGER {name}")


def assert_failed_once(store: Store, words: str) -> None:
    stats = store.stats()
    assert stats.disk_errors == 1
    assert stats.last_error == f"buffer {words} failed: boom"


def test_a_failed_append_stores_nothing_consumes_no_seq_and_leaves_no_transaction(
    store: Store, db: Path
) -> None:
    store.append(readings(2))
    fail(db, "INSERT", "readings")
    with pytest.raises(StoreError, match=r"^buffer append of 3 readings failed: boom$"):
        store.append(readings(3, start=2))
    assert_failed_once(store, "append of 3 readings")
    assert (store.stats().pending, store.stats().next_seq) == (2, 3)
    heal(db)
    assert seqs(store.append(readings(1, start=2))) == [3]
    assert [row[0] for row in query(db, "SELECT seq FROM readings ORDER BY seq")] == [1, 2, 3]


def test_a_failed_ack_deletes_nothing_and_the_next_one_works(store: Store, db: Path) -> None:
    rows = store.pin(store.append(readings(3)))
    fail(db, "DELETE", "readings")
    with pytest.raises(StoreError, match=r"^buffer ack of 2 readings failed: boom$"):
        store.ack([1, 2])
    assert_failed_once(store, "ack of 2 readings")
    assert (store.stats().pending, store.stats().pinned) == (3, 3)
    heal(db)
    assert store.ack([1, 2]) == 2
    assert (store.stats().pending, store.stats().pinned) == (1, 1)
    assert store.fetch(0, None, 10) == rows[2:]


def test_a_failed_lane_ack_marks_nothing(store: Store, db: Path) -> None:
    store.set_lanes(["a", "b"])
    store.append(readings(3))
    fail(db, "UPDATE", "readings")
    with pytest.raises(StoreError, match=r"^buffer ack of 2 readings for upstream 'a' failed: boom$"):
        store.ack([1, 2], "a")
    assert_failed_once(store, "ack of 2 readings for upstream 'a'")
    assert store.stats().lanes == {"a": 3, "b": 3}
    heal(db)
    assert store.ack([1, 2], "a") == 0
    assert store.stats().lanes == {"a": 1, "b": 3}


def test_a_failed_purge_counts_nothing(store: Store, db: Path) -> None:
    store.append(readings(4))
    fail(db, "DELETE", "readings")
    with pytest.raises(StoreError, match=r"^buffer purge \(after 0 readings deleted\) failed: boom$"):
        store.purge()
    assert_failed_once(store, "purge (after 0 readings deleted)")
    assert (store.stats().pending, store.stats().evicted) == (4, 0)
    heal(db)
    assert store.purge(before_ts=T0 + 2000) == 2
    assert (store.stats().pending, store.stats().evicted) == (2, 2)
    assert query(db, "SELECT value FROM meta WHERE key = 'evicted'") == [(2,)]


def test_a_failed_set_lanes_keeps_the_lanes_it_had(store: Store, db: Path) -> None:
    store.set_lanes(["a", "b"])
    store.append(readings(2))
    fail(db, "INSERT", "lanes")
    with pytest.raises(StoreError, match=r"^buffer setting the upstream lanes failed: boom$"):
        store.set_lanes(["a", "c"])
    assert_failed_once(store, "setting the upstream lanes")
    assert store.lanes() == ["a", "b"]
    assert lane_bits(db) == {"a": 0, "b": 1}
    heal(db)
    store.set_lanes(["a", "c"])
    assert lane_bits(db) == {"a": 0, "c": 1}


def test_a_failed_eviction_rolls_the_whole_batch_back(db: Path) -> None:
    s = Store(db, 256 * 1024, "normal")
    s.open()
    try:
        k = 0
        while s.stats().evicted == 0:
            s.append(readings(100, start=k * 100))
            k += 1
        before = s.stats()
        fail(db, "DELETE", "readings")
        with pytest.raises(StoreError, match=r"^buffer append of 500 readings failed: boom$"):
            s.append(readings(500, start=k * 100))
        after = s.stats()
        kept = (after.pending, after.evicted, after.next_seq)
        assert kept == (before.pending, before.evicted, before.next_seq)
        heal(db)
        rows = s.append(readings(500, start=k * 100))
        assert rows[0].seq == before.next_seq
    finally:
        s.close()


def test_rows_in_flight_not_recorded_at_close_are_said_and_the_close_completes(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.pin(s.append(readings(2)))
    fail(db, "INSERT", "inflight")
    with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
        s.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"buffer {db}: the rows in flight were not recorded at close: boom"
    ]
    assert Path(f"{db}.seq").read_text() == "3 closed\n"
    heal(db)
    assert query(db, "SELECT seq FROM inflight") == []
    s = Store(db, 64 * MiB)
    s.open()
    assert (s.stats().pinned, s.stats().next_seq) == (0, 3)
    s.close()


def test_a_mark_not_written_at_close_is_said_and_the_next_start_resumes_at_the_reserved_one(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(3))
    Path(f"{db}.seq.tmp").mkdir()  # the temp file cannot be created: the side file keeps "<H> open"
    with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
        s.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"buffer seq mark {db}.seq not written: Is a directory (the next start resumes at the reserved mark instead)"
    ]
    assert Path(f"{db}.seq").read_text() == f"{1 + SEQ_BLOCK} open\n"
    Path(f"{db}.seq.tmp").rmdir()
    s = Store(db, 64 * MiB)
    s.open()
    assert s.stats().next_seq == 1 + SEQ_BLOCK
    s.close()


# -- giving pages back -------------------------------------------------------------------------------------


def pages(db: Path) -> tuple[int, int]:
    """(page_count, freelist_count) of the file as committed."""
    ((total, free),) = query(
        db,
        "SELECT (SELECT page_count FROM pragma_page_count()), (SELECT freelist_count FROM pragma_freelist_count())",
    )
    return int(total), int(free)


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_a_drained_backlog_gives_every_free_page_back_and_empties_the_wal(store: Store, db: Path) -> None:
    store.append(readings(20_000))  # about 700 pages: more than one vacuum step of 256
    full, _ = pages(db)
    assert store.ack(list(range(1, 20_001))) == 20_000
    total, free = pages(db)
    assert free == 0
    assert total < full // 10
    assert wal_size(db) == 0
    assert store.stats().disk_errors == 0


def test_the_file_keeps_its_pages_until_three_quarters_are_free(store: Store, db: Path) -> None:
    store.append(readings(20_000))
    full, _ = pages(db)
    store.ack(list(range(1, 14_001)))  # 70 % acknowledged: more than 1 MiB free, less than 3/4 of the file
    total, free = pages(db)
    assert total == full
    assert free * 4096 > MiB
    assert store.ack(list(range(14_001, 17_001))) == 3000  # 85 %: now it shrinks
    total, free = pages(db)
    assert free == 0
    assert total < full // 4


def test_a_small_file_keeps_its_pages_even_when_empty(store: Store, db: Path) -> None:
    store.append(readings(3000))  # about 100 pages: less than 1 MiB would be given back
    full, _ = pages(db)
    store.ack(list(range(1, 3001)))
    total, free = pages(db)
    assert total == full
    assert free > full // 2


# -- the one thread --------------------------------------------------------------------------------------


class GatedStore(Store):
    """A store whose first `stats` call waits for a gate: what runs meanwhile, and where, is recorded."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 64 * MiB)
        self.gate = threading.Event()
        self.calls: list[tuple[str, int, str]] = []

    def stats(self) -> StoreStats:
        n = sum(1 for c in self.calls if c[0] == "start")
        self.calls.append(("start", n, threading.current_thread().name))
        if n == 0:
            self.gate.wait(timeout=20)
        result = super().stats()
        self.calls.append(("end", n, threading.current_thread().name))
        return result


async def test_the_store_s_calls_run_one_at_a_time_in_order_on_one_thread(db: Path) -> None:
    store = GatedStore(db)
    astore = AsyncStore(store)
    await astore.open()
    try:
        first = asyncio.create_task(astore.stats())
        second = asyncio.create_task(astore.stats())
        done, _ = await asyncio.wait({second}, timeout=0.3)
        assert not done  # the second call waits for the first, which waits for the gate
        store.gate.set()
        await asyncio.gather(first, second)
        threads = {name for _, _, name in store.calls}
        order = [(event, n) for event, n, _ in store.calls]
        assert order == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
        assert len(threads) == 1
        assert threads.pop().startswith("fieldgate-store")
    finally:
        store.gate.set()
        await astore.close()


async def test_an_async_pin_holds_the_row_for_its_lane_only(db: Path) -> None:
    astore = AsyncStore(Store(db, 64 * MiB))
    await astore.open()
    try:
        await astore.set_lanes(["a", "b"])
        rows = await astore.append(readings(2))
        assert await astore.pin(rows, "a") == rows
        assert await astore.ack([1, 2], "a") == 0
        assert (await astore.stats()).pinned == 0  # pinned for a, released by a's ack
    finally:
        await astore.close()


async def test_a_queued_call_runs_even_when_its_caller_is_cancelled(db: Path) -> None:
    """The rule of AsyncStore (docs/STORE.md): a call once made always runs. A ThreadPoolExecutor dropped a
    call still queued when its caller was cancelled; here the cancelled append and ack are done all the same,
    in the order they were made, and a caller cancelled while its call runs does not stop it either."""
    store = GatedStore(db)
    astore = AsyncStore(store)
    await astore.open()
    try:
        await astore.append(readings(3))
        held = asyncio.create_task(astore.stats())  # takes the thread until the gate opens
        appending = asyncio.create_task(astore.append(readings(2, start=3)))
        acking = asyncio.create_task(astore.ack([1, 2]))
        await asyncio.sleep(0.05)  # both queued behind the gated stats
        appending.cancel()
        acking.cancel()
        await asyncio.gather(appending, acking, return_exceptions=True)
        assert appending.cancelled() and acking.cancelled()
        store.gate.set()
        await held
        stats = await astore.stats()
        assert (stats.pending, stats.next_seq) == (3, 6)
        assert table_seqs(db) == [3, 4, 5]
    finally:
        store.gate.set()
        await astore.close()


async def test_pin_fresh_pins_the_last_append_s_rows_ahead_of_the_eviction_queued_after_it(db: Path) -> None:
    """`pin_fresh` does not wait, yet its pin runs before any call made after it: an append queued at once,
    which must evict, skips the freshly pinned rows (the oldest) and evicts from its own batch instead."""
    astore = AsyncStore(Store(db, store_module.MIN_MAX_BYTES))
    await astore.open()
    try:
        fresh = await astore.append(readings(50))
        assert astore.pin_fresh(fresh[:30])  # a live batch of batch_max rows: the first 30
        assert astore.pin_fresh(fresh[30:])  # and the rest, in a second message
        flood = asyncio.ensure_future(astore.append(readings(4000, start=50)))
        stored = await flood
        stats = await astore.stats()
        assert stats.evicted > 0 and stats.pinned == 50
        on_disk = table_seqs(db)
        assert on_disk[:50] == list(range(1, 51))  # every pinned row kept
        assert [r.seq for r in stored] == on_disk[50:]  # the batch's own oldest rows went instead
        assert await astore.ack(list(range(1, 51))) == 50
        assert (await astore.stats()).pinned == 0
    finally:
        await astore.close()


async def test_pin_fresh_declines_whenever_the_rows_might_be_gone(db: Path) -> None:
    """Only the rows of the last append, and only while no call that can delete rows was made after it."""
    astore = AsyncStore(Store(db, 64 * MiB))
    assert not astore.pin_fresh([StoredRow(1, T0, b"{}")])  # nothing appended yet
    await astore.open()
    try:
        older = await astore.append(readings(3))
        assert astore.pin_fresh(older)
        last = await astore.append(readings(3, start=3))
        assert not astore.pin_fresh(older)  # an append since: its eviction may have taken them
        assert not astore.pin_fresh(older[-1:] + last)  # one row of an earlier append is enough to decline
        assert not astore.pin_fresh([])
        assert astore.pin_fresh(last[1:])
        # Calls that cannot delete these rows leave the rows fresh: fetch, stats, pin, ack of other rows.
        await astore.fetch(0, None, 10)
        await astore.stats()
        await astore.ack([1])
        assert astore.pin_fresh(last)
        queued = asyncio.ensure_future(astore.append(readings(1, start=6)))
        await asyncio.sleep(0)  # made (queued), not yet done
        assert not astore.pin_fresh(last)
        newest = await queued
        assert astore.pin_fresh(newest)
        await astore.purge(device="nobody")
        assert not astore.pin_fresh(newest)  # a purge since (even one that deleted nothing)
        newest = await astore.append(readings(1, start=7))
        await astore.set_lanes(["mqtt"])
        assert not astore.pin_fresh(newest)  # set_lanes since
        pinned = (await astore.stats()).pinned
        assert pinned == 6  # seqs 2..7: the rows pinned through pin_fresh (1 was acked, its pin gone)
    finally:
        await astore.close()
    assert not astore.pin_fresh(newest)  # closed


async def test_pin_fresh_leaves_an_unknown_lane_to_pin_and_a_failed_pin_is_logged(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Refusing(Store):
        def pin(
            self, rows: Sequence[StoredRow], lane: str | None = None, *, known: bool = False
        ) -> list[StoredRow]:
            raise StoreError("pin refused")

    astore = AsyncStore(Refusing(db, 64 * MiB))
    await astore.open()
    try:
        await astore.set_lanes(["a", "b"])
        rows = await astore.append(readings(2))
        assert not astore.pin_fresh(rows, "nope")  # `pin` raises StoreError for it, to its caller
        assert astore.pin_fresh(rows, "a")
        await astore.stats()  # queued behind the pin: it has run
        assert any(
            r.levelno == logging.ERROR and "pin refused" in r.getMessage() for r in caplog.records
        )  # nobody waits for its outcome: a failure is said, not lost
    finally:
        await astore.close()


def test_a_known_pin_pins_without_looking_and_a_plain_one_looks(store: Store, db: Path) -> None:
    rows = store.append(readings(3))
    store.ack([2])
    assert store.pin(rows, known=True) == rows  # trusted: the caller knows they are there
    assert sorted(store._pins) == [1, 2, 3]
    store.ack([1, 2, 3])
    rows = store.append(readings(3, start=3))
    store.ack([rows[1].seq])
    assert store.pin(rows) == [rows[0], rows[2]]  # looked: the acked one is not pinned, not returned
    assert sorted(store._pins) == [rows[0].seq, rows[2].seq]


class Refusal(Exception):
    """An exception type of the test's own: it must reach the caller as itself."""


async def test_an_exception_reaches_the_caller_with_its_type_and_the_thread_goes_on(db: Path) -> None:
    astore = AsyncStore(Store(db, 64 * MiB))
    await astore.open()
    seen: list[str] = []

    def refuse() -> None:
        seen.append(threading.current_thread().name)
        raise Refusal("no")

    def stop_iteration() -> None:
        raise StopIteration  # an asyncio future cannot carry it: it comes back as a RuntimeError

    try:
        with pytest.raises(Refusal, match=r"^no$"):
            await astore._call(refuse)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await astore._call(stop_iteration)
        await astore.set_lanes(["a", "b"])
        with pytest.raises(StoreError, match="unknown upstream lane 'nope'"):
            await astore.fetch(0, None, 1, "nope")
        assert seen == ["fieldgate-store"]
        assert seqs(await astore.append(readings(1))) == [1]  # the thread still serves
    finally:
        await astore.close()


async def test_close_closes_the_store_on_its_thread_after_the_queued_calls_then_joins_it(db: Path) -> None:
    closed_on: list[str] = []

    class Recorded(Store):
        def close(self) -> None:
            closed_on.append(threading.current_thread().name)
            super().close()

    astore = AsyncStore(Recorded(db, 64 * MiB))
    await astore.open()
    thread = astore._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    queued = asyncio.ensure_future(astore.append(readings(4)))
    await asyncio.sleep(0)  # the append is queued before the close
    await astore.close()
    assert seqs(await queued) == [1, 2, 3, 4]
    assert closed_on == ["fieldgate-store"]
    assert not thread.is_alive()
    assert thread not in store_module._serving
    assert table_seqs(db) == [1, 2, 3, 4]
    with pytest.raises(StoreError, match="closed"):
        await astore.append(readings(1))


async def test_no_thread_before_the_first_call(db: Path) -> None:
    """The daemon forks its validating child before it has a second thread (docs/ARCHITECTURE.md)."""
    before = store_threads()
    astore = AsyncStore(Store(db, 64 * MiB))
    assert store_threads() == before and astore._thread is None
    await astore.open()
    assert len(store_threads()) == len(before) + 1
    await astore.close()


def test_a_process_that_never_closes_its_store_exits_and_keeps_its_queued_commit(db: Path) -> None:
    """What ThreadPoolExecutor guaranteed at exit, kept: the calls queued are done, then the process exits
    (it neither hangs on the store thread nor cuts a commit). Here the loop is even gone before the append
    runs (its outcome has nobody to go to)."""
    program = f"""
import asyncio, threading, time
from pathlib import Path
from agent.pipeline.reading import Reading
from agent.pipeline.store import AsyncStore, Store

class Slow(Store):
    def append(self, readings):
        time.sleep(0.3)  # still queued or running when asyncio.run returns
        return super().append(readings)

async def main():
    s = AsyncStore(Slow(Path({str(db)!r}), {64 * MiB}))
    await s.open()
    await s.append([Reading("d", "v", {T0}, 1.0)])
    asyncio.get_running_loop().create_task(s.append([Reading("d", "v", {T0 + 1000}, 2.0)]))
    await asyncio.sleep(0.05)  # the second append is on the thread; the loop ends without waiting for it

asyncio.run(main())
print("left main", flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "left main\n"
    assert table_seqs(db) == [1, 2]


# -- purge, recovery, salvage ------------------------------------------------------------------------------


def test_a_purge_in_several_chunks_of_an_odd_size_deletes_exactly_what_it_says(db: Path) -> None:
    s = Store(db, 2_000_001, "normal")  # its WAL step (31,250 bytes) makes a chunk of 244 rows
    s.open()
    try:
        s.append(readings(700))
        s.append(readings(10, start=700, device="meter-2"))
        assert s.purge(device="meter-1") == 700
        stats = s.stats()
        assert (stats.pending, stats.evicted) == (10, 700)
        assert [row[0] for row in query(db, "SELECT min(seq) FROM readings")] == [701]
    finally:
        s.close()


def test_each_failure_is_counted(store: Store, db: Path) -> None:
    store.append(readings(2))
    fail(db, "DELETE", "readings")
    for _ in range(3):
        with pytest.raises(StoreError):
            store.ack([1])
    assert store.stats().disk_errors == 3


def test_a_file_moved_aside_takes_the_first_free_number(store: Store, db: Path) -> None:
    stamp = "20260101T000000Z"
    Path(f"{db}.corrupt-{stamp}").write_bytes(b"")
    store.close()
    assert store._move_aside(stamp).name == f"{db.name}.corrupt-{stamp}-1"


def test_a_file_that_cannot_be_moved_aside_is_a_store_error(store: Store, db: Path) -> None:
    stamp = "20260101T000000Z"
    store.close()
    Path(f"{db}-wal").write_bytes(b"x")
    blocker = Path(f"{db}.corrupt-{stamp}-wal")  # a non-empty directory where the -wal would go
    blocker.mkdir()
    (blocker / "x").write_bytes(b"")
    with pytest.raises(StoreError, match=rf"^the buffer {db} is corrupt and cannot be moved aside: "):
        store._move_aside(stamp)


def test_a_recovery_moves_the_whole_set_aside_under_a_utc_stamp(
    db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Etc/GMT-5")  # a local time 5 hours ahead of UTC
    time.tzset()
    try:
        db.write_bytes(b"not a database at all" * 100)
        Path(f"{db}-shm").write_bytes(b"old shm")
        before = datetime.now(UTC).replace(microsecond=0)
        with caplog.at_level(logging.ERROR, logger="fieldgate.store"):
            s = Store(db, 64 * MiB)
            s.open()
        after = datetime.now(UTC)
        s.close()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    (aside,) = sorted(p for p in db.parent.glob(f"{db.name}.corrupt-*") if not p.name.endswith("-shm"))
    stamp = datetime.strptime(aside.name.rsplit("-", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert before <= stamp <= after
    assert Path(f"{aside}-shm").read_bytes() == b"old shm"
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message.startswith(f"buffer {db} was unusable (file is not a database); moved it aside to {aside}")
    assert message.endswith("; readings still pending in the old file were lost")


def test_salvage_reads_the_last_row_when_the_sequence_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn:
        # No AUTOINCREMENT: no sqlite_sequence to read the high-water mark from.
        conn.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY, x)")
        conn.executemany("INSERT INTO readings (seq) VALUES (?)", [(4,), (17,)])
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
        conn.execute("INSERT INTO meta VALUES ('evicted', 3), ('recovered', 1)")
        conn.commit()
    got = Store._salvage(path)
    assert (got.high_water, got.evicted, got.recovered) == (17, 3, 1)


def test_a_page_cap_set_on_an_open_store_applies_and_outlives_a_reopen(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.set_max_page_count(40)
    with pytest.raises(StoreError, match="disk is full"):
        for k in range(100):
            s.append(readings(200, start=k * 200))
    s.close()
    s.open()  # the same store opened again: the cap is still there
    try:
        with pytest.raises(StoreError, match="disk is full"):
            s.append(readings(2000, start=50_000))
        s.set_max_page_count(None)
        assert len(s.append(readings(2000, start=50_000))) == 2000
    finally:
        s.close()


# -- the connection's settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_bytes", "synchronous", "wal_bytes"),
    [
        (256 * 1024, "full", 64 * 1024),  # the WAL's floor
        (2 * MiB, "normal", 2 * MiB // 16),
        (2_000_001, "full", 2_000_001 // 16),
        (128 * MiB, "normal", 4 * MiB),  # its ceiling
    ],
)
def test_the_connection_s_settings_read_back(
    db: Path, max_bytes: int, synchronous: Literal["full", "normal"], wal_bytes: int
) -> None:
    s = Store(db, max_bytes, synchronous)
    s.open()
    try:
        conn = s._conn
        assert conn is not None

        def pragma(name: str) -> object:
            assert conn is not None
            return conn.execute(f"PRAGMA {name}").fetchone()[0]

        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == {"full": 2, "normal": 1}[synchronous]
        assert pragma("secure_delete") == 2  # FAST
        assert pragma("auto_vacuum") == 2  # INCREMENTAL
        assert pragma("busy_timeout") == 5000
        assert pragma("journal_size_limit") == wal_bytes
        assert pragma("wal_autocheckpoint") == wal_bytes // 4 // 4096
        assert pragma("user_version") == 1
    finally:
        s.close()


def test_a_stop_with_rows_in_flight_on_the_only_lane_keeps_them_pinned_once_lanes_are_declared(
    db: Path,
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.pin(s.append(readings(3))[:2])
    s.close()
    s = Store(db, 64 * MiB)
    s.open()
    s.set_lanes(["mqtt"])  # what the daemon does at every start
    assert s.stats().pinned == 2
    assert s.ack([1, 2, 3], "mqtt") == 3
    assert s.stats().pinned == 0
    s.close()


GARBAGE = "7" * 100 + "x open"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", "''"),
        (b"12", "'12'"),
        (b"12 open now", "'12 open now'"),
        (b"x12 open", "'x12 open'"),
        (b"-12 open", "'-12 open'"),
        (b"12 opened", "'12 opened'"),
        (b"12 OPEN", "'12 OPEN'"),
        (GARBAGE.encode(), repr(GARBAGE[:80])),
        (b"9223372036854775808 open", "'9223372036854775808 open'"),  # 2**63: no SQLite INTEGER holds it
        (b"99999999999999999999999 closed", "'99999999999999999999999 closed'"),
        ("\u0661\u0662 closed".encode(), None),  # Arabic-Indic digits: UTF-8, not ASCII
    ],
)
def test_an_unreadable_mark_is_said_and_ignored(
    db: Path, caplog: pytest.LogCaptureFixture, content: bytes, said: str | None
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5))
    s.close()
    Path(f"{db}.seq").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
        s = Store(db, 64 * MiB)
        s.open()
    try:
        (message,) = [r.getMessage() for r in caplog.records]
        assert message.startswith(f"seq mark {db}.seq unreadable (")
        assert message.endswith("): ignored")
        if said is not None:
            assert message == f"seq mark {db}.seq unreadable ({said}): ignored"
        else:
            assert "'ascii' codec can't decode" in message
        stats = s.stats()
        assert (stats.next_seq, stats.recovered) == (6, 0)  # the database decides, nothing went back
        assert Path(f"{db}.seq").read_text() == f"{6 + SEQ_BLOCK} open\n"  # and a good mark replaces it
    finally:
        s.close()


@pytest.mark.parametrize(("state", "next_seq"), [("open", 6), ("closed", 12)])
def test_a_mark_ahead_of_the_database_resumes_only_after_a_clean_close(
    db: Path, state: str, next_seq: int
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5))
    s.close()
    Path(f"{db}.seq").write_text(f"12 {state}\n")
    # With its -wal: an unclean stop whose log is intact is trusted; a clean close at 12 is not.
    Path(f"{db}-wal").write_bytes(b"")
    s = Store(db, 64 * MiB)
    s.open()
    try:
        assert s.stats().next_seq == next_seq
    finally:
        s.close()


# -- opening ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lose", "why"),
    [
        ("database", "the database file is missing or empty"),
        (
            "wal",
            "the process stopped without closing it and its write-ahead log (-wal) is gone (lost, or merged by "
            "another program that opened the file read-write)",
        ),
    ],
)
def test_a_database_behind_its_mark_says_why_resumes_there_once_and_persists_it(
    db: Path, caplog: pytest.LogCaptureFixture, lose: str, why: str
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5))
    s.close()
    if lose == "database":
        db.unlink()
    Path(f"{db}.seq").write_text("50 open\n")  # an unclean stop after seqs up to 49 were handed out
    with caplog.at_level(logging.ERROR, logger="fieldgate.store"):
        s = Store(db, 64 * MiB)
        s.open()
    assert [r.getMessage() for r in caplog.records] == [
        f"buffer {db} went back: {why}; readings pending in the lost part are gone, and seq resumes at 50 "
        f"(the mark in {db}.seq) so that no seq already sent is used again"
    ]
    assert (s.stats().next_seq, s.stats().recovered) == (50, 1)
    s.close()
    caplog.clear()
    s = Store(db, 64 * MiB)
    s.open()
    try:
        assert (s.stats().next_seq, s.stats().recovered) == (50, 1)
        assert caplog.records == []
        assert seqs(s.append(readings(1))) == [50]
    finally:
        s.close()


def test_a_store_opened_twice_is_refused(store: Store, db: Path) -> None:
    with pytest.raises(StoreError, match=rf"^the buffer {db} is already open$"):
        store.open()
    assert seqs(store.append(readings(1))) == [1]  # still the first connection, untouched


def test_the_buffer_s_directories_are_created(tmp_path: Path) -> None:
    s = Store(tmp_path / "a" / "b" / "buffer.db", 64 * MiB)
    s.open()
    s.close()
    again = Store(tmp_path / "a" / "b" / "buffer.db", 64 * MiB)
    again.open()  # the directory exists now: fine too
    again.close()


def test_a_directory_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match=rf"^cannot create the buffer directory {tmp_path}/file/sub: "):
        Store(tmp_path / "file" / "sub" / "buffer.db", 64 * MiB).open()


def test_a_file_that_fails_the_integrity_check_is_replaced_and_says_what_failed(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(50))
    s.close()
    data = bytearray(db.read_bytes())
    n = int.from_bytes(data[28:32], "big")  # the header's page count: 3 pages more, never used
    data[28:32] = (n + 3).to_bytes(4, "big")
    db.write_bytes(bytes(data) + bytes(3 * 4096))
    with caplog.at_level(logging.ERROR, logger="fieldgate.store"):
        s = Store(db, 64 * MiB)
        s.open()
    try:
        (message,) = [r.getMessage() for r in caplog.records]
        problems = "\n".join(f"Page {p} is never used" for p in range(n + 1, n + 4))
        assert f" was unusable (integrity check failed: *** in database main ***\n{problems}); " in message
        assert (s.stats().recovered, s.stats().next_seq) == (1, 51)
    finally:
        s.close()


def test_a_buffer_from_before_lanes_gets_its_acked_column(db: Path) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(
            "CREATE TABLE readings(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL,"
            " device TEXT NOT NULL, point TEXT NOT NULL, body BLOB NOT NULL)"
        )
        conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('evicted', 2), ('recovered', 0)")
        conn.executemany(
            "INSERT INTO readings(seq, ts, device, point, body) VALUES (?, ?, 'meter-1', 'power_w', x'7b7d')",
            [(3, T0), (4, T0 + 1000), (5, T0 + 2000)],
        )
        conn.execute("PRAGMA user_version = 1")
    s = Store(db, 64 * MiB)
    s.open()
    try:
        s.set_lanes(["a", "b"])
        stats = s.stats()
        assert (stats.pending, stats.evicted, stats.next_seq, stats.lanes) == (3, 2, 6, {"a": 3, "b": 3})
        assert s.ack([3, 4], "a") == 0
        assert s.ack([4], "b") == 1
        assert seqs(s.fetch(0, None, 10, "a")) == [5]
        assert seqs(s.fetch(0, None, 10, "b")) == [3, 5]
    finally:
        s.close()


def test_a_failure_while_resuming_at_the_mark_fails_the_open_and_the_next_open_resumes(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5))
    s.close()
    Path(f"{db}.seq").write_text("50 open\n")  # the -wal is gone: resume at 50
    fail(db, "UPDATE", "meta")
    with pytest.raises(StoreError, match=r"^buffer open failed: boom$"):
        Store(db, 64 * MiB).open()
    heal(db)
    s = Store(db, 64 * MiB)
    s.open()
    try:
        assert (s.stats().next_seq, s.stats().recovered) == (50, 1)
    finally:
        s.close()


def test_each_recovery_adds_one_to_those_before(db: Path) -> None:
    db.write_bytes(b"not a database at all" * 100)
    s = Store(db, 64 * MiB)
    s.open()  # moved aside: 1
    first = s.stats().next_seq
    s.append(readings(3))
    s.close()
    Path(f"{db}.seq").write_text(f"{first + 100} closed\n")  # then the file goes back behind its mark: 2
    s = Store(db, 64 * MiB)
    s.open()
    try:
        assert (s.stats().recovered, s.stats().next_seq) == (2, first + 100)
    finally:
        s.close()


def test_a_recovered_buffer_keeps_the_old_file_s_evicted_count(db: Path) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(5000))
    assert s.purge(before_ts=T0 + 7000) == 7
    s.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])  # truncated: moved aside, its counters salvaged
    s = Store(db, 64 * MiB)
    s.open()
    s.close()
    s = Store(db, 64 * MiB)
    s.open()
    try:
        stats = s.stats()
        assert (stats.recovered, stats.evicted, stats.next_seq) == (1, 7, 5001)
    finally:
        s.close()


def test_the_reads_say_what_failed(store: Store, db: Path) -> None:
    rows = store.append(readings(2))
    query(db, "ALTER TABLE readings RENAME TO moved")  # another program changed the file under the store
    with pytest.raises(StoreError, match=r"^buffer pin of 2 readings failed: no such table: readings$"):
        store.pin(rows)
    with pytest.raises(StoreError, match=r"^buffer fetch failed: no such table: readings$"):
        store.fetch(0, None, 10)
    with pytest.raises(StoreError, match=r"^buffer stats failed: no such table: readings$"):
        store.stats()
    query(db, "ALTER TABLE moved RENAME TO readings")
    stats = store.stats()
    assert (stats.disk_errors, stats.pinned) == (3, 0)
    assert stats.last_error == "buffer stats failed: no such table: readings"
    assert store.pin(rows) == rows


def test_an_unencodable_reading_is_said_with_its_device_point_time_and_reason(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
        assert store.append([Reading("meter-1", "huge", T0, 2**70)]) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"reading meter-1/huge at {T0} not stored: cannot encode it as JSON (Integer exceeds 64-bit range)"
    ]
    assert store.stats().next_seq == 1


def test_an_eviction_is_said_with_the_bound_the_count_and_the_total(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(db, 256 * 1024, "normal")
    s.open()
    try:
        with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
            k = 0
            while not caplog.records:
                s.append(readings(100, start=k * 100))
                k += 1
        evicted = s.stats().evicted
        assert evicted > 0
        assert [r.getMessage() for r in caplog.records] == [
            f"buffer full (max_size 262144 bytes): evicted the {evicted} oldest unsent readings "
            f"({evicted} evicted in total)"
        ]
    finally:
        s.close()


# -- failures SQLite gives no way to provoke from outside (a close, a vacuum step, a ROLLBACK that fail): the
# store's own connection, wrapped so that one call raises the error SQLite would --------------------------


class FailingConnection:
    """The store's real connection, except that `fail` (a method name, or an SQL statement's first word)
    raises sqlite3.OperationalError("boom")."""

    def __init__(self, conn: sqlite3.Connection, fail: str) -> None:
        self.conn = conn
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.split()[0] == self.fail:
            raise sqlite3.OperationalError("boom")
        return self.conn.execute(sql, *args)

    def executescript(self, sql: str) -> sqlite3.Cursor:
        if self.fail == "executescript":
            raise sqlite3.OperationalError("boom")
        return self.conn.executescript(sql)

    def close(self) -> None:
        if self.fail == "close":
            raise sqlite3.OperationalError("boom")
        self.conn.close()


def wrap(store: Store, fail: str) -> FailingConnection:
    assert store._conn is not None
    wrapped = FailingConnection(store._conn, fail)
    store._conn = wrapped  # type: ignore[assignment]
    return wrapped


def test_a_close_that_fails_is_said_and_leaves_the_mark_open(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(3))
    wrapped = wrap(s, "close")
    with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
        s.close()
    assert [r.getMessage() for r in caplog.records] == [f"closing the buffer {db} failed: boom"]
    # Not closed cleanly: the mark stays the reserved one, and the next start checks the file against it.
    assert Path(f"{db}.seq").read_text() == f"{1 + SEQ_BLOCK} open\n"
    wrapped.conn.close()


def test_a_shrink_that_fails_is_said_and_the_ack_stands(
    store: Store, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.append(readings(20_000))
    wrap(store, "executescript")
    with caplog.at_level(logging.WARNING, logger="fieldgate.store"):
        assert store.ack(list(range(1, 20_001))) == 20_000
    message = "buffer shrinking the file failed: boom"
    assert [r.getMessage() for r in caplog.records] == [
        f"{message} (the acknowledged rows are deleted; the file keeps its size)"
    ]
    stats = store.stats()
    assert (stats.pending, stats.disk_errors, stats.last_error) == (0, 1, message)
    assert pages(db)[1] > 0  # the free pages are still in the file


def test_a_rollback_that_fails_too_is_said_at_debug_level(
    store: Store, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.append(readings(2))
    fail(db, "DELETE", "readings")
    wrapped = wrap(store, "ROLLBACK")
    with caplog.at_level(logging.DEBUG, logger="fieldgate.store"), pytest.raises(StoreError, match="boom"):
        store.ack([1])
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "rollback after an error failed too: boom")
    ]
    assert wrapped.conn.in_transaction  # what the failed ROLLBACK left
    wrapped.conn.execute("ROLLBACK")
    store._conn = wrapped.conn
    heal(db)
    assert store.ack([1]) == 1


async def test_a_store_opened_on_one_thread_is_used_from_another(db: Path) -> None:
    """One thread at a time, not always the same one: a store opened by the caller is handed to AsyncStore."""
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(2))
    astore = AsyncStore(s)
    try:
        assert seqs(await astore.append(readings(1, start=2))) == [3]
        assert (await astore.stats()).pending == 3
    finally:
        await astore.close()


def test_a_recovery_whose_fresh_buffer_cannot_be_written_fails_the_open(db: Path) -> None:
    db.write_bytes(b"not a database at all" * 100)
    s = Store(db, 64 * MiB)
    real = s._connect_checked_fresh

    def failing_fresh() -> Any:
        return FailingConnection(real(), "UPDATE")

    s._connect_checked_fresh = failing_fresh  # type: ignore[method-assign]
    with pytest.raises(StoreError, match=r"^buffer recovery failed: boom$"):
        s.open()
    assert s._conn is None


def test_a_recovery_whose_fresh_buffer_is_unusable_too_fails_the_open(db: Path) -> None:
    db.write_bytes(b"not a database at all" * 100)
    s = Store(db, 64 * MiB)

    def unusable() -> sqlite3.Connection:
        raise store_module._CorruptBuffer("still not a database")

    s._connect_checked = unusable  # type: ignore[method-assign]
    with pytest.raises(StoreError, match=rf"^cannot create a fresh buffer at {db}: still not a database$"):
        s.open()
    assert len(aside_files(db)) == 1


def test_a_pin_without_a_lane_holds_the_row_for_every_lane(store: Store) -> None:
    store.set_lanes(["a", "b"])
    rows = store.append(readings(2))
    assert store.pin(rows) == rows
    store.ack([1, 2], "a")
    assert store.stats().pinned == 2  # b has not acknowledged them
    assert store.ack([1, 2], "b") == 2
    assert store.stats().pinned == 0


def test_with_one_lane_the_lane_named_is_not_looked_up(store: Store) -> None:
    rows = store.append(readings(3))
    assert store.pin(rows, "other") == rows
    assert seqs(store.fetch(0, None, 10, "other")) == [1, 2, 3]
    assert store.ack([1, 2], "other") == 2
    assert (store.stats().pinned, store.stats().pending) == (1, 1)


def test_an_unopened_store_has_the_default_lane_and_nothing_counted(db: Path) -> None:
    s = Store(db, 64 * MiB)
    assert s.lanes() == ["mqtt"]
    assert (s.lane_pending(), s.lane_evicted()) == ({"mqtt": 0}, {"mqtt": 0})


def test_an_unknown_synchronous_mode_is_refused(db: Path) -> None:
    with pytest.raises(ValueError, match=r"^synchronous must be 'full' or 'normal', not 'off'$"):
        Store(db, 64 * MiB, "off")  # type: ignore[arg-type]


def test_a_reading_larger_than_the_bound_is_evicted_at_once_and_counted(db: Path) -> None:
    s = Store(db, 256 * 1024, "normal")
    s.open()
    try:
        assert s.append([Reading("meter-1", "blob", T0, "x" * 200_000)]) == []
        stats = s.stats()
        assert (stats.pending, stats.evicted, stats.next_seq) == (0, 1, 2)
        assert seqs(s.append(readings(1))) == [2]
    finally:
        s.close()


@pytest.mark.parametrize("pinned", [False, True])
def test_a_burst_evicts_only_the_whole_rows_it_needs_oldest_unpinned_first(db: Path, pinned: bool) -> None:
    s = Store(db, 256 * 1024, "normal")  # three of these 30 KB readings fit, not four
    s.open()
    try:
        kept = []
        for i in range(6):
            rows = s.append([Reading("meter-1", "blob", T0 + i, "x" * 30_000)])
            if pinned and i == 0:
                assert s.pin(rows) == rows  # in flight: not evictable
            kept.append(seqs(s.fetch(0, None, 10)))
        if pinned:
            assert kept == [[1], [1, 2], [1, 2, 3], [1, 3, 4], [1, 4, 5], [1, 5, 6]]
        else:
            assert kept == [[1], [1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]]
        assert s.stats().evicted == 3
    finally:
        s.close()


def test_eviction_keeps_only_the_pinned_rows_and_the_newest_ones(db: Path) -> None:
    s = Store(db, 256 * 1024, "normal")
    s.open()
    try:
        s.append([Reading("meter-1", "blob", T0 + i, "x" * 1000) for i in range(10)])
        in_flight = {r.seq for r in s.pin(s.fetch(4, 7, 10))}  # rows 5 and 6, in the middle of the oldest
        k = 0
        while s.stats().evicted < 300:
            s.append([Reading("meter-1", "blob", T0 + 100 + k * 20 + i, "x" * 1000) for i in range(20)])
            k += 1
        kept = seqs(s.fetch(0, None, 10_000))
        others = [q for q in kept if q not in in_flight]
        assert in_flight == {5, 6} and in_flight <= set(kept)
        # Apart from the pinned rows, what is left is the newest rows, with no hole.
        assert others == list(range(others[0], s.stats().next_seq))
        assert s.stats().evicted == s.stats().next_seq - 1 - len(kept)
    finally:
        s.close()


def test_per_lane_gap_counts_start_when_the_store_gets_several_lanes(store: Store) -> None:
    store.append(readings(5))
    assert store.purge(before_ts=T0 + 3000) == 3  # one lane: counted in evicted only
    store.set_lanes(["mqtt", "b"])
    assert store.stats().lane_evicted == {"mqtt": 0, "b": 0}
    assert store.purge(before_ts=T0 + 4000) == 1
    assert store.stats().lane_evicted == {"mqtt": 1, "b": 1}
    assert store.stats().evicted == 4
