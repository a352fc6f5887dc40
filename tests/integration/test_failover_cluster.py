"""A real 3-node NATS cluster on loopback (JetStream clustered, MQTT on every node, R3 MQTT streams).

The gateway lists two of the nodes in `url`; the platform is on the third. The node the gateway is connected
to is killed with SIGKILL, five times during steady flow and once during a backlog drain. A platform
connected to another node (persistent session, kept in JetStream) must see every seq, and data must flow again through another node: within 2 s when the
killed node led none of the MQTT streams and consumers. When it led one, MQTT CONNECTs, QoS 1 publishes or
deliveries in the cluster wait for JetStream to elect a new leader (several seconds: docs/FLEET.md), so the
bound there is that election, not the gateway. The figures printed here are those of docs/FLEET.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import free_port
from tests.daemon import Daemon
from tests.faults.conftest import (
    CounterUnit,
    TimedChecker,
    fault_config,
    fetch_status,
    store_high,
    tail,
    wait_status,
)
from tests.natsbroker import NatsCluster, NatsNode

pytestmark = pytest.mark.timeout(420)  # each kill may wait for JetStream elections (docs/FLEET.md §3)


class ClusterChecker(TimedChecker):
    """The platform: one persistent session, on the first node of `ports` that answers (another if lost)."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(ports[0])
        self.ports = ports
        self.port_in_use: int | None = None

    async def _run(self) -> None:
        i = 0
        while True:
            port = self.ports[i % len(self.ports)]
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    port,
                    identifier="cluster-checker",
                    clean_session=False,
                    keepalive=5,
                    timeout=5,
                ) as client:
                    await client.subscribe(f"{self.base}/#", qos=1)
                    self.port_in_use = port
                    self.connected.set()
                    async for msg in client.messages:
                        self._record(str(msg.topic), msg.payload if isinstance(msg.payload, bytes) else b"")
            except aiomqtt.MqttError:
                self.connected.clear()
                self.port_in_use = None
                i += 1
                await asyncio.sleep(0.1)


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    c = NatsCluster(3).start()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
async def counters() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({u: CounterUnit() for u in (1, 2, 3, 4)})
    for unit in s.units.values():
        unit.set("holding", 2, list(range(1000, 1100)))
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def cluster_config(tmp: Path, urls: list[str], sim: ModbusSim, local_port: int, **kw: object) -> Path:
    cfg = fault_config(tmp, 1, sim.port, poll="100ms", local_port=local_port, keepalive="2s", **kw)  # type: ignore[arg-type]
    cfg.write_text(
        cfg.read_text().replace("url: mqtt://127.0.0.1:1\n", f"url: [{', '.join(urls)}]\n    failback: 0s\n")
    )
    return cfg


async def node_in_use(cluster: NatsCluster, local_port: int) -> NatsNode:
    doc = await wait_status(local_port, lambda d: d["upstream"]["connected"], what="connected")
    port = int(doc["upstream"]["url"].rsplit(":", 1)[1])
    return cluster.node_on(port)


async def gateway_publishing_again(local_port: int, victim: NatsNode, killed: float) -> float:
    """Seconds from the kill until the gateway, connected to another node, has readings acknowledged there."""
    sent: int | None = None
    while True:
        with contextlib.suppress(OSError):
            up = (await asyncio.to_thread(fetch_status, local_port))["upstream"]
            if up["connected"] and up["url"] != victim.url:
                if sent is None:
                    sent = up["sent"]
                elif up["sent"] > sent:
                    return time.monotonic() - killed
        await asyncio.sleep(0.05)


async def kill_and_time(
    cluster: NatsCluster, checker: ClusterChecker, local_port: int
) -> tuple[NatsNode, float, list[str]]:
    """SIGKILL the gateway's node; seconds until a reading newer than any received before reaches the
    platform (through another node); which MQTT streams and consumers the killed node led. The gateway's
    own figure (acknowledged on another node) is printed beside."""
    victim = await node_in_use(cluster, local_port)
    assert checker.port_in_use != victim.port, "the platform is on another node than the gateway"
    leaders = await asyncio.to_thread(cluster.stream_leaders)
    led = sorted(name for name, leader in leaders.items() if leader == victim.name)
    before = len(checker.data.readings)
    top = max(checker.seq_set(), default=0)
    victim.kill9()
    killed_ms = time.time_ns() // 1_000_000
    gateway = asyncio.create_task(gateway_publishing_again(local_port, victim, time.monotonic()))

    def newer() -> int | None:
        for i in range(before, len(checker.data.readings)):
            if checker.data.readings[i]["seq"] > top:
                return checker.arrivals[i]
        return None

    await checker.wait_for(lambda: newer() is not None, timeout=60, what=f"data after killing {victim.name}")
    arrived = newer()
    assert arrived is not None
    acked = await asyncio.wait_for(gateway, 60)
    print(f"\n  kill of {victim.name}: gateway acknowledged on another node after {acked:.2f} s")
    return victim, (arrived - killed_ms) / 1000, led


