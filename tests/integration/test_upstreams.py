"""Two upstreams at once (MQTT fieldgate + NGSI-LD over HTTP), one down: the other keeps receiving, and the
down one catches up with nothing lost once it is back. The NGSI-LD side is a strict local stub (no NGSI-LD
broker is packaged on PyPI or Debian: Orion-LD and Scorpio are not)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from agent.config.models import GatewayConfig, MqttConfig, NgsiLdConfig
from agent.pipeline.reading import Reading
from agent.pipeline.store import AsyncStore, Store, StoredRow
from agent.upstream.formats.ngsild import EntityMapper
from agent.upstream.mqtt import Uplink
from agent.upstream.ngsild_http import UPSERT_PATH, NgsiLdUplink
from tests import sdm_schemas as sdm
from tests.broker import Broker, free_port

TS = 1_700_000_000_000


class NgsiLdStub:
    """Accepts `POST /ngsi-ld/v1/entityOperations/upsert` only when the request is exactly right."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.entities: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readline()).decode()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers["content-length"]))
            status = self._check(request, headers, body)
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    def _check(self, request: str, headers: dict[str, str], body: bytes) -> int:
        if request.split()[:2] != ["POST", UPSERT_PATH]:
            self.problems.append(f"request line {request!r}")
            return 404
        if headers.get("content-type") != "application/ld+json":
            self.problems.append(f"content type {headers.get('content-type')!r}")
            return 415
        doc = orjson.loads(body)
        ids = [e.get("id") for e in doc] if isinstance(doc, list) else []
        if not ids or len(set(ids)) != len(ids):
            self.problems.append("not an array of entities with distinct ids")
            return 400
        for entity in doc:
            # The official schema of the entity's model (tests/data/sdm), its $refs resolved offline.
            problems = (
                sdm.errors(entity) if entity.get("type") in sdm.MODELS else [f"type {entity.get('type')!r}"]
            )
            if problems:
                self.problems.extend(problems)
                return 400
            if not entity.get("@context"):
                self.problems.append("entity without @context")
                return 400
        self.entities.extend(doc)
        return 204


@contextlib.asynccontextmanager
async def platform(broker: Broker, uplink: Uplink, received: set[int]) -> AsyncIterator[None]:
    """A platform subscribed to the gateway's telemetry, adding every seq it receives to `received`, once
    `uplink` is connected."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="platform") as client:
        await client.subscribe("fieldgate/gw-test/telemetry", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                received.update(r["seq"] for r in orjson.loads(bytes(message.payload))["readings"])  # type: ignore[arg-type]

        collector = asyncio.create_task(collect())
        try:
            async with asyncio.timeout(10):
                while not uplink.connected:
                    await asyncio.sleep(0.02)
            yield
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    s = AsyncStore(Store(tmp_path / "buffer.db", 16 * 1024 * 1024))
    await s.open()
    await s.set_lanes(["mqtt", "city"])
    yield s
    await s.close()


async def test_one_upstream_down_does_not_hold_back_the_other_and_catches_up(
    broker: Broker, store: AsyncStore
) -> None:
    port = free_port()
    gateway = GatewayConfig(id="gw-test", location={"latitude": 45.75, "longitude": 4.83})  # type: ignore[arg-type]
    ngsi = NgsiLdConfig(url=f"http://127.0.0.1:{port}", batch_max=20, batch_interval="50ms")  # type: ignore[arg-type]
    city = NgsiLdUplink("city", ngsi, EntityMapper(ngsi, gateway), store, "city")
    mqtt = Uplink(MqttConfig(url=broker.url, batch_interval="50ms"), "gw-test", store, "test", lane="mqtt")  # type: ignore[arg-type]
    stub = NgsiLdStub(port)
    received: set[int] = set()
    runs = [asyncio.create_task(mqtt.run()), asyncio.create_task(city.run())]
    try:
        async with platform(broker, mqtt, received):
            stored: list[int] = []
            for i in range(10):
                rows = await store.append(
                    [Reading("tic", "PAPP", TS + i * 10 + k, i * 10 + k, "VA") for k in range(10)]
                )
                stored += [r.seq for r in rows]
                mqtt.offer(rows)
                city.offer(rows)
            async with asyncio.timeout(10):
                while received != set(stored):
                    await asyncio.sleep(0.02)
            stats = await store.stats()
            assert stats.lanes == {"mqtt": 0, "city": 100} and stats.pending == 100  # kept for the city
            assert not city.connected and city.last_error

            await stub.start()  # the context broker is back
            async with asyncio.timeout(15):
                while (await store.stats()).pending:
                    await asyncio.sleep(0.05)
    finally:
        await mqtt.stop()
        await city.stop()
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await stub.aclose()
    assert stub.problems == []
    assert sorted(e["numValue"]["value"] for e in stub.entities) == list(range(100))  # nothing lost
    assert city.connected and city.sent == 100 and mqtt.sent == 100
    first = stub.entities[0]
    assert first["id"] == "urn:ngsi-ld:DeviceMeasurement:gw-test:tic:PAPP"
    assert first["numValue"]["unitCode"] == "D46" and first["location"]["value"]["coordinates"] == [
        4.83,
        45.75,
    ]


class CountedPins(AsyncStore):
    """An AsyncStore that counts the pins the uplink waits for (round trips of the store thread)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.awaited_pins = 0

    async def pin(self, rows: Sequence[StoredRow], lane: str | None = None) -> list[StoredRow]:
        self.awaited_pins += 1
        return await super().pin(rows, lane)


async def test_live_batches_of_the_last_append_are_pinned_without_a_round_trip(
    broker: Broker, tmp_path: Path
) -> None:
    """The live lane's usual message (the rows the last commit stored) is pinned by `pin_fresh`: no pin is
    waited for, every row arrives, and the acks release every pin. Rows of an older commit wait for `pin`."""
    store = CountedPins(Store(tmp_path / "buffer.db", 16 * 1024 * 1024))
    await store.open()
    mqtt = Uplink(MqttConfig(url=broker.url, batch_interval="50ms"), "gw-test", store, "test")  # type: ignore[arg-type]
    received: set[int] = set()
    run = asyncio.create_task(mqtt.run())
    try:
        async with platform(broker, mqtt, received):
            stored: list[int] = []
            for i in range(5):
                rows = await store.append(
                    [Reading("tic", "PAPP", TS + i * 10 + k, k, "VA") for k in range(10)]
                )
                stored += [r.seq for r in rows]
                mqtt.offer(rows)
                async with asyncio.timeout(10):
                    while not received.issuperset(stored):
                        await asyncio.sleep(0.01)
            assert store.awaited_pins == 0
            older = await store.append([Reading("tic", "PAPP", TS + 100, 1, "VA")])
            newer = await store.append([Reading("tic", "PAPP", TS + 101, 2, "VA")])
            mqtt.offer(older + newer)  # one batch spanning two commits: the first may have been evicted since
            stored += [older[0].seq, newer[0].seq]
            async with asyncio.timeout(10):
                while received != set(stored) or (await store.stats()).pending:
                    await asyncio.sleep(0.02)
            assert store.awaited_pins == 1
            assert (await store.stats()).pinned == 0  # every pin released by its ack
    finally:
        await mqtt.stop()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await store.close()
