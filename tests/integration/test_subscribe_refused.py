"""A subscription the broker refuses (SUBACK 0x80) is asked again during the session, which keeps publishing.

Found by bench/bench_fleet.py at N = 200 on the NATS cluster: a node that cannot create the JetStream
consumer behind a QoS 1 subscription (its cluster electing leaders, or the stream's consumer limit reached)
answers the SUBSCRIBE with 0x80. The gateway took that SUBACK as granted and heard no config push for the
rest of the session (the rollout saw it silent). Here a single NATS node whose `$MQTT_msgs` stream allows
only a few consumers refuses the gateway's two subscriptions while another client holds the slots; once
that client leaves, the gateway's next attempt is granted and a pushed config arrives on the same session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.daemon import Checker, Daemon, fieldgate_cli, write_config
from tests.natsbroker import NatsNode

pytestmark = pytest.mark.timeout(120)

GW = "gw-sub"
# With this limit the node's $MQTT_msgs takes four subscriptions: the checker's, and three held by a blocker.
CONSUMERS = 5
METER = (
    "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 200ms\n"
    "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n"
)
LAMP = "  lamp:\n    bus: lan\n    unit_id: 2\n    poll: 200ms\n    points:\n      on: {table: coil, address: 0}\n"


@pytest.fixture
def node() -> Iterator[NatsNode]:
    n = NatsNode(max_consumers=CONSUMERS).start()
    try:
        n.wait_ready()
        yield n
    finally:
        n.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(kind="energy-meter"), 2: SimUnit(kind="lamp-controller")})
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def config_text(tmp: Path, node: NatsNode, sim: ModbusSim, devices: str) -> str:
    scratch = tmp / "scratch.yaml"
    write_config(
        scratch,
        gateway=GW,
        broker_port=node.port,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=devices,
        extra="remote_config: {enabled: true, rollback_after: 5s}\n",
    )
    text = scratch.read_text()
    scratch.unlink()
    return text


async def test_refused_subscription_is_asked_again_and_the_session_keeps_publishing(
    tmp_path: Path, node: NatsNode, sim: ModbusSim
) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(config_text(tmp_path, node, sim, METER))
    async with Checker(node.port, GW) as checker:
        blocker = aiomqtt.Client("127.0.0.1", node.port, identifier="blocker")
        async with blocker:
            for i in range(3):
                (code,) = await blocker.subscribe(f"elsewhere/{i}", qos=1)
                assert not code.is_failure, f"the node refused the blocker's subscription {i}: {code}"
            daemon = Daemon(cfg, tmp_path / "daemon.log").start()
            try:
                await checker.wait_for(
                    lambda: "refused the subscription to fieldgate/gw-sub/config/set" in daemon.log_text(),
                    what="the refusal logged",
                )
                # Refused, the session goes on: readings keep arriving.
                before = len(checker.data.readings)
                await checker.wait_for(
                    lambda: len(checker.data.readings) >= before + 5, what="readings go on"
                )
            except BaseException:
                daemon.stop()
                raise
        try:
            # The blocker has left (clean session: its consumers are gone); the next attempt is granted.
            await checker.wait_for(
                lambda: "every subscription granted" in daemon.log_text(), 60, "the subscriptions asked again"
            )
            new = config_text(tmp_path, node, sim, METER + LAMP)
            async with aiomqtt.Client("127.0.0.1", node.port, identifier="platform") as client:
                doc = {"id": "after-refusal", "config": new, "gateway": GW, "serial": 1}
                await client.publish(f"fieldgate/{GW}/config/set", json.dumps(doc).encode(), qos=1)
            await checker.wait_for(
                lambda: any(
                    t.endswith("/config/state") and json.loads(p).get("id") == "after-refusal"
                    for t, p in checker.data.other
                ),
                what="the push applied",
            )
            state = [json.loads(p) for t, p in checker.data.other if t.endswith("/config/state")][-1]
            assert state["ok"] is True, state
            assert cfg.read_text() == new
            # All on the session that was refused: the refusal did not cost a reconnection.
            assert daemon.log_text().count("connected to mqtt://") == 1, daemon.log_text()[-3000:]
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]


async def test_fleet_tools_ask_again_for_a_refused_subscription_and_report_one_refused_for_good(
    node: NatsNode,
) -> None:
    """`fleet push|status` listen to the gateways' retained state: a refused subscription was taken as
    granted, and the rollout of bench_fleet at N = 200 waited on a canary it could not hear."""
    link = ["--broker", node.url, "--listen", "1s"]
    async with aiomqtt.Client("127.0.0.1", node.port, identifier="a-gateway") as gw:
        await gw.publish("fieldgate/gw-x/status", b'{"state": "online", "ts": 1}', qos=1, retain=True)
    blocker = aiomqtt.Client("127.0.0.1", node.port, identifier="blocker")
    async with blocker:
        for i in range(CONSUMERS - 1):
            (code,) = await blocker.subscribe(f"elsewhere/{i}", qos=1)
            assert not code.is_failure, f"the node refused the blocker's subscription {i}: {code}"
        # Refused five times (1 + 2 + 4 + 8 s apart): exit 1, the broker and the subscription named.
        res = await fieldgate_cli("fleet", "status", *link, timeout=90)
        assert res.code == 1, res.out + res.err
        assert "broker refused the subscription to fieldgate/+/" in res.err and " 5 times " in res.err, (
            res.err
        )

        # Refused first, then the slots are freed: the next attempt is granted and the status is read.
        refusals = node.log_text().count("Unable to add JetStream consumer")
        status = asyncio.create_task(fieldgate_cli("fleet", "status", *link, timeout=90))
        while node.log_text().count("Unable to add JetStream consumer") == refusals:
            assert not status.done(), (await status).err
            await asyncio.sleep(0.1)
    res = await status
    assert res.code == 0, res.out + res.err
    assert res.out.splitlines()[1].split()[:2] == ["gw-x", "online"], res.out
