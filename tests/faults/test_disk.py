"""The disk: `max_size` reached during a long outage (eviction), and a filesystem that is really full."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
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


MAX_SIZE = 1_000_000  # "1MB" in the config (sizes are SI: agent/config.py)


class SizeSampler:
    """os.stat of the database and its -wal every 100 ms, from a task beside the test, noted by phase.

    How max_size bounds the files (docs/STORE.md, "Bound and eviction"): the database and its write-ahead log
    together stay within `max_size` (the WAL has a fixed share of it, the rows the rest). The -shm (SQLite's
    32 KiB shared-memory index, rebuilt at every open) is not part of the bound. While nothing is in flight (an
    outage), the bound is strict; during a drain the rows of the messages in flight are not evictable
    (docs/STORE.md), so the bound may be passed by at most those rows.
    """

    def __init__(self, db: Path) -> None:
        self.db = db
        self.phase = "before"
        self.samples: dict[str, list[int]] = {}
        self._task: asyncio.Task[None] | None = None

    def size(self) -> int:
        total = 0
        for p in (self.db, Path(f"{self.db}-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    async def _run(self) -> None:
        while True:
            self.samples.setdefault(self.phase, []).append(self.size())
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def outage_rows(db: Path, above: int) -> list[int]:
    """The seqs above `above` in the buffer, read beside the daemon (WAL lets a reader in)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM readings WHERE seq > ? ORDER BY seq", (above,))]
    finally:
        conn.close()


async def test_max_size_evicts_the_oldest_and_counts_them(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int
) -> None:
    # 2 devices x 61 points every 100 ms: ~1200 readings/s, a 1MB buffer fills in a few seconds.
    cfg = fault_config(
        tmp_path, pbroker.port, sim.port, poll="100ms", registers=60, max_size="1MB", local_port=local_port
    )
    db = tmp_path / "buffer.db"
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    sizes = SizeSampler(db)
    async with TimedChecker(pbroker.port) as checker:
        daemon.start()
        sizes.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 500, what="first readings")
            pbroker.stop()
            sizes.phase = "outage"
            # Every seq above this one is stored during the outage (those at most are in flight or pending).
            before_outage = store_high(db)
            await wait_status(
                local_port, lambda d: d["buffer"]["evicted"] > 2000, timeout=60, what="eviction at max_size"
            )
            # The oldest went: the outage's surviving rows are the newest ones, without a hole, and everything
            # stored in the outage below them was evicted (read with the broker still down: no ack, no send).
            survivors = outage_rows(db, before_outage)
            assert survivors, "rows stored during the outage are in the buffer"
            lowest = survivors[0]
            assert survivors == list(range(lowest, survivors[-1] + 1)), "eviction left a hole: not the oldest"
            assert lowest > before_outage + 1, "the outage's oldest rows were evicted"
            pbroker.start()
            sizes.phase = "drain"
            await wait_status(local_port, lambda d: d["upstream"]["connected"], what="reconnection")
            # Evictions go on until the drain has made room; the status figures are refreshed every second.
            await wait_status(local_port, lambda d: d["buffer"]["pending"] < 2000, timeout=60, what="drained")
            sizes.phase = "after"
            await asyncio.sleep(1.5)
            final = await wait_status(local_port, lambda d: True)
            high = store_high(db)
            await checker.wait_for_seqs(high, timeout=60, missing_ok=final["buffer"]["evicted"])
            await checker.wait_for(
                lambda: any(
                    h["buffer"]["evicted"] == final["buffer"]["evicted"] for h in checker.data.health
                ),
                what="a health message with the final evicted count",
            )
        finally:
            await sizes.stop()
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    peaks = {phase: max(v) for phase, v in sizes.samples.items()}
    print(
        f"SIZES max_size {MAX_SIZE}: peak db+wal per phase {peaks}, {len(sizes.samples['outage'])} outage samples"
    )
    assert a.gaps, "the outage overflowed the buffer: some seqs must be missing"
    # Exact: every seq the platform never got was evicted, and no evicted reading arrived (rows in flight are
    # pinned until their PUBACK; docs/STORE.md).
    assert len(a.gaps) == final["buffer"]["evicted"], (len(a.gaps), final["buffer"])
    assert a.conflicting == [] and a.counter_reused == [] and a.counter_disorder == 0
    # The outage's evicted rows (all of those below its lowest survivor) never reached the platform. (Gaps
    # above it are possible: once the broker is back the buffer is still full, and the next oldest unsent
    # rows, just past the drain's messages in flight, go while the drain runs.)
    gaps = set(a.gaps)
    assert all(s in gaps for s in range(before_outage + 1, lowest))
    assert max(a.gaps) < high
    # The bound held while the outage ran, sampled every 100 ms.
    assert len(sizes.samples["outage"]) >= 10
    assert peaks["outage"] <= MAX_SIZE, peaks
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
