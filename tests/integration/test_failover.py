"""Several brokers for one upstream (`url: [A, B]`): kill -9 of the one in use, failover, failback.

Two independent Mosquitto brokers, one checker (a persistent-session platform) on each. The gateway uses A;
A is killed with SIGKILL during steady flow: data must arrive on B within 2 s, and every seq the gateway
stored must reach the platform (A's checker before the kill, B's after: rows in flight on A are sent again
on B, seq unchanged). Then A comes back: with `failback: 2s` the gateway returns to it once it has answered
for 2 s, saying `offline` on B (retained) and `online` on A.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import orjson
import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker, free_port
from tests.daemon import Daemon
from tests.faults.conftest import (
    GATEWAY,
    CounterUnit,
    TimedChecker,
    fault_config,
    store_high,
    tail,
    wait_status,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def two_brokers() -> Iterator[tuple[Broker, Broker]]:
    a, b = Broker(persistence=True).start(), Broker(persistence=True).start()
    try:
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


@pytest.fixture
def local_port() -> int:
    return free_port()


@pytest.fixture
async def counters() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({u: CounterUnit() for u in (1, 2)})
    for unit in s.units.values():
        unit.set("holding", 2, list(range(1000, 1100)))
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def failover_config(tmp: Path, urls: list[str], sim_port: int, local_port: int, failback: str) -> Path:
    """fault_config's counting devices, with a list of brokers in `url`."""
    cfg = fault_config(tmp, 1, sim_port, poll="100ms", local_port=local_port, keepalive="2s")
    text = cfg.read_text().replace(
        "url: mqtt://127.0.0.1:1\n", f"url: [{', '.join(urls)}]\n    failback: {failback}\n"
    )
    cfg.write_text(text)
    return cfg


async def retained_status(port: int, timeout: float = 10) -> str:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"probe-{time.monotonic_ns()}") as c:
        await c.subscribe(f"fieldgate/{GATEWAY}/status", qos=1)
        async with asyncio.timeout(timeout):
            async for msg in c.messages:
                doc = orjson.loads(msg.payload if isinstance(msg.payload, bytes) else b"")
                return str(doc["state"])
    raise AssertionError("no retained status")


def seqs_of(*checkers: TimedChecker) -> set[int]:
    out: set[int] = set()
    for c in checkers:
        out |= c.seq_set()
    return out


async def test_kill9_of_the_broker_in_use_fails_over_then_back(
    tmp_path: Path, two_brokers: tuple[Broker, Broker], counters: ModbusSim, local_port: int
) -> None:
    a, b = two_brokers
    cfg = failover_config(tmp_path, [a.url, b.url], counters.port, local_port, failback="2s")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    db = tmp_path / "buffer.db"
    async with TimedChecker(a.port) as on_a, TimedChecker(b.port) as on_b:
        daemon.start()
        try:
            await on_a.wait_for(lambda: len(on_a.data.readings) >= 50, what="readings on A (the first URL)")
            assert on_b.data.readings == [], "nothing goes to B while A answers"
            assert await retained_status(a.port) == "online"

            a.kill9()
            killed = time.monotonic()
            await on_b.wait_for(lambda: len(on_b.data.readings) > 0, timeout=10, what="data on B")
            failover = time.monotonic() - killed
            print(f"\nFIGURES failover to B: first reading {failover:.2f} s after kill -9 of A")
            assert failover < 2.0, f"data on B {failover:.2f} s after A was killed"
            doc = await wait_status(local_port, lambda d: d["upstream"]["url"] == b.url, what="url B in use")
            assert doc["upstream"]["failovers"] >= 1
            assert await retained_status(b.port) == "online"
            high = store_high(db)
            await on_b.wait_for(lambda: set(range(1, high + 1)) <= seqs_of(on_a, on_b), what="every seq")

            # A comes back: the gateway returns to it once it has answered for `failback` (2 s).
            a.start()
            await asyncio.wait_for(on_a.connected.wait(), 20)
            await wait_status(
                local_port, lambda d: d["upstream"]["url"] == a.url, timeout=30, what="back on A"
            )
            count = len(on_a.data.readings)
            await on_a.wait_for(lambda: len(on_a.data.readings) > count + 10, what="data on A again")
            assert await retained_status(b.port) == "offline", "the gateway said goodbye on B"
            assert await retained_status(a.port) == "online"
            high = store_high(db)
            await on_a.wait_for(lambda: set(range(1, high + 1)) <= seqs_of(on_a, on_b), what="every seq")
        finally:
            assert daemon.stop() == 0, tail(daemon)
    log = daemon.log_text()
    assert "is healthy again" in log, log[-3000:]
    # Live readings keep their order on each broker.
    for checker in (on_a, on_b):
        rep = checker.data.report()
        assert rep["live_out_of_order"] == 0, rep


async def test_first_url_dead_at_start_uses_the_second(
    tmp_path: Path, two_brokers: tuple[Broker, Broker], counters: ModbusSim, local_port: int
) -> None:
    a, b = two_brokers
    a.stop()  # the preferred broker is down when the gateway starts
    cfg = failover_config(tmp_path, [a.url, b.url], counters.port, local_port, failback="0s")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(b.port) as on_b:
        daemon.start()
        try:
            await on_b.wait_for(lambda: len(on_b.data.readings) >= 20, what="readings on B")
            a.start()
            await asyncio.sleep(3)  # failback 0s: it stays on B although A answers again
            doc = await wait_status(local_port, lambda d: d["upstream"]["connected"], what="connected")
            assert doc["upstream"]["url"] == b.url
            high = store_high(tmp_path / "buffer.db")
            await on_b.wait_for_seqs(high)
        finally:
            assert daemon.stop() == 0, tail(daemon)
