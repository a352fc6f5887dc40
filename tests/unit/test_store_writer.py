"""The store writer (agent/pipeline/writer.py StoreWriter) against a real buffer: one commit per poll tick."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.pipeline import writer as writer_module
from agent.pipeline.reading import Reading, now_ms
from agent.pipeline.store import AsyncStore, Store
from agent.pipeline.writer import StoreWriter

INTERVAL = 0.2
HOLD = 30.0  # the commit interval of the hold test: how long a held commit may wait, in real time


class Commits:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __call__(self, rows: list[Any]) -> None:
        self.batches.append(rows)

    async def wait(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.batches) < n:
                await asyncio.sleep(0.01)


class FakeMonotonic:
    """Stands in for the writer's `time` module: monotonic() is set by the test; the rest is the real one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    """The writer's notion of time, under the test's control (the event loop keeps the real clock)."""
    fake = FakeMonotonic()
    monkeypatch.setattr(writer_module, "time", fake)
    return fake


@contextlib.asynccontextmanager
async def running_writer(path: Path, interval: float) -> AsyncIterator[tuple[StoreWriter, Commits]]:
    store = AsyncStore(Store(path, 10_000_000))
    await store.open()
    commits = Commits()
    w = StoreWriter(store, interval, commits)
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


async def settle_loop() -> None:
    """Let every ready task run (the writer reacts to put()/polling() within a few loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_the_readings_of_one_tick_are_committed_together(tmp_path: Path, clock: FakeMonotonic) -> None:
    """Catches a commit that does not wait for the other devices of the tick (two transactions per tick).

    No wall-clock race: the pause between ticks is made on the writer's clock, and the hold lasts up to
    HOLD s of real time, far beyond any scheduling delay of the checks in between."""
    async with running_writer(tmp_path / "buffer.db", HOLD) as (w, commits):
        w.put(readings("first"))  # the very first commit is never held
        await commits.wait(1)
        clock.now += HOLD * 1.5  # a pause, as between two ticks

        w.polling(True)
        w.polling(True)  # two devices polled on the same tick
        w.polling(False)
        w.put(readings("a"))
        await settle_loop()
        # held while the other device of the tick is being read: not even taken for a commit yet
        assert len(w.pending) == 3 and len(commits.batches) == 1, "committed before the tick's last poll"
        w.polling(False)
        w.put(readings("b"))
        await commits.wait(2)
        assert {r.seq for r in commits.batches[1]} == set(range(4, 10))  # a's and b's in one transaction


async def test_a_poll_that_does_not_end_holds_the_commit_only_commit_interval(
    tmp_path: Path, clock: FakeMonotonic
) -> None:
    """Catches a commit held for as long as a device poll lasts (a device that times out much later)."""
    async with running_writer(tmp_path / "buffer.db", INTERVAL) as (w, commits):
        w.put(readings("first"))
        await commits.wait(1)
        clock.now += INTERVAL * 1.5
        w.polling(True)  # a device that will time out, much later
        w.polling(True)
        w.polling(False)
        w.put(readings("a"))
        await commits.wait(2)  # committed anyway, after commit_interval at most (a condition, 5 s bound)
        assert len(commits.batches[1]) == 3
