"""Sparkplug B against Mosquitto: births before data, NDEATH as the will, rebirth, history, DCMD to Modbus.

The platform side decodes with tests/sparkplug_wire.py (raw protobuf wire parsing, field numbers from
agent/formats/sparkplug_b.proto), not with the gateway's generated module.
"""

from __future__ import annotations

import asyncio
import itertools
import json
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
        self.qos: list[tuple[str, int, bool]] = []  # (message type, QoS as delivered, retain)
        self.event = asyncio.Event()

    async def run(self) -> None:
        async for message in self.client.messages:
            self.seen.append((message.topic.value, wire.payload(bytes(message.payload))))  # type: ignore[arg-type]
            self.qos.append((message.topic.value.split("/")[2], message.qos, message.retain))
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
            # Births at QoS 0, data at QoS 1 (the PUBACK acknowledges the buffer), nothing retained.
            assert {(k, q, r) for k, q, r in platform.qos} == {
                ("NBIRTH", 0, False),
                ("DBIRTH", 0, False),
                ("DDATA", 1, False),
            }
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
            assert platform.qos[n + after.index("NDEATH")] == (
                "NDEATH",
                1,
                False,
            )  # the will: QoS 1, not retained
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


class ReconnectingHost:
    """A host application with a persistent session that survives its broker's restarts (records in order)."""

    def __init__(self, port: int, group: str, rebirth: str | None = None) -> None:
        self.port = port
        self.group = group
        self.rebirth = rebirth  # an edge node to ask for a rebirth on every (re)connection, as hosts do
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReconnectingHost:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="host-app-daemon", clean_session=False, keepalive=5
                ) as client:
                    await client.subscribe(f"spBv1.0/{self.group}/#", qos=1)
                    self.subscribed.set()
                    if self.rebirth is not None:
                        # Births are QoS 0 (Sparkplug 3.0): a host that was away when they passed asks again.
                        cmd = _pb.Payload()
                        m = cmd.metrics.add()
                        m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", DT.Boolean, True
                        await client.publish(
                            f"spBv1.0/{self.group}/NCMD/{self.rebirth}", cmd.SerializeToString(), qos=1
                        )
                    async for message in client.messages:
                        if message.topic.value.split("/")[2] in ("NCMD", "DCMD"):
                            continue  # its own commands
                        self.seen.append((message.topic.value, wire.payload(bytes(message.payload))))  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def kinds(self, start: int = 0) -> list[str]:
        return [t.split("/")[2] for t, _ in self.seen[start:]]

    async def wait_for(self, predicate: Any, what: str, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)


def bd_seq_of(payload: dict[str, Any]) -> int:
    value: int = next(m["value"] for m in payload["metrics"] if m.get("name") == "bdSeq")
    return value


