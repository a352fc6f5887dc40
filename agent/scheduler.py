"""One supervised task per device: poll interval with jitter, a timeout per cycle, backoff, health.

A device task never lets an error out: every failure is counted in the
device's health and answered with a backoff, so one dead device never delays
or stops another. Readings go to `sink`, which must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from agent.aio import raise_if_cancelled
from agent.driver import Driver
from agent.errors import DeviceError
from agent.health import DeviceHealth
from agent.reading import Reading, now_ms

log = logging.getLogger("fieldgate.scheduler")

MAX_BACKOFF = 300.0  # a failing device is probed at least every 5 minutes
# The shortest poll interval the scheduler runs with. The config refuses shorter ones (`poll` is at least
# 10ms, docs/SPEC.md §2 bounds); this guard keeps a driver's own cycle_interval() of 0 from dividing by zero.
MIN_INTERVAL = 0.01
STATE_POINT = "_state"  # device events: "failing" when it starts failing, "ok" when it recovers
ERROR_POINT = "_error"  # sent with "failing": the error, in words


class FailureReporter(Protocol):
    """Rate-limited logging of device failures (agent.logsetup.ErrorReporter fits)."""

    def failure(self, device: str, message: str) -> None: ...

    def success(self, device: str) -> None: ...


class _PlainReporter:
    """Logs each state change once (used when no rate-limited reporter is given)."""

    def __init__(self) -> None:
        self._failing: set[str] = set()

    def failure(self, device: str, message: str) -> None:
        if device not in self._failing:
            self._failing.add(device)
            log.warning("%s: failing: %s", device, message)

    def success(self, device: str) -> None:
        if device in self._failing:
            self._failing.discard(device)
            log.info("%s: recovered", device)


def next_tick(
    interval: float,
    started: float,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> float:
    """Seconds from now to the next poll: the first tick of the wall clock's grid of `interval` (1 s polls at
    every whole second, 10 s polls at :00, :10...) at least half an interval after the cycle `started`
    (monotonic). Ticks already past (a cycle longer than the interval) are skipped. The grid is read anew
    each time, so a clock step moves the phase once and never bunches polls."""
    if not interval >= MIN_INTERVAL:  # also nan
        interval = MIN_INTERVAL
    now = monotonic()
    earliest = max(started + interval / 2, now)
    wall_earliest = wall() + (earliest - now)
    return earliest - now + (interval - wall_earliest % interval) % interval


def backoff_delay(consecutive_errors: int, poll: float, rng: random.Random | None = None) -> float:
    """Delay before the next attempt: the poll interval at first, doubling, capped, with ±20 % jitter."""
    base = max(poll, 1.0) * (2 ** max(consecutive_errors - 1, 0))
    delay = min(base, max(MAX_BACKOFF, poll))
    r = rng or random
    return float(delay * r.uniform(0.8, 1.2))


class DeviceTask:
    """Runs one device until cancelled."""

    def __init__(
        self,
        driver: Driver[object],
        health: DeviceHealth,
        sink: Callable[[list[Reading]], None],
        reporter: FailureReporter | None = None,
        beat: Callable[[], None] | None = None,
        polling: Callable[[bool], None] | None = None,
    ) -> None:
        self.driver = driver
        self.beat = beat  # the progress watchdog's heartbeat for this device
        # told when a poll starts (True) and ends (False): the store writer's cue to commit a tick at once
        self.polling: Callable[[bool], None] = polling or (lambda started: None)
        self.health = health
        self.sink = sink
        self.reporter = reporter or _PlainReporter()
        self._opened = False
        self._wake = asyncio.Event()  # set to poll now (status page's "re-poll")

    @property
    def name(self) -> str:
        return self.driver.device

    def poll_now(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            if self.driver.stream() is not None:
                await self._run_stream()
            else:
                await self._run_polled()
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                async with asyncio.timeout(5):
                    await self.driver.close()
            except (DeviceError, TimeoutError, OSError) as exc:
                log.debug("%s: close: %s", self.name, exc)

    def _progress(self) -> None:
        self.health.last_progress = time.monotonic()
        if self.beat is not None:
            self.beat()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when a re-poll is asked for; counts as progress for the watchdog."""
        self._progress()
        if seconds > 0 and not self._wake.is_set():
            # asyncio.timeout, not wait_for: no extra task per sleep (this runs every cycle of every device)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
        self._wake.clear()

    def _ok(self, readings: list[Reading]) -> None:
        h = self.health
        h.cycles += 1
        self._progress()
        if readings:
            h.last_ok_ts = readings[-1].ts
        elif h.last_ok_ts is None or h.state != "ok":
            h.last_ok_ts = now_ms()
        if h.state != "ok":
            self.reporter.success(self.name)
        if h.state == "failing":  # the recovery event, before the values (docs/SPEC.md, extensions)
            self.sink([Reading(self.name, STATE_POINT, now_ms(), "ok")])
        h.state = "ok"
        h.consecutive_errors = 0
        h.next_attempt_ts = None
        h.point_errors = dict(self.driver.point_errors)
        counters = getattr(self.driver, "counters", None)
        if isinstance(counters, dict):
            h.counters = dict(counters)
        for r in readings:
            h.last_readings[r.point] = r
        if readings:
            self.sink(readings)

    def _failed(self, message: str, delay: float) -> None:
        h = self.health
        if h.state != "failing":  # the failure event: once per episode, never a value
            ts = now_ms()
            self.sink(
                [Reading(self.name, STATE_POINT, ts, "failing"), Reading(self.name, ERROR_POINT, ts, message)]
            )
        h.state = "failing"
        h.errors += 1
        h.consecutive_errors += 1
        h.last_error = message
        h.last_error_ts = now_ms()
        h.next_attempt_ts = now_ms() + int(delay * 1000)
        self._progress()
        counters = getattr(self.driver, "counters", None)
        if isinstance(counters, dict):
            h.counters = dict(counters)
        self.reporter.failure(self.name, message)

    async def _run_polled(self) -> None:
        interval = self.driver.cycle_interval()
        timeout = getattr(self.driver.config, "cycle_timeout", lambda: min(max(interval, 1.0), 30.0))()
        # The first poll happens at once (the first reading reaches the platform sooner); the next ones on
        # the clock's grid of the interval (next_tick): every device with the same interval polls at the same
        # instant, so the gateway wakes once per tick for all of them, not once per device (a shared bus
        # serialises their requests anyway). Measured: 10 devices at 1 s, 1.0 -> 0.6 CPU-s/min.
        while True:
            started = time.monotonic()
            message: str | None = None
            try:
                if not self._opened:
                    async with asyncio.timeout(timeout):
                        await self.driver.open()
                    self._opened = True
                self.polling(True)
                try:
                    async with asyncio.timeout(timeout):  # a timer, where wait_for would add a task per cycle
                        readings = await self.driver.read()
                finally:
                    self.polling(False)
            except TimeoutError:
                message = f"no answer within {timeout:g}s"
            except DeviceError as exc:
                message = str(exc) or type(exc).__name__
            except OSError as exc:
                message = f"I/O error: {exc.strerror or exc}"
            except Exception as exc:  # a driver bug must not kill the device task silently
                log.exception("%s: unexpected error in driver %s", self.name, self.driver.name)
                message = f"internal error: {type(exc).__name__}: {exc}"
            raise_if_cancelled()  # a stop a driver's library swallowed is not a device error (agent/aio.py)
            if message is None:
                self._ok(readings)
                # A cycle longer than the interval skips the ticks it missed rather than bursting.
                await self._sleep(next_tick(interval, started))
            else:
                await self._close()
                delay = backoff_delay(self.health.consecutive_errors + 1, interval)
                self._failed(message, delay)
                await self._sleep(delay)  # then a poll at once, and back on the grid

    async def _run_stream(self) -> None:
        interval = self.driver.cycle_interval()
        while True:
            message: str | None = None
            try:
                if not self._opened:
                    async with asyncio.timeout(30):
                        await self.driver.open()
                    self._opened = True
                stream = self.driver.stream()
                assert stream is not None
                async for batch in stream:
                    self._ok(batch)
                message = "stream ended"
            except TimeoutError:
                message = "no answer while opening"
            except DeviceError as exc:
                message = str(exc) or type(exc).__name__
            except OSError as exc:
                message = f"I/O error: {exc.strerror or exc}"
            except Exception as exc:
                log.exception("%s: unexpected error in driver %s", self.name, self.driver.name)
                message = f"internal error: {type(exc).__name__}: {exc}"
            raise_if_cancelled()  # a stop a driver's library swallowed is not a device error (agent/aio.py)
            await self._close()
            delay = backoff_delay(self.health.consecutive_errors + 1, min(interval, 5.0))
            self._failed(message, delay)
            await self._sleep(delay)
