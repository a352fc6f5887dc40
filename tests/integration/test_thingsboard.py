"""ThingsBoard gateway API against Mosquitto: connect, telemetry with ts, RPC write to Modbus and its reply."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from agent.commands import CommandProcessor
from agent.config import MqttConfig
from agent.formats import PointInfo
from agent.reading import Reading
from agent.store import AsyncStore, Store
from agent.uplink import Uplink
from tests.broker import Broker
from tests.integration.test_commands_modbus import UNIT, proc, sim  # noqa: F401 (fixtures)
from tests.modbus_sim import ModbusSim


async def test_thingsboard_telemetry_and_rpc(
    broker: Broker,
    proc: CommandProcessor,  # noqa: F811
    sim: ModbusSim,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = AsyncStore(Store(tmp_path / "buffer.db", 16 * 1024 * 1024))
    await store.open()
    rows = await store.append(
        [
            Reading("lamp-1", "power", 1483228800000, 42.5, "W"),
            Reading("lamp-1", "dim", 1483228800000, 40, "%"),
        ]
    )
    cfg = MqttConfig(url=broker.url, format="thingsboard", username="ACCESS_TOKEN")
    uplink = Uplink(
        cfg,
        "gw-test",
        store,
        "test",
        next_seq=rows[-1].seq + 1,
        catalog=lambda: {"lamp-1": [PointInfo("dim", "uint16", "%", True)]},
        execute=proc.execute,
    )
    seen: list[tuple[str, Any]] = []
    run: asyncio.Task[None] | None = None
    try:
        async with aiomqtt.Client(broker.host, broker.port, identifier="thingsboard") as tb:
            await tb.subscribe("v1/gateway/#", qos=1)
            # started once subscribed: the connect message would otherwise race the subscription
            run = asyncio.create_task(uplink.run())

            async def until(predicate: Any) -> None:
                async with asyncio.timeout(10):
                    async for message in tb.messages:
                        seen.append((message.topic.value, orjson.loads(bytes(message.payload))))  # type: ignore[arg-type]
                        if predicate():
                            return

            await until(lambda: any(t == "v1/gateway/telemetry" for t, _ in seen))
            assert seen[0] == ("v1/gateway/connect", {"device": "lamp-1"})
            # Client-side attributes (docs: `v1/gateway/attributes` {"Device A": {"key": value}}).
            assert seen[1] == (
                "v1/gateway/attributes",
                {"lamp-1": {"points": {"dim": {"type": "uint16", "unit": "%", "writable": True}}}},
            )
            assert (
                "v1/gateway/telemetry",
                {"lamp-1": [{"ts": 1483228800000, "values": {"power": 42.5, "dim": 40}}]},
            ) in seen
            rpc = {"device": "lamp-1", "data": {"id": 1, "method": "set_dim", "params": 70}}
            await tb.publish("v1/gateway/rpc", orjson.dumps(rpc), qos=1)
            await until(
                lambda: any(d.get("id") == 1 and "data" in d and "method" not in d["data"] for _, d in seen)
            )
            reply = next(d for t, d in seen if t == "v1/gateway/rpc" and "method" not in d["data"])
            assert (
                reply["device"] == "lamp-1" and reply["data"]["ok"] is True and reply["data"]["value"] == 70
            )
            assert sim.units[UNIT].get("holding", 0) == [70]
            # An unknown method: answered with the error, nothing written.
            bad = {"device": "lamp-1", "data": {"id": 2, "method": "reboot", "params": {}}}
            await tb.publish("v1/gateway/rpc", orjson.dumps(bad), qos=1)
            await until(lambda: any(d.get("id") == 2 and "method" not in d.get("data", {}) for _, d in seen))
            reply = next(d for t, d in seen if t == "v1/gateway/rpc" and d.get("id") == 2)
            assert reply["device"] == "lamp-1" and reply["data"]["ok"] is False
            # A clean stop disconnects every device it connected.
            await uplink.stop()
            await until(lambda: any(t == "v1/gateway/disconnect" for t, _ in seen))
            assert ("v1/gateway/disconnect", {"device": "lamp-1"}) in seen
    finally:
        await uplink.stop()
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        assert (await store.stats()).pending == 0
        await store.close()


@pytest.mark.timeout(120)
async def test_thingsboard_rpc_through_the_daemon_reaches_the_simulator(
    broker: Broker,
    sim: ModbusSim,  # noqa: F811
    tmp_path: Path,
) -> None:
    from tests.daemon import Daemon, write_config

    sim.units[UNIT].set("holding", 0, [40])
    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-tb",
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        mqtt_extra="    format: thingsboard\n    username: GATEWAY_TOKEN",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=f"  lamp-1: {{bus: lan, unit_id: {UNIT}, profile: streetlamp-controller, poll: 300ms}}\n",
    )
    seen: list[tuple[str, Any]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="thingsboard") as tb:
        await tb.subscribe("v1/gateway/#", qos=1)

        async def until(predicate: Any) -> None:
            async with asyncio.timeout(20):
                async for message in tb.messages:
                    seen.append((message.topic.value, orjson.loads(bytes(message.payload))))  # type: ignore[arg-type]
                    if predicate():
                        return

        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:

            def entries() -> list[dict[str, Any]]:
                return [e for t, d in seen if t == "v1/gateway/telemetry" for e in d.get("lamp-1", [])]

            await until(lambda: any("dim" in e["values"] for e in entries()))
            assert seen[0] == ("v1/gateway/connect", {"device": "lamp-1"})
            assert all(isinstance(e["ts"], int) and e["values"] for e in entries())
            assert next(e["values"]["dim"] for e in entries() if "dim" in e["values"]) == 40

            rpc = {"device": "lamp-1", "data": {"id": 7, "method": "set_dim", "params": 55}}
            await tb.publish("v1/gateway/rpc", orjson.dumps(rpc), qos=1)
            await until(lambda: any(t == "v1/gateway/rpc" and "method" not in d["data"] for t, d in seen))
            reply = next(d for t, d in seen if t == "v1/gateway/rpc" and "method" not in d["data"])
            assert reply["device"] == "lamp-1" and reply["id"] == 7
            assert reply["data"]["ok"] is True and reply["data"]["value"] == 55
            assert sim.units[UNIT].get("holding", 0) == [55]
            # the read-back is in the next telemetry with the new value
            await until(lambda: any(e["values"].get("dim") == 55 for e in entries()))
            # out of range: refused by the commands path, the register is untouched
            bad = {"device": "lamp-1", "data": {"id": 8, "method": "set_dim", "params": 150}}
            await tb.publish("v1/gateway/rpc", orjson.dumps(bad), qos=1)
            await until(lambda: any(t == "v1/gateway/rpc" and d.get("id") == 8 for t, d in seen))
            refused = next(d for t, d in seen if t == "v1/gateway/rpc" and d.get("id") == 8)
            assert refused["data"]["ok"] is False
            assert sim.units[UNIT].get("holding", 0) == [55]
        finally:
            code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