@pytest.mark.timeout(120)
async def test_sparkplug_through_the_daemon_birth_history_after_outage_and_death_on_kill(
    tmp_path: Path,
    pbroker: Broker,
    sim: ModbusSim,  # noqa: F811
) -> None:
    from tests.daemon import Daemon, write_config

    sim.units[UNIT].set("holding", 0, [30])
    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-spb",
        broker_port=pbroker.port,
        db=tmp_path / "buffer.db",
        mqtt_extra="    format: sparkplug\n    sparkplug: {group_id: city}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=f"  lamp-1: {{bus: lan, unit_id: {UNIT}, profile: streetlamp-controller, poll: 300ms}}\n",
    )
    async with ReconnectingHost(pbroker.port, "city", rebirth="gw-spb") as host:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await host.wait_for(lambda: "DDATA" in host.kinds(), "the first DDATA")
            kinds = host.kinds()
            assert kinds[0] == "NBIRTH" and kinds.index("DBIRTH") < kinds.index("DDATA")
            assert host.seen[0][0] == "spBv1.0/city/NBIRTH/gw-spb"
            dbirth = host.seen[kinds.index("DBIRTH")]
            assert dbirth[0] == "spBv1.0/city/DBIRTH/gw-spb/lamp-1"
            aliases = {m["name"]: m["alias"] for m in dbirth[1]["metrics"]}
            assert {"dim", "power", "on", "voltage"} <= set(aliases)
            assert dbirth[1]["metrics"][list(aliases).index("dim")]["properties"]["engUnit"] == "%"
            first_bd = bd_seq_of(host.seen[0][1])
            live = [m for t, p in host.seen if "/DDATA/" in t for m in p["metrics"]]
            # Readings taken after the connection came up are live; the first poll may have been stored just
            # before it (then it is rightly replayed as historical).
            born_at = host.seen[0][1]["timestamp"]
            assert live and not any(m.get("is_historical") for m in live if m["timestamp"] >= born_at)
            assert all("name" not in m and m["alias"] in aliases.values() for m in live)

            # The broker goes away; the gateway keeps polling into its buffer. Back: a new session (NBIRTH,
            # next bdSeq), then the outage's readings replayed with is_historical, in time order.
            pbroker.stop()
            await asyncio.sleep(3.0)
            n = len(host.seen)
            pbroker.start()
            await host.wait_for(
                lambda: any(
                    m.get("is_historical") for t, p in host.seen[n:] if "/DDATA/" in t for m in p["metrics"]
                ),
                "historical DDATA after the outage",
                timeout=45,  # generous: a loaded CI machine restarts the broker and reconnects slowly
            )
            await host.wait_for(lambda: "NBIRTH" in host.kinds(n), "an NBIRTH after the outage")
            after = host.kinds(n)
            # The QoS 0 births of the new session may have passed while the host was still reconnecting: its
            # rebirth request then brings them (same bdSeq); either way NBIRTH comes before its DBIRTH.
            born = after.index("NBIRTH")
            assert "DBIRTH" in after[born:] and after.index("DBIRTH", born) > born
            reborn = host.seen[n + born][1]
            # bdSeq moves with every CONNECT attempt (each carries a new will), so only "later" is certain
            assert reborn["seq"] == 0 and bd_seq_of(reborn) > first_bd
            history = [
                m for t, p in host.seen[n:] if "/DDATA/" in t for m in p["metrics"] if m.get("is_historical")
            ]
            dims = [m for m in history if m["alias"] == aliases["dim"]]
            assert len(dims) >= 5 and all(m["value"] == 30 for m in dims)  # ~10 poll cycles of the outage
            stamps = [m["timestamp"] for m in dims]
            assert stamps == sorted(stamps)

            # kill -9: no clean NDEATH from the gateway, the broker publishes the will (same bdSeq).
            n = len(host.seen)
            daemon.kill9()
            await host.wait_for(lambda: "NDEATH" in host.kinds(n), "NDEATH from the will")
            death_topic, death = host.seen[n + host.kinds(n).index("NDEATH")]
            assert death_topic == "spBv1.0/city/NDEATH/gw-spb"
            assert bd_seq_of(death) == bd_seq_of(reborn)  # the will of the session that NBIRTH opened
        finally:
            if daemon.alive():
                daemon.stop()


# One Modbus point of every type of docs/MODBUS.md: (name, point config, value stored in the simulator,
# the Sparkplug datatype a host must see, the value it must decode).
EVERY_TYPE = [
    ("coil", "{table: coil, address: 0}", None, "Boolean", True),
    ("i16", "{address: 0, type: int16}", ("int16", -1234), "Int16", -1234),
    ("u16", "{address: 1, type: uint16}", ("uint16", 65535), "UInt16", 65535),
    ("i32", "{address: 2, type: int32}", ("int32", -70000), "Int32", -70000),
    ("u32", "{address: 4, type: uint32, order: CDAB}", ("uint32", 4_000_000_000), "UInt32", 4_000_000_000),
    ("i64", "{address: 6, type: int64}", ("int64", -(2**40)), "Int64", -(2**40)),
    ("u64", "{address: 10, type: uint64}", None, "UInt64", 2**64 - 1),  # all-FF: "not available"
    ("f32", "{address: 14, type: float32}", ("float32", 0.5), "Float", 0.5),
    ("f64", "{address: 16, type: float64}", ("float64", -1e100), "Double", -1e100),
    ("txt", "{address: 20, type: string, length: 4}", None, "String", "FG-42"),
    ("bit", "{address: 24, bit: 3}", None, "Boolean", True),
    ("scaled", "{address: 25, type: int16, scale: 0.1}", ("int16", -5), "Double", -0.5),
]