def describe(kills: list[tuple[float, list[str]]]) -> str:
    def short(name: str) -> str:
        stream, _, consumer = name.partition(">")
        return f"{stream}>consumer" if consumer else stream

    return ", ".join(
        f"{t:.2f} s" + (f" (led {'+'.join(sorted({short(n) for n in led}))})" if led else " (led none)")
        for t, led in kills
    )


async def test_kill_the_node_in_use_five_times_during_steady_flow(
    tmp_path: Path, cluster: NatsCluster, counters: ModbusSim
) -> None:
    local_port = free_port()
    cfg = cluster_config(tmp_path, cluster.urls[:2], counters, local_port, units=(1, 2))
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    kills: list[tuple[float, list[str]]] = []
    # The platform sits on the third node; the gateway lists the first two (a fleet split over the nodes),
    # so the platform's node is never the one killed.
    async with ClusterChecker([cluster.nodes[2].port, cluster.nodes[1].port]) as checker:
        daemon.start()
        try:
            await checker.wait_for(
                lambda: len(checker.data.readings) >= 50, timeout=30, what="first readings"
            )
            for _ in range(5):
                await asyncio.sleep(2)  # steady flow
                victim, seconds, led = await kill_and_time(cluster, checker, local_port)
                kills.append((seconds, led))
                await asyncio.to_thread(victim.start)
                await asyncio.to_thread(victim.wait_ready)
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high, timeout=60)
        finally:
            assert daemon.stop() == 0, tail(daemon)
    median = statistics.median(t for t, _ in kills)
    print(
        f"\nFIGURES cluster steady kills: data again after {describe(kills)} (median {median:.2f} s); "
        f"{high} stored, {len(checker.data.readings)} received, "
        f"{len(checker.data.readings) - len(checker.seq_set())} duplicates, 0 missing"
    )
    rep = checker.data.report()
    assert rep["lost"] == [] and rep["live_out_of_order"] == 0, rep
    for seconds, led in kills:
        if not led:
            assert seconds < 2.0, describe(kills)


async def test_kill_the_node_in_use_during_a_backlog_drain(
    tmp_path: Path, cluster: NatsCluster, counters: ModbusSim
) -> None:
    local_port = free_port()
    db = tmp_path / "buffer.db"
    # First a backlog: the gateway runs for a while with no broker reachable (a port nobody listens on).
    offline = cluster_config(
        tmp_path,
        [f"mqtt://127.0.0.1:{free_port()}"],
        counters,
        local_port,
        units=(1, 2, 3, 4),
        registers=40,
        batch_max=20,
    )
    daemon = Daemon(offline, tmp_path / "daemon-offline.log").start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error):  # the buffer is being created
                if store_high(db) >= 8000:
                    break
            await asyncio.sleep(0.5)
    finally:
        assert daemon.stop() == 0, tail(daemon)
    backlog = store_high(db)
    cfg = cluster_config(tmp_path, cluster.urls[:2], counters, local_port, units=(1, 2), batch_max=20)
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with ClusterChecker([cluster.nodes[2].port, cluster.nodes[1].port]) as checker:
        daemon.start()
        try:
            await checker.wait_for(
                lambda: sum(checker.data.backlog_flags) >= 100, timeout=30, what="the drain"
            )
            drained_at_kill = sum(checker.data.backlog_flags)
            victim, seconds, led = await kill_and_time(cluster, checker, local_port)
            high = store_high(db)
            await checker.wait_for_seqs(high, timeout=90)
        finally:
            assert daemon.stop() == 0, tail(daemon)
        with contextlib.suppress(Exception):
            victim.start()
    print(
        f"\nFIGURES cluster kill during drain: {backlog} rows of backlog, {drained_at_kill} received when "
        f"{victim.name} was killed, data again after {describe([(seconds, led)])}; {high} stored, "
        f"{len(checker.data.readings)} received, 0 missing"
    )
    assert drained_at_kill < backlog, "the node was killed while the backlog was still draining"
    assert led or seconds < 2.0, describe([(seconds, led)])
    rep = checker.data.report()
    assert rep["lost"] == [], rep
