"""The progress watchdog: systemd's WATCHDOG=1 is sent only while every registered task makes progress.

A poller stuck inside an await (a driver that never returns, a lock never released) leaves the process
alive and the event loop turning, so a timer-driven ping would hide it forever. Here each device task and
the uplink `beat()` whenever they make progress, including when they decide to wait (a device in backoff
is progressing: it knows why it waits). A task whose last beat is older than its period stalls; while any
task stalls the watchdog is starved, STATUS names the culprits, and systemd kills and restarts the service
after `WatchdogSec=`.

The period a task registers is its worst honest gap between beats: for a device, its poll interval (or
backoff ceiling) plus its timeout plus a margin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class WatchdogNotifier(Protocol):
    """What the watchdog needs from agent.sdnotify.Notifier (a fake in tests)."""

    def watchdog(self) -> bool: ...

    def status(self, text: str) -> bool: ...


@dataclass(slots=True)
class _Task:
    period: float
    last_beat: float


class ProgressWatchdog:
    """Per-task progress deadlines; `stalled()` lists the tasks past theirs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tasks: dict[str, _Task] = {}
        self._reported: tuple[str, ...] = ()

    def register(self, name: str, period_s: float) -> None:
        """Start watching `name`; it must beat at least every `period_s` seconds from now on.

        Registering again replaces the period and counts as a beat (a reloaded device starts afresh).
        """
        if period_s <= 0:
            raise ValueError(f"watchdog period for {name!r} must be positive, got {period_s}")
        self._tasks[name] = _Task(float(period_s), self._clock())

    def unregister(self, name: str) -> None:
        """Stop watching `name` (a device removed on reload, a task that ended on purpose)."""
        self._tasks.pop(name, None)

    def beat(self, name: str) -> None:
        """`name` made progress. A beat from an unregistered name is ignored (it raced its unregister)."""
        task = self._tasks.get(name)
        if task is not None:
            task.last_beat = self._clock()

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def silence(self, now: float | None = None) -> dict[str, float]:
        """Seconds since each task's last beat (for the status page)."""
        t = self._clock() if now is None else now
        return {name: t - task.last_beat for name, task in sorted(self._tasks.items())}

    def stalled(self, now: float | None = None) -> list[str]:
        """Names of the tasks whose last beat is older than their period, sorted."""
        t = self._clock() if now is None else now
        return sorted(name for name, task in self._tasks.items() if t - task.last_beat > task.period)

    def describe(self, stalled: list[str], now: float | None = None) -> str:
        """One STATUS line naming what stalls and for how long."""
        t = self._clock() if now is None else now
        parts = [f"{name} (no progress for {t - self._tasks[name].last_beat:.0f} s)" for name in stalled]
        return "watchdog starved, stalled: " + ", ".join(parts)

    def check(self, notifier: WatchdogNotifier) -> list[str]:
        """One round: ping systemd if nothing stalls, else say what stalls. Returns the stalled names."""
        now = self._clock()
        stalled = self.stalled(now)
        if not stalled:
            notifier.watchdog()
            if self._reported:
                log.warning("watchdog: progress again from %s", ", ".join(self._reported))
                notifier.status("running; all tasks progressing")
                self._reported = ()
            return stalled
        text = self.describe(stalled, now)
        if tuple(stalled) != self._reported:
            # Logged on change only: the journal shows the moment a task hung, not one line per tick.
            log.error("%s; systemd will restart the service unless they recover", text)
            self._reported = tuple(stalled)
        notifier.status(text)
        return stalled

    async def run(
        self,
        notifier: WatchdogNotifier,
        interval: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Check every `interval` seconds until cancelled (use half of `Notifier.watchdog_interval()`)."""
        if interval <= 0:
            raise ValueError(f"watchdog interval must be positive, got {interval}")
        while True:
            self.check(notifier)
            await sleep(interval)
