"""Tests of the durable buffer: seq rules, fetch/ack, eviction, disk full, corruption, kill -9."""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.errors import StoreError
from agent.pipeline import store as store_module
from agent.pipeline.reading import Reading
from agent.pipeline.store import AsyncStore, Store
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
