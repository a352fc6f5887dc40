"""A corrupt or truncated buffer file at start: moved aside, counted, a fresh buffer, never a refusal to start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
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

pytestmark = pytest.mark.timeout(120)


async def _start_and_check_recovery(
    tmp: Path, broker: Broker, sim: ModbusSim, local_port: int, previous_high: int
) -> None:
    cfg = fault_config(tmp, broker.port, sim.port, local_port=local_port)
    daemon = Daemon(cfg, tmp / "daemon.log")
    async with TimedChecker(broker.port) as checker:
        daemon.start()
        try:
            doc = await wait_status(
                local_port, lambda d: d["buffer"]["recovered"] >= 1, what="recovered count"
            )
            assert doc["buffer"]["recovered"] == 1
            await checker.wait_for(
                lambda: len(checker.data.readings) >= 20, what="readings from a fresh buffer"
            )
            high = store_high(tmp / "buffer.db")
            first = min(r["seq"] for r in checker.data.readings)
            await checker.wait_for_seqs(high, low=first)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    log = daemon.log_text()
    assert "was unusable" in log and "moved it aside" in log, log[-3000:]
    aside = [p for p in tmp.iterdir() if p.name.startswith("buffer.db.corrupt-")]
    assert aside, "the bad file is kept for forensics"
    # seq never goes back: the new buffer continues past every seq the old one could have handed out.
    assert first > previous_high
    a = audit(checker, high, low=first)
    figures(a)
    assert a.gaps == [] and a.conflicting == [], a


async def test_garbage_buffer_file(tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int) -> None:
    (tmp_path / "buffer.db").write_bytes(os.urandom(64 * 1024))
    await _start_and_check_recovery(tmp_path, pbroker, sim, local_port, previous_high=0)


async def test_truncated_buffer_file(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int
) -> None:
    # A buffer with a backlog (broker down), stopped cleanly, then cut in half as a failing SD card might.
    cfg = fault_config(tmp_path, pbroker.port, sim.port, poll="100ms", registers=60)
    pbroker.stop()
    daemon = Daemon(cfg, tmp_path / "first.log").start()
    try:
        db = tmp_path / "buffer.db"
        for _ in range(200):
            await asyncio.sleep(0.1)
            # (the file exists a moment before its tables do: the daemon's first transaction creates them)
            with contextlib.suppress(sqlite3.OperationalError):
                if db.exists() and store_high(db) > 3000:
                    break
    finally:
        assert daemon.stop() == 0, tail(daemon)
    high = store_high(db)
    assert high > 3000
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    pbroker.start()
    await _start_and_check_recovery(tmp_path, pbroker, sim, local_port + 0, previous_high=high)


# -- seq never goes back (issue 17 item 6): the side file buffer.db.seq against a file that lost its tail --------


async def _settled(checker: TimedChecker) -> None:
    """Wait until the broker has delivered everything the killed daemon had handed over (0.5 s of quiet)."""
    count, since = -1, 0.0
    loop = asyncio.get_running_loop()
    while True:
        if len(checker.data.readings) != count:
            count, since = len(checker.data.readings), loop.time()
        elif loop.time() - since > 0.5:
            return
        await asyncio.sleep(0.05)


async def _seq_survives(tmp: Path, broker: Broker, sim: ModbusSim, local_port: int, damage: str) -> None:
    # 4MB: a 256 KiB WAL share, checkpointed every 64 KiB, so the file holds most rows and the -wal the last ones.
    cfg = fault_config(
        tmp, broker.port, sim.port, poll="100ms", registers=20, max_size="4MB", local_port=local_port
    )
    db = tmp / "buffer.db"
    async with TimedChecker(broker.port) as checker:
        daemon = Daemon(cfg, tmp / "first.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 3000, timeout=60, what="readings")
        finally:
            if damage == "stop":
                assert daemon.stop() == 0, tail(daemon)
            else:
                daemon.kill9()
        await _settled(checker)
        seen_before = max(checker.seq_set())
        n_before = len(checker.data.readings)
        assert Path(f"{db}.seq").exists()
        if damage == "kill9-lost-wal":
            wal = Path(f"{db}-wal")
            assert wal.exists(), "kill -9 leaves the -wal"
            wal.unlink()
        else:  # "kill9-emptied", "stop": the file is there, 0 bytes (and what kill -9 left beside it is gone)
            db.write_bytes(b"")
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        daemon = Daemon(cfg, tmp / "second.log").start()
        try:
            doc = await wait_status(
                local_port, lambda d: d["buffer"]["recovered"] >= 1, what="recovered count"
            )
            assert doc["buffer"]["recovered"] == 1, doc["buffer"]
            await checker.wait_for(
                lambda: sum(1 for r in checker.data.readings[n_before:] if r["seq"] > seen_before) >= 200,
                timeout=60,
                what="new readings after the restart",
            )
        finally:
            assert daemon.stop() == 0, tail(daemon)
    high = store_high(db)
    log = daemon.log_text()
    went_back = [line for line in log.splitlines() if " ERROR " in line and "went back" in line]
    assert len(went_back) == 1, log[-3000:]
    # What the platform sees: no seq carries two different readings (it would drop the second as a duplicate),
    # and every reading after the restart is either a resend of one it has (same seq, same reading) or new
    # with a seq above every seq it saw before.
    a = audit(checker, high)
    figures(a)
    assert a.conflicting == [] and a.counter_reused == [], (a.conflicting[:10], a.counter_reused[:10])
    before = {r["seq"]: r for r in checker.data.readings[:n_before]}
    for r in checker.data.readings[n_before:]:
        assert r["seq"] > seen_before or before.get(r["seq"]) == r, r


async def test_kill9_then_a_lost_wal_never_reuses_a_seq(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int
) -> None:
    await _seq_survives(tmp_path, pbroker, sim, local_port, "kill9-lost-wal")


@pytest.mark.parametrize("damage", ["kill9-emptied", "stop"])
async def test_an_emptied_buffer_file_never_reuses_a_seq(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, local_port: int, damage: str
) -> None:
    await _seq_survives(tmp_path, pbroker, sim, local_port, damage)
