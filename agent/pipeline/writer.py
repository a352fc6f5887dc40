"""The store writer: readings from every device task -> one SQLite transaction per poll tick -> the uplinks.

Device tasks `put()` their processed readings; the writer commits them in batches on the store's thread
(`commit_interval`, docs/STORE.md) and hands the stored rows (with their seq) to the upstreams. While the
disk refuses, readings wait in memory up to MEMORY_LIMIT, the oldest dropped and counted beyond it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent.errors import StoreError
from agent.pipeline import memory, metrics
from agent.pipeline.reading import Reading
from agent.pipeline.store import AsyncStore, StoredRow

log = logging.getLogger("fieldgate.runtime")

MEMORY_LIMIT = 200_000  # readings held in memory while the store cannot write (disk full)
IDLE_BEAT = 5.0  # seconds: with nothing to commit, the store writer still beats the watchdog this often


class StoreWriter:
    """Collects readings from every device and commits them in batches; hands the stored rows to the uplink."""

    def __init__(
        self, store: AsyncStore, interval: float, on_stored: Callable[[list[StoredRow]], None]
    ) -> None:
        self.store = store
        self.interval = interval
        self.on_stored = on_stored
        self.pending: list[Reading] = []
        self.dropped = 0  # readings lost because the store failed for too long (memory bound)
        self._event = asyncio.Event()
        self.failing: str | None = None
        self.beat: Callable[[], None] = lambda: None
        self._last_flush = 0.0
        self._polls = 0  # device polls under way: readings of the same tick are still coming
        self.settled = False  # the start-up's memory given back (agent/pipeline/memory.py), once

    def polling(self, started: bool) -> None:
        """A device poll starts or ends (scheduler): the last one of a tick lets the tick's readings go."""
        self._polls += 1 if started else -1
        if not started and self._polls == 0 and self.pending:
            self._event.set()

    def put(self, readings: list[Reading]) -> None:
        was_empty = not self.pending
        self.pending.extend(readings)
        if was_empty or len(self.pending) >= 2000:
            self._event.set()

    async def run(self) -> None:
        """Commit at most every `interval`; readings arriving after a quiet spell are committed at once.

        Leading edge rather than a fixed tick: the first reading after start (or after a pause) is not
        held for up to `interval`, and an idle gateway does not wake up five times a second for nothing.
        After the very first commit, readings arriving after a pause wait while other devices are still
        being polled (at most `interval`): the devices of one poll tick are committed in one transaction.
        """
        while True:
            if not self.pending:
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_BEAT):  # woken by the first put()
                        await self._event.wait()
            wait = self._last_flush + self.interval - time.monotonic()
            if wait > 0 and len(self.pending) < 2000:
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # woken early only when 2000 readings wait
                        await self._event.wait()
            elif self._last_flush and self._polls > 0 and len(self.pending) < 2000:
                # Other devices of the same tick are still being read: commit when the last one is done
                # (polling(False)), or after `interval` at most.
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        while self._polls > 0 and len(self.pending) < 2000:
                            await self._event.wait()
                            self._event.clear()
            self._event.clear()
            await self.flush()
            self._last_flush = time.monotonic()
            self.beat()
            if self.failing:
                await asyncio.sleep(1.0)  # back off while the disk is full

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            # A stop cancels the writer task, maybe while this commit is still queued behind another store
            # call: it is committed all the same (AsyncStore runs every call it was given, docs/STORE.md; the
            # config property test once found a reading polled just before SIGTERM never stored). Its rows
            # then reach the uplink as backlog.
            rows = await self.store.append(batch)
        except StoreError as exc:
            if self.failing is None:
                log.error("buffer write failed, holding readings in memory: %s", exc)
            self.failing = str(exc)
            self.pending = batch + self.pending
            if len(self.pending) > MEMORY_LIMIT:
                excess = len(self.pending) - MEMORY_LIMIT
                self.dropped += excess
                del self.pending[:excess]
                log.error(
                    "buffer unwritable: %d oldest in-memory readings dropped (total %d)", excess, self.dropped
                )
            return
        if self.failing is not None:
            log.warning("buffer writable again")
            self.failing = None
        metrics.count_stored(rows)
        self.on_stored(rows)
        if not self.settled and len(rows) >= memory.SETTLE_MIN_READINGS:
            # A tick of a large config: the start-up's heap (mostly the config's snapshot, decoded) goes back to
            # the system soon. Smaller configs leave too little to be worth loading ctypes for.
            self.settled = True
            asyncio.get_running_loop().call_later(memory.SETTLE_AFTER, memory.settle)
