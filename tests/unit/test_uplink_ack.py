"""The uplink's ack path: acknowledged seqs become one DELETE per flush, a refused delete is retried without
losing or reordering a seq, and the stop-time flush deletes what was acknowledged (or says what stays).

These run the ack functions of `Uplink` against a real buffer (SQLite on tmp_path), without a broker: what a
PUBACK does to the uplink is append the message's seqs to its ack list (tests/integration cover that part
with Mosquitto). `RefusingStore` stands in for a full disk: the real store behind it, whose first `refuse`
acks fail with StoreError as a full disk's would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from agent.config.models import MqttConfig
from agent.errors import StoreError
from agent.pipeline.reading import Reading
from agent.pipeline.store import AsyncStore, Store
from agent.upstream import mqtt as uplink_module
from agent.upstream.mqtt import Uplink

T0 = 1_715_000_000_000


class RefusingStore:
    """The AsyncStore surface the ack path uses; the first `refuse` acks fail, every ack is recorded."""

    def __init__(self, store: AsyncStore, refuse: int = 0) -> None:
        self.store = store
        self.refuse = refuse
        self.calls: list[tuple[list[int], str | None]] = []
        self.probe: Callable[[], object] = lambda: None  # what a test wants to know at each ack call
        self.probed: list[object] = []
        self.in_ack = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def ack(self, seqs: Sequence[int], lane: str | None = None) -> int:
        self.calls.append((list(seqs), lane))
        self.probed.append(self.probe())
        self.in_ack.set()
        await self.release.wait()
        if self.refuse > 0:
            self.refuse -= 1
            raise StoreError("database or disk is full")
        return await self.store.ack(seqs, lane)


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    store = AsyncStore(Store(tmp_path / "buffer.db", 4 * 1024 * 1024))
    await store.open()
    await store.append([Reading("meter-1", "power_w", T0 + i, float(i), "W") for i in range(10)])
    try:
        yield store
    finally:
        await store.close()


async def pending(store: AsyncStore) -> list[int]:
    return [r.seq for r in await store.fetch(0, None, 100)]


def make_uplink(store: object, lane: str | None = None) -> Uplink:
    return Uplink(MqttConfig(url="mqtt://127.0.0.1:1"), "gw-test", store, "test", lane=lane)  # type: ignore[arg-type]


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


def acked(uplink: Uplink, seqs: list[int]) -> None:
    """What the end of a publish does once its PUBACK came (Uplink._publish_rows)."""
    uplink._acks.extend(seqs)
    uplink._ack_event.set()


async def test_flush_acks_deletes_exactly_the_acknowledged_rows(buffer: AsyncStore) -> None:
    store = RefusingStore(buffer)
    uplink = make_uplink(store, lane="primary")
    await uplink.flush_acks()
    assert store.calls == []  # nothing acknowledged: no DELETE at all
    uplink._acks.extend([2, 3, 7])
    await uplink.flush_acks()
    assert store.calls == [([2, 3, 7], "primary")]
    assert uplink._acks == []
    assert await pending(buffer) == [1, 4, 5, 6, 8, 9, 10]


async def test_flush_acks_refused_keeps_the_rows_and_says_so(
    buffer: AsyncStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = RefusingStore(buffer, refuse=1)
    uplink = make_uplink(store)
    uplink._acks.extend([1, 2, 3])
    with caplog.at_level(logging.ERROR, logger=uplink_module.log.name):
        await uplink.flush_acks()  # at stop: must not raise, the rows will simply be sent again
    assert await pending(buffer) == list(range(1, 11))
    assert uplink._acks == []
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "3 acknowledged readings" in record.getMessage()
    assert "database or disk is full" in record.getMessage()


async def test_flusher_coalesces_acks_arriving_during_a_delete(buffer: AsyncStore) -> None:
    store = RefusingStore(buffer)
    uplink = make_uplink(store)
    store.release.clear()  # the first DELETE is slow: acks pile up meanwhile
    task = asyncio.create_task(uplink._ack_flusher())
    try:
        acked(uplink, [1, 2])
        await wait_for(store.in_ack.is_set)
        acked(uplink, [3])
        acked(uplink, [5, 4])
        store.release.set()
        await wait_for(lambda: len(store.calls) == 2 and not uplink._acks)
        assert store.calls == [([1, 2], None), ([3, 5, 4], None)]
        async with asyncio.timeout(10):
            while await pending(buffer) != [6, 7, 8, 9, 10]:
                await asyncio.sleep(0.005)
        # idle: the flusher waits for the next ack instead of spinning on an empty list
        await asyncio.sleep(0.05)
        assert len(store.calls) == 2
        acked(uplink, [10])
        await wait_for(lambda: len(store.calls) == 3)
        await wait_for(lambda: not uplink._acks)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert store.calls[2] == ([10], None)


async def test_flusher_retries_a_refused_delete_without_losing_or_reordering_a_seq(
    buffer: AsyncStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uplink_module, "ACK_RETRY", 0.05)
    store = RefusingStore(buffer, refuse=2)
    store.probe = lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    uplink = make_uplink(store, lane="primary")
    with caplog.at_level(logging.WARNING, logger=uplink_module.log.name):
        task = asyncio.create_task(uplink._ack_flusher())
        try:
            acked(uplink, [1, 2])
            await wait_for(lambda: len(store.calls) == 1)
            acked(uplink, [3])  # arrives while the disk refuses: retried with the earlier ones, after them
            await wait_for(lambda: len(store.calls) == 3)
            await wait_for(lambda: not uplink._ack_failing)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert store.calls[0] == ([1, 2], "primary")
    assert store.calls[1] == ([1, 2, 3], "primary")
    assert store.calls[2] == ([1, 2, 3], "primary")
    assert await pending(buffer) == [4, 5, 6, 7, 8, 9, 10]
    assert uplink._acks == []
    # said at the first refusal (before the first retry), and once per outage, not once per retry
    assert store.probed[0] == []
    (error,) = store.probed[1]
    assert "not yet deleted, will retry" in error and "database or disk is full" in error
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    recovered = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(recovered) == 1 and "deleted again" in recovered[0].getMessage()


async def test_flusher_waits_between_refused_deletes(buffer: AsyncStore) -> None:
    assert uplink_module.ACK_RETRY >= 1.0  # the margin of the check below
    store = RefusingStore(buffer, refuse=1)
    uplink = make_uplink(store)
    task = asyncio.create_task(uplink._ack_flusher())
    try:
        acked(uplink, [1])
        await wait_for(lambda: len(store.calls) == 1)
        await asyncio.sleep(0.1)  # a refused delete is not retried in a busy loop
        assert len(store.calls) == 1
        assert uplink._acks == [1]  # kept meanwhile
        await wait_for(lambda: len(store.calls) == 2)
        await wait_for(lambda: not uplink._acks)
        # The acks leave `_acks` when the delete starts: wait for the delete itself before stopping the
        # flusher (cancelling it earlier could cut the retried delete short on a loaded machine).
        async with asyncio.timeout(10):
            while await pending(buffer) != list(range(2, 11)):
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await pending(buffer) == list(range(2, 11))
