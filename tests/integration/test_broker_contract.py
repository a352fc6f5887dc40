"""The delivery contract against every broker implementation we support: Mosquitto and NATS (MQTT gateway).

Each test runs the real daemon against the broker and checks, with an independent persistent-session
subscriber, what a platform would see: QoS 1 telemetry with every seq, the retained status and its last will,
a platform session kept while it was away (clean_session false), and a broker restart in the middle of the
flow with no seq missing. Differences between brokers are in docs/PLATFORMS.md ("Brokers").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiomqtt
import orjson
import pytest

from drivers.modbus.simulator import ModbusSim
from tests.broker import BROKERS, Broker, make_broker
from tests.daemon import Daemon
from tests.faults.conftest import (
    GATEWAY,
    CounterUnit,
    TimedChecker,
    audit,
    fault_config,
    figures,
    store_high,
    tail,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=BROKERS)
def any_broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    b = make_broker(request.param)
    try:
        yield b
    finally:
        b.cleanup()


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


async def _retained_status(port: int, timeout: float = 10) -> dict[str, object]:
    """What a platform subscribing now gets on {p}/status: the retained message (a fresh clean session)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="status-probe", clean_session=True) as c:
        await c.subscribe(f"fieldgate/{GATEWAY}/status", qos=1)
        async with asyncio.timeout(timeout):
            async for msg in c.messages:
                assert msg.retain, "a late subscriber gets the status as a retained message"
                doc: dict[str, object] = orjson.loads(msg.payload if isinstance(msg.payload, bytes) else b"")
                return doc
    raise AssertionError("no retained status")


async def test_qos1_every_seq_status_retained_and_will(
    tmp_path, any_broker: Broker, counters: ModbusSim
) -> None:
    cfg = fault_config(tmp_path, any_broker.port, counters.port, poll="100ms")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(any_broker.port) as checker:
        daemon.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 100, what="readings")
            await checker.wait_for(lambda: len(checker.data.health) >= 1, what="health")
            assert (await _retained_status(any_broker.port))["state"] == "online"
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high)
        finally:
            assert daemon.alive(), tail(daemon)
            daemon.kill9()  # no goodbye: the broker must publish the will
        await checker.wait_for(
            lambda: bool(checker.data.status) and checker.data.status[-1]["state"] == "offline",
            timeout=30,  # the will is sent once the broker sees the socket closed
            what="the last will (offline)",
        )
    assert (await _retained_status(any_broker.port))["state"] == "offline", "the will is retained"
    a = audit(checker, high)
    figures(a)
    assert a.gaps == [] and a.conflicting == [] and a.counter_disorder == 0, a


async def test_platform_session_kept_while_away(tmp_path, any_broker: Broker, counters: ModbusSim) -> None:
    """clean_session false: what is published while the platform is away is delivered when it comes back."""
    cfg = fault_config(tmp_path, any_broker.port, counters.port, poll="100ms")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        checker = TimedChecker(any_broker.port)
        async with checker:
            await checker.wait_for(lambda: len(checker.data.readings) >= 20, what="first readings")
        away_from = store_high(tmp_path / "buffer.db")
        await asyncio.sleep(1.5)  # the platform is away; the gateway keeps publishing
        async with checker:  # same client id, clean_session false: the broker kept the session
            high = store_high(tmp_path / "buffer.db")
            assert high > away_from + 5
            await checker.wait_for_seqs(high)
    finally:
        assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    assert a.gaps == [] and a.conflicting == [], a


async def test_broker_restart_mid_flow_no_seq_missing(
    tmp_path, any_broker: Broker, counters: ModbusSim
) -> None:
    cfg = fault_config(tmp_path, any_broker.port, counters.port, poll="100ms")
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    async with TimedChecker(any_broker.port) as checker:
        daemon.start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 50, what="first readings")
            any_broker.stop()
            await asyncio.sleep(2)
            any_broker.start()
            before = store_high(tmp_path / "buffer.db")
            await checker.wait_for(
                lambda: any(r["seq"] > before for r in checker.data.readings), timeout=30, what="data again"
            )
            high = store_high(tmp_path / "buffer.db")
            await checker.wait_for_seqs(high)
            assert (await _retained_status(any_broker.port))["state"] == "online"
        finally:
            assert daemon.stop() == 0, tail(daemon)
    a = audit(checker, high)
    figures(a)
    assert a.gaps == [] and a.conflicting == [] and a.counter_reused == [] and a.counter_disorder == 0, a
    assert a.backlog > 0, "the outage's readings came back marked as backlog"


# -- where NATS differs (docs/PLATFORMS.md, "Brokers"): checked so the page stays true for the pinned server


@pytest.fixture
def nats() -> Iterator[Broker]:
    b = make_broker("nats")
    try:
        yield b
    finally:
        b.cleanup()


async def test_nats_closes_the_connection_on_a_topic_with_a_space(nats: Broker) -> None:
    async with aiomqtt.Client("127.0.0.1", nats.port, identifier="space", timeout=3) as c:
        with pytest.raises(aiomqtt.MqttError):
            await c.publish("fieldgate/a b/telemetry", b"x", qos=1)
    assert "character not supported for MQTT topics" in nats.log_text()  # type: ignore[attr-defined]


async def test_nats_refuses_mqtt_5(nats: Broker) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            "127.0.0.1", nats.port, identifier="v5", protocol=aiomqtt.ProtocolVersion.V5, timeout=3
        ):
            pass


async def test_nats_carries_dots_in_topics(nats: Broker) -> None:
    """Sparkplug's namespace `spBv1.0` has a dot, which NATS maps to '//' in its subjects: MQTT clients see
    the topic unchanged."""
    async with aiomqtt.Client("127.0.0.1", nats.port, identifier="sub", clean_session=True) as s:
        await s.subscribe("spBv1.0/#", qos=1)
        async with aiomqtt.Client("127.0.0.1", nats.port, identifier="pub") as p:
            await p.publish("spBv1.0/fieldgate/NDATA/gw-1", b"x", qos=1)
        async with asyncio.timeout(5):
            async for msg in s.messages:
                assert str(msg.topic) == "spBv1.0/fieldgate/NDATA/gw-1"
                break
