"""The progress watchdog: fed only while every task beats within its period; a hung one starves it."""

from __future__ import annotations

import logging

import pytest

from agent.watchdog import ProgressWatchdog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeNotifier:
    def __init__(self) -> None:
        self.pings = 0
        self.statuses: list[str] = []

    def watchdog(self) -> bool:
        self.pings += 1
        return True

    def status(self, text: str) -> bool:
        self.statuses.append(text)
        return True


def test_all_progressing_feeds_the_watchdog() -> None:
    clock = Clock()
    wd = ProgressWatchdog(clock)
    wd.register("meter-1", 30)
    wd.register("uplink", 90)
    n = FakeNotifier()
    for _ in range(10):
        clock.t += 20
        wd.beat("meter-1")
        wd.beat("uplink")
        assert wd.check(n) == []
    assert n.pings == 10
    assert n.statuses == []


def test_a_hung_poller_starves_the_watchdog_and_is_named(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    wd = ProgressWatchdog(clock)
    wd.register("meter-1", 30)
    wd.register("lamp-1", 30)
    n = FakeNotifier()
    clock.t += 25
    wd.beat("lamp-1")
    assert wd.check(n) == []  # 25 s of silence is within meter-1's 30 s
    clock.t += 10
    wd.beat("lamp-1")
    assert wd.stalled() == ["meter-1"]
    with caplog.at_level(logging.ERROR):
        assert wd.check(n) == ["meter-1"]
        assert wd.check(n) == ["meter-1"]
    assert n.pings == 1
    assert n.statuses[-1] == "watchdog starved, stalled: meter-1 (no progress for 35 s)"
    assert sum("meter-1" in r.getMessage() for r in caplog.records) == 1  # logged once, not per tick
    # It comes back: the watchdog is fed again.
    wd.beat("meter-1")
    assert wd.check(n) == []
    assert n.pings == 2
    assert "all tasks progressing" in n.statuses[-1]


def test_exact_period_is_not_a_stall_and_unregister_forgets() -> None:
    clock = Clock()
    wd = ProgressWatchdog(clock)
    wd.register("air-1", 10)
    assert wd.stalled(now=clock.t + 10) == []
    assert wd.stalled(now=clock.t + 10.5) == ["air-1"]
    wd.unregister("air-1")
    wd.beat("air-1")  # a late beat from a removed task is harmless
    assert wd.stalled(now=clock.t + 100) == []
    assert wd.names() == []


def test_register_again_restarts_the_clock() -> None:
    clock = Clock()
    wd = ProgressWatchdog(clock)
    wd.register("meter-1", 10)
    clock.t += 50
    assert wd.stalled() == ["meter-1"]
    wd.register("meter-1", 20)  # reloaded with a new poll interval
    assert wd.stalled() == []
    assert wd.silence() == {"meter-1": 0.0}
    with pytest.raises(ValueError, match="positive"):
        wd.register("bad", 0)


class _Stop(Exception):
    pass


async def test_run_checks_each_interval_and_stops_feeding_a_stall() -> None:
    clock = Clock()
    wd = ProgressWatchdog(clock)
    wd.register("uplink", 60)
    n = FakeNotifier()
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 6:
            raise _Stop
        clock.t += seconds
        if len(slept) <= 2:  # the uplink beats twice, then hangs
            wd.beat("uplink")

    with pytest.raises(_Stop):
        await wd.run(n, 30, sleep=fake_sleep)
    assert slept == [30] * 6
    # Checks at +0, +30, +60 (beating), +90 and +120 (silent 30 s, 60 s: within the period) are fed;
    # at +150 the uplink has been silent 90 s: starved, and STATUS says so.
    assert n.pings == 5
    assert n.statuses == ["watchdog starved, stalled: uplink (no progress for 90 s)"]
