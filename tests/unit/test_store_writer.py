"""The store writer (agent/runtime.py StoreWriter) against a real buffer: one commit per poll tick."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.reading import Reading, now_ms
from agent.runtime import StoreWriter
from agent.store import AsyncStore, Store

INTERVAL = 0.2


class Commits:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __call__(self, rows: list[Any]) -> None:
        self.batches.append(rows)

    async def wait(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.batches) < n:
                await asyncio.sleep(0.01)


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[tuple[StoreWriter, Commits]]:
    store = AsyncStore(Store(tmp_path / "buffer.db", 10_000_000))
    await store.open()
    commits = Commits()
    w = StoreWriter(store, INTERVAL, commits)
    task = asyncio.create_task(w.run())
    try:
        yield w, commits
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


def readings(device: str, n: int = 3) -> list[Reading]:
    return [Reading(device, f"p{i}", now_ms(), i) for i in range(n)]


async def test_the_readings_of_one_tick_are_committed_together(writer: tuple[StoreWriter, Commits]) -> None:
    w, commits = writer
    w.put(readings("first"))  # the very first commit is never held
    await commits.wait(1)
    await asyncio.sleep(INTERVAL * 1.5)  # a pause, as between two ticks

    w.polling(True)
    w.polling(True)  # two devices polled on the same tick
    w.polling(False)
    w.put(readings("a"))
    await asyncio.sleep(INTERVAL / 2)
    assert len(commits.batches) == 1, "held while the other device of the tick is being read"
    w.polling(False)
    w.put(readings("b"))
    await commits.wait(2)
    assert {r.seq for r in commits.batches[1]} == set(range(4, 10))  # a's and b's in one transaction


async def test_a_poll_that_does_not_end_holds_the_commit_only_commit_interval(
    writer: tuple[StoreWriter, Commits],
) -> None:
    w, commits = writer
    w.put(readings("first"))
    await commits.wait(1)
    await asyncio.sleep(INTERVAL * 1.5)
    w.polling(True)  # a device that will time out, much later
    w.polling(True)
    w.polling(False)
    w.put(readings("a"))
    await commits.wait(2)  # committed anyway, after commit_interval at most
    assert len(commits.batches[1]) == 3
