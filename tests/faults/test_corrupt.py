"""A corrupt or truncated buffer file at start: moved aside, counted, a fresh buffer, never a refusal to start."""

from __future__ import annotations

import asyncio
import os
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