@pytest.mark.timeout(120)
async def test_every_modbus_point_type_reaches_a_host_with_its_datatype_and_bd_seq_survives_a_restart(
    tmp_path: Path,
    broker: Broker,
    sim: ModbusSim,  # noqa: F811
) -> None:
    from tests.daemon import Daemon, write_config

    unit = sim.units[UNIT]
    unit.set("coil", 0, [True])
    for name, _, typed, _, _ in EVERY_TYPE:
        if typed is not None:
            address = int(next(p for n, p, *_ in EVERY_TYPE if n == name).split("address: ")[1].split(",")[0])
            unit.set_value("holding", address, typed[1], typed[0], "CDAB" if name == "u32" else "ABCD")
    unit.set("holding", 10, [0xFFFF] * 4)
    unit.set("holding", 20, [ord("F") << 8 | ord("G"), ord("-") << 8 | ord("4"), ord("2") << 8, 0])
    unit.set("holding", 24, [1 << 3])
    points = "\n".join(f"      {n}: {p}" for n, p, *_ in EVERY_TYPE)
    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-types",
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        mqtt_extra="    format: sparkplug\n    sparkplug: {group_id: plant}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=f"  meter:\n    bus: lan\n    unit_id: {UNIT}\n    poll: 300ms\n    points:\n{points}\n",
    )
    async with ReconnectingHost(broker.port, "plant") as host:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await host.wait_for(lambda: host.kinds().count("DDATA") >= 3, "three DDATA")
            kinds = host.kinds()
            assert kinds.count("DBIRTH") == 1  # born once with the declared types: no rebirth for a datatype
            born = {m["name"]: m for m in host.seen[kinds.index("DBIRTH")][1]["metrics"]}
            assert {n: born[n]["type"] for n, *_ in EVERY_TYPE} == {n: dt for n, _, _, dt, _ in EVERY_TYPE}
            by_alias = {m["alias"]: m["name"] for m in born.values()}
            decoded: dict[str, set[Any]] = {}
            for t, p in host.seen:
                if "/DDATA/" in t:
                    for m in p["metrics"]:
                        assert m["type"] == born[by_alias[m["alias"]]]["type"]  # never another datatype
                        decoded.setdefault(by_alias[m["alias"]], set()).add(m["value"])
            assert decoded == {n: {v} for n, _, _, _, v in EVERY_TYPE}
            first_bd = bd_seq_of(host.seen[0][1])
            assert next(m for m in host.seen[0][1]["metrics"] if m["name"] == "bdSeq")["type"] == "Int64"
            assert daemon.stop() == 0

            n = len(host.seen)
            daemon = Daemon(cfg, tmp_path / "daemon.log").start()
            await host.wait_for(lambda: "NBIRTH" in host.kinds(n), "the NBIRTH after the restart")
            reborn = host.seen[n + host.kinds(n).index("NBIRTH")][1]
            assert bd_seq_of(reborn) == first_bd + 1  # the next CONNECT: kept beside the buffer
        finally:
            if daemon.alive():
                daemon.stop()


class PrimaryHost:
    """A fake Sparkplug 3.0 primary host application: publishes its retained STATE like a real one."""

    def __init__(self, client: aiomqtt.Client, host_id: str) -> None:
        self.client = client
        self.topic = f"spBv1.0/STATE/{host_id}"

    async def state(self, online: bool, timestamp: int) -> None:
        body = json.dumps({"online": online, "timestamp": timestamp})
        await self.client.publish(self.topic, body, qos=1, retain=True)


