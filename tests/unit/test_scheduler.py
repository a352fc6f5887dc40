"""Poll ticks on the clock's grid (agent/pipeline/polling.py next_tick): one wake-up per tick for every device."""

from __future__ import annotations

import pytest

from agent.pipeline.polling import next_tick


def clocks(mono: float, wall: float) -> dict[str, object]:
    return {"monotonic": lambda: mono, "wall": lambda: wall}


@pytest.mark.parametrize(
    ("interval", "started_wall", "now_wall", "next_wall"),
    [
        (1.0, 100.0, 100.02, 101.0),  # steady state: the next whole second
        (1.0, 99.9995, 100.01, 101.0),  # woken a hair early for 100.0: still 101.0, never 100.0 again
        (1.0, 100.0004, 100.01, 101.0),  # woken a hair late
        (1.0, 100.7, 100.72, 102.0),  # a first poll mid-interval: at least half an interval before the next
        (1.0, 100.2, 100.25, 101.0),
        (1.0, 100.0, 102.3, 103.0),  # a cycle of 2.3 s: the missed ticks are skipped, no burst
        (10.0, 1003.2, 1003.4, 1010.0),  # 10 s polls at :00, :10, :20...
        (0.25, 50.0, 50.01, 50.25),
    ],
)
def test_next_tick_is_on_the_grid(
    interval: float, started_wall: float, now_wall: float, next_wall: float
) -> None:
    mono_now = 1000.0
    started = mono_now - (now_wall - started_wall)
    delay = next_tick(interval, started, **clocks(mono_now, now_wall))  # type: ignore[arg-type]
    assert now_wall + delay == pytest.approx(next_wall, abs=1e-9)


def test_devices_started_apart_share_their_ticks_after_one_cycle() -> None:
    interval, ticks = 1.0, []
    for start in (100.05, 100.45, 100.93):
        wall, mono = start, 500.0 + start
        seen = []
        for _ in range(4):
            started = mono
            wall += 0.03  # the poll itself
            mono += 0.03
            delay = next_tick(interval, started, **clocks(mono, wall))  # type: ignore[arg-type]
            wall += delay
            mono += delay
            seen.append(round(wall, 6))
        ticks.append(seen)
    # Every poll after the first is on a whole second, one second apart: the three devices wake together.
    assert ticks == [[101.0, 102.0, 103.0, 104.0], [101.0, 102.0, 103.0, 104.0], [102.0, 103.0, 104.0, 105.0]]
