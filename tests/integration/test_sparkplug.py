"""Sparkplug B against Mosquitto: births before data, NDEATH as the will, rebirth, history, DCMD to Modbus.

The platform side decodes with tests/sparkplug_wire.py (raw protobuf wire parsing, field numbers from
tests/data/sparkplug_b.proto), not with the gateway's generated module.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from agent.commands import CommandProcessor
from agent.config import MqttConfig
from agent.formats import PointInfo
from agent.formats.sparkplug import DT, SparkplugFormat, _pb
from agent.reading import Reading
from agent.store import AsyncStore, Store
from agent.uplink import Uplink
from tests import sparkplug_wire as wire
from tests.broker import Broker
from tests.integration.test_commands_modbus import PROFILE, UNIT, proc, sim  # noqa: F401 (fixtures)
from tests.modbus_sim import ModbusSim

TS = 1_700_000_000_000


def catalog() -> dict[str, list[PointInfo]]:
    points = yaml.safe_load(PROFILE.read_text())["points"]
    return {
        "lamp-1": [
            PointInfo(
                n,
                p.get("type", "bool" if p["table"] in ("coil", "discrete") else "uint16"),
                p.get("unit"),
                bool(p.get("writable")),
            )
            for n, p in points.items()
        ]
    }


class Platform:
    """A host application: records every Sparkplug message in order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.event = asyncio.Event()

    async def run(self) -> None:
        async for message in self.client.messages:
            self.seen.append((message.topic.value, wire.payload(bytes(message.payload))))  # type: ignore[arg-type]
            self.event.set()

    async def wait_for(self, predicate: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.event.clear()
                await self.event.wait()

    def kinds(self) -> list[str]:
        return [t.split("/")[2] for t, _ in self.seen]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    s = AsyncStore(Store(tmp_path / "buffer.db", 16 * 1024 * 1024))
    await s.open()
    yield s
    await s.close()


async def test_sparkplug_session_rules_history_rebirth_death_and_writes(
    broker: Broker,
    store: AsyncStore,
    proc: CommandProcessor,  # noqa: F811
    sim: ModbusSim,  # noqa: F811
) -> None:
    backlog = await store.append([Reading("lamp-1", "power", TS + i, 10.0 + i, "W") for i in range(3)])
    fmt = SparkplugFormat("city", "gw-test", catalog, proc.execute, "test")
    uplink = Uplink(MqttConfig(url=broker.url, batch_interval="50ms"), "gw-test", store, "test", fmt=fmt,
                    next_seq=backlog[-1].seq + 1)  # fmt: skip
    async with aiomqtt.Client(broker.host, broker.port, identifier="host-app") as client:
        await client.subscribe("spBv1.0/city/#", qos=1)
        platform = Platform(client)
        listener = asyncio.create_task(platform.run())
        run = asyncio.create_task(uplink.run())
        try:
            # Birth before data; the replayed rows carry is_historical.
            await platform.wait_for(lambda: "DDATA" in platform.kinds())
            kinds = platform.kinds()
            assert kinds[0] == "NBIRTH" and kinds.index("DBIRTH") < kinds.index("DDATA")
            nbirth = platform.seen[0][1]
            bd_seq = next(m["value"] for m in nbirth["metrics"] if m.get("name") == "bdSeq")
            assert nbirth["seq"] == 0
            births = [p for t, p in platform.seen if "/DBIRTH/" in t]
            aliases = {m["name"]: m["alias"] for m in births[-1]["metrics"]}
            assert {"dim", "power", "on"} <= set(aliases)
            history = [m for t, p in platform.seen if "/DDATA/" in t for m in p["metrics"]]
            assert [(m["alias"], m["value"], m["timestamp"], m.get("is_historical")) for m in history] == [
                (aliases["power"], 10.0 + i, TS + i, True) for i in range(3)
            ]
            # seq counts every message of the session from the NBIRTH, modulo 256
            assert [p["seq"] for _, p in platform.seen] == list(range(len(platform.seen)))

            # Live data: not historical.
            uplink.offer(await store.append([Reading("lamp-1", "power", TS + 10, 20.0, "W")]))
            await platform.wait_for(
                lambda: any(m.get("value") == 20.0 for _, p in platform.seen for m in p["metrics"])
            )
            live = next(m for _, p in platform.seen for m in p["metrics"] if m.get("value") == 20.0)
            assert "is_historical" not in live
            async with asyncio.timeout(5):
                while (await store.stats()).pending:
                    await asyncio.sleep(0.05)

            # Rebirth on NCMD, same bdSeq, seq back to 0.
            n = len(platform.seen)
            cmd = _pb.Payload()
            m = cmd.metrics.add()
            m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", DT.Boolean, True
            await client.publish("spBv1.0/city/NCMD/gw-test", cmd.SerializeToString(), qos=1)
            await platform.wait_for(lambda: "NBIRTH" in platform.kinds()[n:])
            again = platform.seen[n + platform.kinds()[n:].index("NBIRTH")][1]
            assert again["seq"] == 0
            assert next(x["value"] for x in again["metrics"] if x.get("name") == "bdSeq") == bd_seq

            # DCMD by alias -> the commands path -> the Modbus register; the read-back comes as DDATA.
            write = _pb.Payload()
            w = write.metrics.add()
            w.alias, w.datatype, w.double_value = aliases["dim"], DT.Double, 65.0
            n = len(platform.seen)
            await client.publish("spBv1.0/city/DCMD/gw-test/lamp-1", write.SerializeToString(), qos=1)
            await platform.wait_for(lambda: "DDATA" in platform.kinds()[n:])
            assert sim.units[UNIT].get("holding", 0) == [65]
            assert proc.recent(1)[0]["source"] == "sparkplug"

            # The link dies without a DISCONNECT: the broker publishes the will, NDEATH with the same bdSeq;
            # the next session is born with the next bdSeq.
            n = len(platform.seen)
            assert uplink._client is not None
            sock = uplink._client._client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            await platform.wait_for(lambda: "NBIRTH" in platform.kinds()[n:], timeout=15)
            after = platform.kinds()[n:]
            assert "NDEATH" in after and after.index("NDEATH") < after.index("NBIRTH")
            death = platform.seen[n + after.index("NDEATH")][1]
            assert death["metrics"][0]["name"] == "bdSeq" and death["metrics"][0]["value"] == bd_seq
            reborn = platform.seen[n + after.index("NBIRTH")][1]
            assert next(x["value"] for x in reborn["metrics"] if x.get("name") == "bdSeq") == bd_seq + 1
        finally:
            await uplink.stop()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await asyncio.sleep(0.2)  # a clean stop publishes NDEATH itself: let it arrive
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    assert platform.kinds()[-1] == "NDEATH"