async def test_primary_host_offline_holds_births_and_data_online_rebirths_then_replays_with_nothing_lost(
    broker: Broker, store: AsyncStore
) -> None:
    def cat() -> dict[str, list[PointInfo]]:
        return {"s": [PointInfo("co2", "uint16", "ppm")]}

    fmt = SparkplugFormat("city", "gw-ph", cat, None, "test", primary_host_id="scada")
    uplink = Uplink(MqttConfig(url=broker.url, batch_interval="50ms"), "gw-ph", store, "test", fmt=fmt)
    stored: list[int] = []

    async def store_some(start: int, n: int, quality: str | None = None) -> None:
        rows = await store.append(
            [Reading("s", "co2", TS + start + i, start + i, "ppm", quality) for i in range(n)]
        )
        stored.extend(r.seq for r in rows)
        uplink.offer(rows)

    async with (
        aiomqtt.Client(broker.host, broker.port, identifier="scada") as client,
        aiomqtt.Client(broker.host, broker.port, identifier="watcher") as watcher,
    ):
        host = PrimaryHost(client, "scada")
        await host.state(False, 1000)  # retained: what the gateway finds when it connects
        await watcher.subscribe("spBv1.0/city/#", qos=1)
        platform = Platform(watcher)
        listener = asyncio.create_task(platform.run())
        run = asyncio.create_task(uplink.run())
        try:
            await store_some(0, 3)
            # Connected, the offline STATE taken: held. Nothing published, the link is not "lost".
            async with asyncio.timeout(10):
                while not (uplink.connected and fmt._state_ts == 1000):
                    await asyncio.sleep(0.02)
            await store_some(3, 2)
            assert uplink.connected and (uplink.last_error or "").startswith("held")
            assert (await store.stats()).pending == 5

            # Online: NBIRTH, DBIRTH, then every held reading (historical, seq order), none missing.
            await host.state(True, 2000)
            await platform.wait_for(
                lambda: sum(len(p["metrics"]) for t, p in platform.seen if "/DDATA/" in t) >= 5
            )
            kinds = platform.kinds()
            assert kinds[:2] == ["NBIRTH", "DBIRTH"] and set(kinds[2:]) == {"DDATA"}
            bd_seq = bd_seq_of(platform.seen[0][1])
            values = [m["value"] for t, p in platform.seen if "/DDATA/" in t for m in p["metrics"]]
            assert values == [0, 1, 2, 3, 4]
            assert [p["seq"] for _, p in platform.seen] == list(range(len(platform.seen)))
            async with asyncio.timeout(10):
                while (await store.stats()).pending:
                    await asyncio.sleep(0.05)

            # A stale offline STATE (older than the online one) changes nothing.
            n = len(platform.seen)
            await host.state(False, 1500)
            await store_some(5, 1, "bad")
            await platform.wait_for(lambda: "DDATA" in platform.kinds()[n:])
            bad = next(m for t, p in platform.seen[n:] if "/DDATA/" in t for m in p["metrics"])
            assert bad["value"] == 5 and bad["properties"] == {"Quality": 0, "fieldgate quality": "bad"}
            assert "NDEATH" not in platform.kinds()[n:]

            # The host goes offline: NDEATH (this session's bdSeq), a new connection that holds.
            n = len(platform.seen)
            connections = uplink.connections
            await host.state(False, 3000)
            await platform.wait_for(lambda: "NDEATH" in platform.kinds()[n:])
            death = platform.seen[n + platform.kinds()[n:].index("NDEATH")][1]
            assert bd_seq_of(death) == bd_seq
            async with asyncio.timeout(10):
                while not (uplink.connections > connections and uplink.connected):
                    await asyncio.sleep(0.02)
            await store_some(6, 3, "uncertain")
            assert (await store.stats()).pending == 3
            assert platform.kinds()[n:] == ["NDEATH"]  # held: no birth, no data

            # Back online: a new NBIRTH (the new CONNECT's bdSeq), DBIRTH, the held rows.
            await host.state(True, 4000)
            await platform.wait_for(
                lambda: sum(len(p["metrics"]) for t, p in platform.seen[n:] if "/DDATA/" in t) >= 3
            )
            after = platform.kinds()[n:]
            assert after[:3] == ["NDEATH", "NBIRTH", "DBIRTH"]
            assert bd_seq_of(platform.seen[n + 1][1]) == bd_seq + 1
            held = [m for t, p in platform.seen[n:] if "/DDATA/" in t for m in p["metrics"]]
            assert [
                (m["value"], m["properties"]["fieldgate quality"], m.get("is_historical")) for m in held
            ] == [
                (6, "uncertain", True),
                (7, "uncertain", True),
                (8, "uncertain", True),
            ]
            async with asyncio.timeout(10):
                while (await store.stats()).pending:
                    await asyncio.sleep(0.05)
            delivered = [m["value"] for t, p in platform.seen if "/DDATA/" in t for m in p["metrics"]]
            assert sorted(set(delivered)) == list(range(9))  # every stored reading reached the host
            assert len(stored) == 9
        finally:
            await uplink.stop()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


