"""ThingsBoard gateway API against Mosquitto: connect, telemetry with ts, RPC write to Modbus and its reply."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from agent.commands import CommandProcessor
from agent.config import MqttConfig
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
        catalog=lambda: {"lamp-1": []},
        execute=proc.execute,
    )
    seen: list[tuple[str, Any]] = []
    run = asyncio.create_task(uplink.run())
    try:
        async with aiomqtt.Client(broker.host, broker.port, identifier="thingsboard") as tb:
            await tb.subscribe("v1/gateway/#", qos=1)

            async def until(predicate: Any) -> None:
                async with asyncio.timeout(10):
                    async for message in tb.messages:
                        seen.append((message.topic.value, orjson.loads(bytes(message.payload))))  # type: ignore[arg-type]
                        if predicate():
                            return

            await until(lambda: any(t == "v1/gateway/telemetry" for t, _ in seen))
            assert seen[0] == ("v1/gateway/connect", {"device": "lamp-1"})
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
    finally:
        await uplink.stop()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        assert (await store.stats()).pending == 0
        await store.close()
