"""`kill -9` of the daemon at random moments, many times in a row, with the broker up and down."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import TimedChecker, audit, fault_config, figures, store_high, tail

BATCH_MAX = 50
MAX_INFLIGHT = 4


async def _kill_loop(tmp: Path, broker: Broker, sim: ModbusSim, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    cfg = fault_config(
        tmp, broker.port, sim.port, poll="100ms", batch_max=BATCH_MAX, max_inflight=MAX_INFLIGHT
    )
    async with TimedChecker(broker.port) as checker:
        for i in range(kills):
            # The middle third runs offline: the buffer fills, is killed, and must come back intact.
            offline = kills // 3 <= i < 2 * kills // 3
            if offline and broker.proc is not None:
                broker.stop()
            if not offline and broker.proc is None:
                broker.start()
            daemon = Daemon(cfg, tmp / f"daemon-{i}.log").start()
            # Random moments: during start-up, the first connection, the backlog replay, steady state.
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            assert daemon.alive(), tail(daemon)
            daemon.kill9()
        if broker.proc is None:
            broker.start()
        before = store_high(tmp / "buffer.db")
        daemon = Daemon(cfg, tmp / "daemon-final.log").start()
        try:
            # A reading stored by this last daemon has arrived: it is up, and its backlog is flowing.
            await checker.wait_for(
                lambda: any(r["seq"] > before for r in checker.data.readings), timeout=30, what="readings"
            )
            high = store_high(tmp / "buffer.db")
            await checker.wait_for_seqs(high, timeout=60)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    assert a.gaps == [], a.gaps[:20]
    assert a.conflicting == [], f"seqs reused after a kill: {a.conflicting[:20]}"
    assert a.counter_reused == [], f"one read stored under two seqs: {a.counter_reused[:20]}"
    assert a.counter_disorder == 0
    # Duplicates come only from messages in flight at a kill: at most max_inflight batches per kill.
    assert a.duplicates <= kills * MAX_INFLIGHT * BATCH_MAX, a.duplicates


@pytest.mark.timeout(150)
async def test_kill9_twenty_times_online_and_offline(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    await _kill_loop(tmp_path, pbroker, sim, kills=20, seed=20)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_kill9_long_variant(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    await _kill_loop(tmp_path, pbroker, sim, kills=150, seed=150)
