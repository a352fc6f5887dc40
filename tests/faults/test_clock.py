"""The wall clock jumping backwards and forwards (a Pi without RTC before NTP): seq and delivery unaffected.

The daemon's wall clock is faked with libfaketime (apt package `faketime`), driven through a timestamp file
the test rewrites; the monotonic clock stays real (FAKETIME_DONT_FAKE_MONOTONIC), as on a real clock step.

The clock's synchronisation state is forced both ways, independently of the machine the test runs on: the
daemon runs under a small harness that replaces the two sources `agent.pipeline.clock.detect_synced` consults (the
kernel's ntp_adjtime answer and systemd-timesyncd's flag file), so the daemon's own detection, latching and
flagging run unchanged. The detection itself is unit-tested with injected kernel answers
(tests/unit/test_clock.py).
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import TimedChecker, assert_intact, audit, fault_config, figures, store_high, tail

pytestmark = pytest.mark.timeout(120)

DAY_MS = 86_400_000
LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketime.so.1",  # Debian, Ubuntu (multiarch: x86_64-linux-gnu, aarch64-linux-gnu...)
    "/usr/lib/faketime/libfaketime.so.1",  # Arch, Alpine
    "/usr/lib64/faketime/libfaketime.so.1",  # Fedora
    "/usr/local/lib/faketime/libfaketime.so.1",  # built from source
)

# `python -c HARNESS STATE run -c ...`: the kernel answers "not synchronised"; timesyncd's flag file exists
# (STATE=synced) or not (unsynced); then the real CLI.
HARNESS = """
import sys
from pathlib import Path
from agent.pipeline import clock
state, flag = sys.argv.pop(1), Path(sys.argv.pop(1))
clock.kernel_synced = lambda call=None: False
clock.TIMESYNCD_FLAG = flag
if state == "synced":
    flag.touch()
from agent.cli import main
sys.exit(main())
"""


def find_libfaketime() -> str | None:
    """The LD_PRELOAD value for libfaketime, wherever the distribution put it; else the `faketime` wrapper's own
    (it may hold the dynamic loader's `$LIB` token, which the loader expands)."""
    for pattern in LIBFAKETIME_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    wrapper = shutil.which("faketime")
    if wrapper is None:
        return None
    try:
        out = subprocess.run(
            [wrapper, "-f", "+0", "env"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("LD_PRELOAD="):
            value = line.split("=", 1)[1].split(":")[0]
            plain = value.replace("${LIB}", "$LIB")
            # $LIB is lib, lib64 or a multiarch path such as lib/x86_64-linux-gnu
            if any(glob.glob(plain.replace("$LIB", lib)) for lib in ("*", "*/*")):
                return value
    return None


LIBFAKETIME = find_libfaketime()


def test_libfaketime_is_found_without_an_architecture_in_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper's answer is used when no known directory holds the library (another distribution)."""
    if shutil.which("faketime") is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    monkeypatch.setattr(sys.modules[__name__], "LIBFAKETIME_GLOBS", ("/nonexistent/libfaketime.so.1",))
    value = find_libfaketime()
    assert value is not None and "libfaketime" in value, value


@pytest.mark.parametrize("state", ["synced", "unsynced"])
async def test_clock_jumps_leave_seq_and_delivery_alone(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, state: str
) -> None:
    if LIBFAKETIME is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    cfg = fault_config(tmp_path, pbroker.port, sim.port, poll="100ms")  # gateway.clock: detect (the default)
    exe = [sys.executable, "-c", HARNESS, state, str(tmp_path / "timesync-synchronized")]
    daemon = Daemon(cfg, tmp_path / "daemon.log", env=env, exe=exe)
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
    # seq follows the order of the reads whatever the wall clock says; the link never dropped, so nothing
    # may arrive twice (a timer on the wall clock re-sending after a jump would)
    assert_intact(a, max_duplicates=0)
    now = time.time_ns() // 1_000_000
    ts = {r["seq"]: r["ts"] for r in checker.data.readings}
    # The readings carry the (faked) time they were taken: a day early, then a day late.
    assert any(now - 2 * DAY_MS < t < now - DAY_MS / 2 for t in ts.values())
    assert any(t > now + DAY_MS / 2 for t in ts.values())
    # Catches: flagging that ignores the clock state (always or never uncertain), or a state lost across
    # the jumps. Unsynchronised: every reading is flagged (the state is re-asked every 10 s and stays so);
    # synchronised: none is.
    flagged = {r.get("quality") == "uncertain" for r in checker.data.readings}
    assert flagged == {state == "unsynced"}, flagged
    log = daemon.log_text()
    assert ("system clock not synchronised yet" in log) == (state == "unsynced"), tail(daemon)
