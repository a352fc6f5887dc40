"""The buffer's figures the health and status documents show (agent/pipeline/health.py `BufferFigures`), on a
real store: read at start, read again only when older than STATS_FRESH, kept as they were when the store
cannot answer; each read samples the status page's timeline with the main upstream's link."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.pipeline.health import STATS_FRESH, BufferFigures
from agent.pipeline.reading import Reading, now_ms
from agent.pipeline.store import AsyncStore


@dataclass
class Link:
    """The two figures of an upstream the timeline samples."""

    connected: bool = True
    connections: int = 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def readings(n: int) -> list[Reading]:
    ts = now_ms()
    return [Reading("meter-1", "power_w", ts + i, 100.0 + i, "W") for i in range(n)]


async def test_figures_are_read_again_only_once_stale(async_store: AsyncStore) -> None:
    clock, link = Clock(), Link()
    figures = BufferFigures(async_store, lambda: link, clock)
    assert figures.last is None
    assert (await figures.first()).pending == 0

    await async_store.append(readings(3))
    await figures.refresh()  # never read by `refresh` yet: read now
    assert figures.last is not None and figures.last.pending == 3

    await async_store.append(readings(2))
    clock.now += STATS_FRESH / 2
    await figures.refresh()  # fresh: the store is not asked
    assert figures.last.pending == 3
    clock.now += STATS_FRESH
    await figures.refresh()
    assert figures.last.pending == 5


async def test_each_read_samples_backlog_and_link(async_store: AsyncStore) -> None:
    clock, link = Clock(), Link(connected=False, connections=0)
    figures = BufferFigures(async_store, lambda: link, clock)
    await async_store.append(readings(4))
    await figures.refresh()
    link.connected, link.connections = True, 1
    clock.now += STATS_FRESH
    await figures.refresh()
    timeline = figures.timeline  # summed over the slots: the two samples may fall in two minutes
    assert max(timeline.pending) == 4
    assert (sum(timeline.ups), sum(timeline.downs)) == (1, 1)


async def test_no_upstream_samples_a_link_down(async_store: AsyncStore) -> None:
    figures = BufferFigures(async_store, lambda: None, Clock())
    await figures.refresh()
    assert (sum(figures.timeline.ups), sum(figures.timeline.downs)) == (0, 1)


async def test_a_store_that_cannot_answer_keeps_the_last_figures(async_store: AsyncStore) -> None:
    await async_store.append(readings(2))
    clock = Clock()
    figures = BufferFigures(async_store, lambda: Link(), clock)
    await figures.refresh()
    await async_store.close()  # every call now raises StoreError
    clock.now += STATS_FRESH
    await figures.refresh()  # logged, not raised
    assert figures.last is not None and figures.last.pending == 2


async def test_run_reports_after_each_read(async_store: AsyncStore) -> None:
    figures = BufferFigures(async_store, lambda: Link())
    reported: list[int | None] = []

    def refreshed() -> None:
        reported.append(figures.last.pending if figures.last else None)
        raise SystemExit  # ends the loop after its first round, before its sleep

    with pytest.raises(SystemExit):
        await figures.run(refreshed)
    assert reported == [0]