@pytest.mark.timeout(120)
async def test_a_device_that_stops_answering_gets_a_ddeath_then_a_dbirth_when_it_answers_again(
    tmp_path: Path,
    broker: Broker,
    sim: ModbusSim,  # noqa: F811
) -> None:
    from tests.daemon import Daemon, write_config

    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-dd",
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        mqtt_extra="    format: sparkplug\n    sparkplug: {group_id: city}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 200ms}}",
        devices=f"  lamp-1: {{bus: lan, unit_id: {UNIT}, profile: streetlamp-controller, poll: 300ms}}\n",
    )
    async with ReconnectingHost(broker.port, "city") as host:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await host.wait_for(lambda: "DDATA" in host.kinds(), "the first DDATA")
            n = len(host.seen)
            sim.units[UNIT].dead = True
            await host.wait_for(lambda: "DDEATH" in host.kinds(n), "DDEATH of the silent device")
            topic, death = host.seen[n + host.kinds(n).index("DDEATH")]
            assert topic == "spBv1.0/city/DDEATH/gw-dd/lamp-1" and "seq" in death
            n = len(host.seen)
            sim.units[UNIT].dead = False
            await host.wait_for(lambda: "DDATA" in host.kinds(n), "data again")
            after = host.kinds(n)
            assert after.index("DBIRTH") < after.index("DDATA")  # born again before its data
            seqs = [p["seq"] for _, p in host.seen if "seq" in p]
            assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(seqs))  # no gap, one session
        finally:
            if daemon.alive():
                daemon.stop()


@pytest.mark.timeout(120)
async def test_primary_host_id_through_the_daemon_holds_until_the_host_is_online(
    tmp_path: Path,
    broker: Broker,
    sim: ModbusSim,  # noqa: F811
) -> None:
    from tests.daemon import Daemon, write_config

    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-ph",
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        mqtt_extra="    format: sparkplug\n    sparkplug: {group_id: city, primary_host_id: scada}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=f"  lamp-1: {{bus: lan, unit_id: {UNIT}, profile: streetlamp-controller, poll: 300ms}}\n",
    )
    async with (
        aiomqtt.Client(broker.host, broker.port, identifier="scada") as client,
        ReconnectingHost(broker.port, "city") as host,
    ):
        scada = PrimaryHost(client, "scada")
        await scada.state(False, 1)
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            # Held: polls go on into the buffer (the daemon's log says so), nothing is published.
            async with asyncio.timeout(30):
                while (
                    "held: Sparkplug primary host scada offline" not in (tmp_path / "daemon.log").read_text()
                ):
                    await asyncio.sleep(0.1)
                    if not daemon.alive():
                        raise AssertionError((tmp_path / "daemon.log").read_text()[-2000:])
            await asyncio.sleep(1.0)  # a few poll cycles while held
            assert host.seen == []
            await scada.state(True, 2)
            await host.wait_for(
                lambda: any(
                    m.get("is_historical") for t, p in host.seen if "/DDATA/" in t for m in p["metrics"]
                ),
                "the held readings",
            )
            kinds = host.kinds()
            assert kinds[:2] == ["NBIRTH", "DBIRTH"]
        finally:
            if daemon.alive():
                daemon.stop()
