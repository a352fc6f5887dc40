"""ThingsBoard gateway MQTT API payloads, row by row of docs/PLATFORMS.md's conformance table."""

from __future__ import annotations

from typing import Any

import orjson

from agent import payloads
from agent.formats import PointInfo
from agent.formats.thingsboard import ThingsBoardFormat
from agent.reading import Reading
from agent.store import StoredRow

TS = 1483228800000


def rows(*readings: Reading) -> list[StoredRow]:
    return [StoredRow(i + 1, r.ts, payloads.reading_body(i + 1, r)) for i, r in enumerate(readings)]


def decoded(messages: list[Any]) -> list[tuple[str, Any]]:
    return [(m.topic, orjson.loads(m.payload)) for m in messages]


def test_connect_attributes_telemetry_and_disconnect_of_every_device() -> None:
    fmt = ThingsBoardFormat(lambda: {"A": [PointInfo("power", "float32", "W")], "B": []})
    assert decoded(fmt.birth()) == [
        ("v1/gateway/connect", {"device": "A"}),
        ("v1/gateway/connect", {"device": "B"}),
        (
            "v1/gateway/attributes",
            {"A": {"points": {"power": {"type": "float32", "unit": "W", "writable": False}}}},
        ),
    ]
    out = fmt.encode(
        rows(Reading("C", "x", TS, 1), Reading("C", "y", TS, "on"), Reading("C", "x", TS + 1, 2)), True
    )
    # A device first seen in data is connected before its telemetry; one entry per ts, values by key.
    assert decoded(out) == [
        ("v1/gateway/connect", {"device": "C"}),
        (
            "v1/gateway/telemetry",
            {"C": [{"ts": TS, "values": {"x": 1, "y": "on"}}, {"ts": TS + 1, "values": {"x": 2}}]},
        ),
    ]
    assert all(m.qos == 1 and not m.retain for m in out)
    assert decoded(fmt.goodbye()) == [("v1/gateway/disconnect", {"device": d}) for d in ("A", "B", "C")]
    assert fmt.will() is None  # the gateway API defines no will: ThingsBoard times the gateway out itself


async def test_rpc_reply_echoes_device_and_id() -> None:
    async def execute(device: str, point: str, value: Any, *, source: str) -> dict[str, Any]:
        return {"ok": True, "value": value}

    fmt = ThingsBoardFormat(None, execute)
    request = {"device": "Device A", "data": {"id": 42, "method": "set_dim", "params": 10}}
    (reply,) = await fmt._on_rpc("v1/gateway/rpc", orjson.dumps(request))
    assert reply.topic == "v1/gateway/rpc"
    assert orjson.loads(reply.payload) == {"device": "Device A", "id": 42, "data": {"ok": True, "value": 10}}
    for garbage in (b"{}", b'{"device": "A"}', b'{"device": "A", "data": 3}', b"\xff"):
        assert await fmt._on_rpc("v1/gateway/rpc", garbage) == []
