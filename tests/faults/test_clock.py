"""The wall clock jumping backwards and forwards (a Pi without RTC before NTP): seq and delivery unaffected.

The daemon's wall clock is faked with libfaketime (apt package `faketime`), driven through a timestamp file
the test rewrites; the monotonic clock stays real (FAKETIME_DONT_FAKE_MONOTONIC), as on a real clock step.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.clock import detect_synced
from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import TimedChecker, audit, fault_config, figures, store_high, tail

pytestmark = pytest.mark.timeout(120)

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
DAY_MS = 86_400_000


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime not installed (apt-get install faketime)")
async def test_clock_jumps_leave_seq_and_delivery_alone(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim
) -> None:
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    cfg = fault_config(tmp_path, pbroker.port, sim.port, poll="100ms")
    daemon = Daemon(cfg, tmp_path / "daemon.log", env=env)
    marks: list[int] = []
    async with TimedChecker(pbroker.port) as checker:
        daemon.start()
        try:
            for step in ("-1d", "+1d", "+0"):  # back a day, forward two days, back to the true time
                await checker.wait_for(
                    lambda: len(checker.data.readings) >= 100 * (len(marks) + 1),
                    what=f"readings before the jump to {step}",
                )
                marks.append(max(r["seq"] for r in checker.data.readings))
                offset.write_text(step + "\n")
            await checker.wait_for(
                lambda: max(r["seq"] for r in checker.data.readings) > marks[-1] + 100,
                what="readings after the last jump",
            )
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    assert a.gaps == [] and a.conflicting == [] and a.counter_reused == [], a
    assert a.counter_disorder == 0, "seq follows the order of the reads, whatever the wall clock says"
    now = time.time_ns() // 1_000_000
    ts = {r["seq"]: r["ts"] for r in checker.data.readings}
    # The readings carry the (faked) time they were taken: a day early, then a day late.
    assert any(now - 2 * DAY_MS < t < now - DAY_MS / 2 for t in ts.values())
    assert any(t > now + DAY_MS / 2 for t in ts.values())
    # This test runs on whatever clock the machine has: readings are flagged exactly when it is not synced.
    uncertain = {r.get("quality") == "uncertain" for r in checker.data.readings}
    assert uncertain == {not detect_synced()}, uncertain
