"""Broker faults: short and long outages, a restart that loses every session, a silently black-holed link.

Every fault lasts until a condition holds, never a fixed time: an outage ends once the gateway has buffered a
given number of readings (so a slow machine makes it longer, never emptier); the broker is stopped and
started off the event loop (asyncio.to_thread), so the checker keeps reading while it happens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import (
    TimedChecker,
    assert_intact,
    audit,
    fault_config,
    figures,
    spec_duplicates,
    store_high,
    tail,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(150)

# Small batches and a small window, so that SPEC §5's duplicate bound per fault (6 x 50 = 300 readings) is
# below what an outage buffers and the duplicate check can fail.
LINK = {"batch_max": 50, "max_inflight": 4}
DUPLICATES = spec_duplicates(1, **LINK)  # every scenario here is one fault of the link


async def _settle(checker: TimedChecker, quiet: float = 1.0, timeout: float = 20) -> None:
    """Wait until no reading has arrived for `quiet` seconds (the broker delivered what it acknowledged)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = len(checker.data.readings), loop.time()
    while loop.time() - since < quiet and loop.time() < deadline:
        await asyncio.sleep(0.1)
        if len(checker.data.readings) != last:
            last, since = len(checker.data.readings), loop.time()


async def wait_buffered(db: Path, more: int, daemon: Daemon, timeout: float = 60) -> int:
    """Wait until the gateway's store has handed out `more` seqs beyond its mark now; return the new mark."""
    start = await asyncio.to_thread(store_high, db)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (high := await asyncio.to_thread(store_high, db)) < start + more:
        assert daemon.alive() and loop.time() < deadline, tail(daemon)
        await asyncio.sleep(0.1)
    return high


# 2 counting units x 9 points polled every 100 ms: ~180 readings a second, so ~1 s and ~8 s of outage.
@pytest.mark.parametrize("outage", [180, 1440], ids=["short", "long"])
async def test_broker_outage_loses_nothing(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, outage: int
) -> None:
    cfg = fault_config(tmp_path, pbroker.port, sim.port, poll="100ms", **LINK)
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(pbroker.port) as checker:
        daemon.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 50, what="first readings")
            await asyncio.to_thread(pbroker.stop)
            await wait_buffered(tmp_path / "buffer.db", outage, daemon)
            await asyncio.to_thread(pbroker.start)
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    assert_intact(a, DUPLICATES)
    assert a.backlog > 0, "the outage's readings came back marked as backlog"


async def test_broker_restart_losing_sessions(tmp_path: Path, sim: ModbusSim) -> None:
    """A broker without persistence: the restart forgets the checker's session too.

    To keep the check sound, the gateway's link is black-holed first and the checker given time to take what
    the old broker acknowledged; the link comes back only once the checker has subscribed to the new broker,
    so every reading the gateway did not see acknowledged must reach the checker.
    """
    broker = await asyncio.to_thread(Broker(persistence=False).start)
    proxy = await TcpProxy(broker.port).start()
    cfg = fault_config(tmp_path, proxy.port, sim.port, poll="100ms", **LINK)
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        async with TimedChecker(broker.port) as checker:
            daemon.start()
            try:
                await checker.wait_for(lambda: len(checker.data.readings) >= 50, what="first readings")
                proxy.blackhole()
                await _settle(checker)
                before = len(checker.data.readings)
                sessions = checker.sessions
                await asyncio.to_thread(broker.restart)
                # the checker subscribed again on the new, empty broker
                await checker.wait_for(lambda: checker.sessions > sessions, what="the checker's new session")
                # readings buffered behind the black hole meanwhile: the backlog the new broker must get
                await wait_buffered(tmp_path / "buffer.db", 180, daemon)
                proxy.forward()
                high = store_high(tmp_path / "buffer.db")
                await checker.wait_for_seqs(high)
            finally:
                assert daemon.stop() == 0, tail(daemon)
        a = audit(checker, high)
        figures(a)
        assert_intact(a, DUPLICATES)
        assert len(checker.data.readings) > before
    finally:
        await proxy.aclose()
        await asyncio.to_thread(broker.cleanup)


async def test_blackholed_link_is_noticed_and_recovered(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim
) -> None:
    proxy = await TcpProxy(pbroker.port).start()
    cfg = fault_config(tmp_path, proxy.port, sim.port, poll="100ms", keepalive="2s", **LINK)
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        async with TimedChecker(pbroker.port) as checker:
            daemon.start()
            try:
                await checker.wait_for(lambda: len(checker.data.readings) >= 50, what="first readings")
                connections = proxy.connections
                proxy.blackhole()
                # The daemon must give up the silent connection by itself (keepalive) and try again: a new
                # connection reaches the proxy while nothing is forwarded yet.
                await checker.wait_for(
                    lambda: proxy.connections > connections,
                    timeout=30,
                    what="a reconnection attempt after the keepalive expired",
                )
                await wait_buffered(tmp_path / "buffer.db", 180, daemon)  # a backlog behind the black hole
                proxy.forward()
                high = store_high(tmp_path / "buffer.db")
                await checker.wait_for_seqs(high, timeout=60)
            finally:
                assert daemon.stop() == 0, tail(daemon)
        log = daemon.log_text()
        assert "upstream lost" in log, log[-3000:]
        a = audit(checker, high)
        figures(a)
        assert_intact(a, DUPLICATES)
        assert a.backlog > 0
    finally:
        await proxy.aclose()
