"""Broker faults: short and long outages, a restart that loses every session, a silently black-holed link."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import TimedChecker, audit, fault_config, figures, store_high, tail
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(150)


async def _settle(checker: TimedChecker, quiet: float = 1.0, timeout: float = 20) -> None:
    """Wait until no reading has arrived for `quiet` seconds (the broker delivered what it acknowledged)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = len(checker.data.readings), loop.time()
    while loop.time() - since < quiet and loop.time() < deadline:
        await asyncio.sleep(0.1)
        if len(checker.data.readings) != last:
            last, since = len(checker.data.readings), loop.time()


@pytest.mark.parametrize("outage", [1.0, 8.0], ids=["short", "long"])
async def test_broker_outage_loses_nothing(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim, outage: float
) -> None:
    cfg = fault_config(tmp_path, pbroker.port, sim.port, poll="100ms")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(pbroker.port) as checker:
        daemon.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 50, what="first readings")
            pbroker.stop()
            await asyncio.sleep(outage)
            pbroker.start()
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    assert a.gaps == [] and a.conflicting == [] and a.counter_reused == [] and a.counter_disorder == 0, a
    assert a.backlog > 0, "the outage's readings came back marked as backlog"


async def test_broker_restart_losing_sessions(tmp_path: Path, sim: ModbusSim) -> None:
    """A broker without persistence: the restart forgets the checker's session too.

    To keep the check sound, the gateway's link is black-holed first and the checker given time to take what
    the old broker acknowledged; the link comes back only once the checker has subscribed to the new broker,
    so every reading the gateway did not see acknowledged must reach the checker.
    """
    broker = Broker(persistence=False).start()
    proxy = await TcpProxy(broker.port).start()
    cfg = fault_config(tmp_path, proxy.port, sim.port, poll="100ms")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    try:
        async with TimedChecker(broker.port) as checker:
            daemon.start()
            try:
                await checker.wait_for(lambda: len(checker.data.readings) >= 50, what="first readings")
                proxy.blackhole()
                await _settle(checker)
                before = len(checker.data.readings)
                broker.restart()
                await asyncio.wait_for(checker.connected.wait(), 20)
                await asyncio.sleep(0.5)  # the checker subscribes right after connecting
                await asyncio.sleep(2)
                proxy.forward()
                high = store_high(tmp_path / "buffer.db")
                await checker.wait_for_seqs(high)
            finally:
                assert daemon.stop() == 0, tail(daemon)
        a = audit(checker, high)
        figures(a)
        assert a.gaps == [] and a.conflicting == [] and a.counter_reused == [], a
        assert len(checker.data.readings) > before
    finally:
        await proxy.aclose()
        broker.cleanup()


async def test_blackholed_link_is_noticed_and_recovered(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim
) -> None:
    proxy = await TcpProxy(pbroker.port).start()
    cfg = fault_config(tmp_path, proxy.port, sim.port, poll="100ms", keepalive="2s")
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
                await asyncio.sleep(2)
                proxy.forward()
                high = store_high(tmp_path / "buffer.db")
                await checker.wait_for_seqs(high, timeout=60)
            finally:
                assert daemon.stop() == 0, tail(daemon)
        log = daemon.log_text()
        assert "upstream lost" in log, log[-3000:]
        a = audit(checker, high)
        figures(a)
        assert a.gaps == [] and a.conflicting == [] and a.counter_reused == [], a
        assert a.backlog > 0
    finally:
        await proxy.aclose()
