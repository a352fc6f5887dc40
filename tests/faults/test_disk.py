"""The disk: `max_size` reached during a long outage (eviction), and a filesystem that is really full."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import (
    TimedChecker,
    audit,
    fault_config,
    figures,
    store_high,
    tail,
    wait_status,
)

pytestmark = pytest.mark.timeout(150)


async def test_max_size_evicts_the_oldest_and_counts_them(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int
) -> None:
    # 2 devices x 61 points every 100 ms: ~1200 readings/s, a 1MB buffer fills in a few seconds.
    cfg = fault_config(
        tmp_path, pbroker.port, sim.port, poll="100ms", registers=60, max_size="1MB", local_port=local_port
    )
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(pbroker.port) as checker:
        daemon.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 500, what="first readings")
            pbroker.stop()
            await wait_status(
                local_port, lambda d: d["buffer"]["evicted"] > 2000, timeout=60, what="eviction at max_size"
            )
            pbroker.start()
            await wait_status(local_port, lambda d: d["upstream"]["connected"], what="reconnection")
            # Evictions go on until the drain has made room; the status figures are refreshed every second.
            await wait_status(local_port, lambda d: d["buffer"]["pending"] < 2000, timeout=60, what="drained")
            await asyncio.sleep(1.5)
            final = await wait_status(local_port, lambda d: True)
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high, timeout=60, missing_ok=final["buffer"]["evicted"])
            await checker.wait_for(
                lambda: any(
                    h["buffer"]["evicted"] == final["buffer"]["evicted"] for h in checker.data.health
                ),
                what="a health message with the final evicted count",
            )
        finally:
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    assert a.gaps, "the outage overflowed the buffer: some seqs must be missing"
    assert len(a.gaps) == final["buffer"]["evicted"], (len(a.gaps), final["buffer"])
    assert a.conflicting == [] and a.counter_reused == [] and a.counter_disorder == 0
    # Evicted are the oldest unsent: every gap is older than the newest reading that survived the outage.
    assert max(a.gaps) < high
    assert "buffer full" in daemon.log_text()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root and mount permission needed; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a tiny filesystem needs root (mount -t tmpfs)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> Path:
    """Take all the space of `mnt` but `leave` bytes, in a filler file."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


async def test_full_filesystem_holds_readings_and_recovers(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int, tiny_fs: Path
) -> None:
    db = tiny_fs / "buffer.db"
    cfg = fault_config(
        tmp_path, pbroker.port, sim.port, db=db, poll="100ms", registers=30, local_port=local_port
    )
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(pbroker.port) as checker:
        daemon.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 200, what="first readings")
            filler = _fill(tiny_fs, 300_000)
            pbroker.stop()  # an outage makes the buffer grow into the full disk
            full = await wait_status(
                local_port,
                lambda d: "disk is full" in (d["buffer"]["last_error"] or ""),
                timeout=60,
                what="the buffer saying the disk is full",
            )
            assert full["buffer"]["in_memory"] > 0
            reads = sim.units[1].reads
            await asyncio.sleep(1)
            assert sim.units[1].reads > reads, "polling goes on while the disk is full"
            # Broker back, disk still full: what the buffer holds is forwarded.
            pbroker.start()
            await checker.wait_for(
                lambda: any(checker.data.backlog_flags),
                timeout=30,
                what="the buffered readings forwarded while the disk is full",
            )
            filler.unlink()
            await checker.wait_for(
                lambda: "buffer writable again" in daemon.log_text(),
                timeout=60,
                what="the buffer writable again",
            )
            high = store_high(db)
            await checker.wait_for_seqs(high, timeout=60)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    log = daemon.log_text()
    assert "disk is full" in log, log[-3000:]
    # A delete refused by the full disk is retried on the same connection, not a reason to drop the link.
    assert "upstream session failed" not in log, log[-3000:]
    a = audit(checker, high)
    figures(a)
    assert a.gaps == [] and a.conflicting == [] and a.counter_reused == [] and a.counter_disorder == 0, a
    # Every read of the counter made while the disk was full reached the platform, in order.
    for device in ("ctr-1", "ctr-2"):
        counts = sorted(
            {
                int(r["value"])
                for r in checker.data.readings
                if r["device"] == device and r["point"] == "count"
            }
        )
        assert counts == list(range(counts[0], counts[-1] + 1)), device
