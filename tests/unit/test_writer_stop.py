"""A stop never drops readings whose commit is queued on the store's thread (found by the config property test).

The daemon's stop cancels the StoreWriter's task. When its commit was still queued behind another call on the
store's single thread (the uplink's fetch, the stats), the cancellation dropped the queued job, and the batch
with it: a reading polled just before SIGTERM was never stored. AsyncStore now runs every call it was given,
cancelled caller or not (tests/unit/test_store.py has the rule itself).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path

from agent.pipeline.polling import next_tick
from agent.pipeline.reading import Reading, now_ms
from agent.pipeline.store import AsyncStore, Store
from agent.pipeline.writer import StoreWriter


async def test_a_commit_queued_when_the_writer_is_cancelled_is_still_stored(tmp_path: Path) -> None:
    store = AsyncStore(Store(tmp_path / "buffer.db", 10_000_000))
    await store.open()
    try:
        writer = StoreWriter(store, 0.2, lambda rows: None)
        release = threading.Event()
        busy = asyncio.ensure_future(store._call(functools.partial(release.wait, 10)))  # the thread is taken
        writer.put([Reading("d", "v", now_ms(), 1.0)])
        flushing = asyncio.create_task(writer.flush())
        await asyncio.sleep(0.05)  # flush() has queued its append behind `busy`
        flushing.cancel()  # what the stop does to the writer's task
        await asyncio.gather(flushing, return_exceptions=True)
        release.set()
        await busy
        await writer.flush()  # the stop's final flush: nothing left in memory
        stats = await store.stats()
        assert stats.pending == 1 and stats.next_seq == 2
    finally:
        await store.close()


def test_next_tick_never_divides_by_a_zero_interval() -> None:
    for interval in (0.0, -1.0, float("nan")):
        delay = next_tick(interval, started=0.0, monotonic=lambda: 5.0, wall=lambda: 1000.0)
        assert 0 <= delay <= 0.01
