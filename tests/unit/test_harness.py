"""The test harness's "nothing lost" check (tests/daemon.py): held to the store's own high-water mark."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.pipeline.reading import Reading
from agent.pipeline.store import Store
from tests.daemon import Checker, store_high, wait_all_received


def stored(db: Path, n: int, acked: int = 0) -> None:
    """A buffer that handed out seqs 1..n, the first `acked` of them acknowledged (deleted)."""
    store = Store(db, 10_000_000)
    store.open()
    try:
        rows = store.append([Reading("dev", f"p{i}", 1_700_000_000_000 + i, i) for i in range(n)])
        if acked:
            store.ack([r.seq for r in rows[:acked]])
    finally:
        store.close()


def checker_with(seqs: list[int]) -> Checker:
    checker = Checker(1, "gw")  # never started: only its record is used
    checker.data.readings = [{"seq": s, "device": "dev", "point": "p", "ts": 0, "value": 0} for s in seqs]
    checker.data.backlog_flags = [False] * len(seqs)
    return checker


async def test_the_mark_is_the_stores_not_the_highest_received(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    stored(db, 10)
    assert store_high(db) == 10
    checker = checker_with(list(range(1, 9)))  # the last two readings stored never arrived
    # What the old check saw: no hole between the lowest and the highest seq received.
    assert checker.data.report()["lost"] == []
    with pytest.raises(AssertionError, match=r"2 of seqs 1\.\.10 .* never arrived: \[9, 10\]"):
        await wait_all_received(checker, db, timeout=0.2)


async def test_every_seq_received_passes_and_returns_the_mark(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    stored(db, 10)
    assert await wait_all_received(checker_with([*range(1, 11), 5]), db, timeout=0.2) == 10


async def test_a_hole_in_the_middle_fails(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    stored(db, 10)
    with pytest.raises(AssertionError, match=r"never arrived: \[4\]"):
        await wait_all_received(checker_with([1, 2, 3, *range(5, 11)]), db, timeout=0.2)


def test_the_mark_survives_the_deletes(tmp_path: Path) -> None:
    """Acknowledged rows are deleted: the mark comes from sqlite_sequence, not from the rows left."""
    db = tmp_path / "buffer.db"
    stored(db, 10, acked=10)
    assert store_high(db) == 10
