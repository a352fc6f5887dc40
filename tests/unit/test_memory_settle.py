"""agent/pipeline/memory.py: the start-up's memory is given back once, after the first commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.pipeline import memory
from agent.pipeline.reading import Reading, now_ms
from agent.pipeline.store import AsyncStore, Store
from agent.pipeline.writer import StoreWriter


def test_settle_runs_on_this_c_library() -> None:
    # glibc here: malloc_trim exists and answers (released or not, it must not raise)
    assert memory._malloc_trim() is not None
    assert memory.settle() in (True, False)


def test_settle_without_malloc_trim_only_collects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.settle() is False


async def test_the_first_large_commit_schedules_one_settle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(memory, "SETTLE_AFTER", 0.0)
    monkeypatch.setattr(memory, "SETTLE_MIN_READINGS", 2)
    monkeypatch.setattr(memory, "settle", lambda: calls.append(True) or True)
    store = AsyncStore(Store(tmp_path / "b.db", 10_000_000))
    await store.open()
    try:
        stored: list[int] = []
        w = StoreWriter(store, 0.05, lambda rows: stored.extend(r.seq for r in rows))
        w.put([Reading("d", "p", now_ms(), 0)])  # a commit smaller than SETTLE_MIN_READINGS: no trim
        await w.flush()
        await asyncio.sleep(0.05)
        assert calls == [] and not w.settled
        for i in range(3):
            w.put([Reading("d", "p", now_ms(), i), Reading("d", "q", now_ms(), i)])
            await w.flush()
            async with asyncio.timeout(5):
                while not calls:
                    await asyncio.sleep(0.01)
        assert stored == [1, 2, 3, 4, 5, 6, 7]
        assert calls == [True]  # once, however many commits follow
        assert w.settled
    finally:
        await store.close()
