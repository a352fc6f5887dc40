"""Fuzzing the parsers of what platforms send the gateway: Sparkplug STATE/NCMD/DCMD, ThingsBoard RPC.

Property: any bytes are handled without an exception escaping, and what is not a valid command writes
nothing. Fixed example budget, no example database (nothing is committed besides the test).
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.formats import Message, PointInfo
from agent.formats.sparkplug import SparkplugFormat
from agent.formats.thingsboard import ThingsBoardFormat
from tests import sparkplug_wire as wire

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes, JSON-ish documents, and real Sparkplug payloads with random metrics (built with the third party's
# schema): most inputs must get past the first parsing step to reach the interesting code.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def sparkplug_payloads(draw: st.DrawFn) -> bytes:
    payload = wire.payload_class()()
    for _ in range(draw(st.integers(0, 3))):
        m = payload.metrics.add()
        if draw(st.booleans()):
            m.name = draw(st.sampled_from(["Node Control/Rebirth", "dim", "on", "", "x/y"]))
        if draw(st.booleans()):
            m.alias = draw(st.integers(0, 2**64 - 1))
        m.datatype = draw(st.integers(0, 40))
        field = draw(
            st.sampled_from(
                [
                    "int_value",
                    "long_value",
                    "float_value",
                    "double_value",
                    "boolean_value",
                    "string_value",
                    "is_null",
                    None,
                ]
            )
        )
        if field == "int_value":
            m.int_value = draw(st.integers(0, 2**32 - 1))
        elif field == "long_value":
            m.long_value = draw(st.integers(0, 2**64 - 1))
        elif field in ("float_value", "double_value"):
            setattr(m, field, draw(st.floats(allow_nan=True, allow_infinity=True, width=32)))
        elif field == "boolean_value":
            m.boolean_value = draw(st.booleans())
        elif field == "string_value":
            m.string_value = draw(st.text(max_size=10))
        elif field == "is_null":
            m.is_null = True
    raw: bytes = payload.SerializeToString()
    return raw


def run(coro: Any) -> list[Message]:
    result: list[Message] = asyncio.run(coro)
    return result


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    async def __call__(self, device: str, point: str, value: Any, *, source: str) -> dict[str, Any]:
        self.calls.append((device, point, value))
        return {"ok": False, "error": "refused by the test"}


def catalog() -> dict[str, list[PointInfo]]:
    return {"lamp-1": [PointInfo("dim", "uint16", "%", True), PointInfo("on", "bool", None, True)]}


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: __import__("json").dumps(v).encode()))
def test_state_messages_never_raise_and_only_a_3_0_payload_moves_the_host(raw: bytes) -> None:
    fmt = SparkplugFormat("g", "e", primary_host_id="scada")
    assert run(fmt._on_state("spBv1.0/STATE/scada", raw)) == []
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    valid = (
        isinstance(doc, dict)
        and isinstance(doc.get("online"), bool)
        and isinstance(doc.get("timestamp"), int)
        and not isinstance(doc.get("timestamp"), bool)
    )
    assert fmt.holding is not (valid and doc["online"] is True)


@FUZZ
@given(st.binary(max_size=200) | sparkplug_payloads())
def test_ncmd_and_dcmd_never_raise(raw: bytes) -> None:
    execute = Recorder()
    fmt = SparkplugFormat("g", "e", catalog, execute)
    fmt.will()
    fmt.birth()
    answers = run(fmt._on_ncmd("spBv1.0/g/NCMD/e", raw))
    assert all(isinstance(a, Message) for a in answers)
    answers = run(fmt._on_dcmd("spBv1.0/g/DCMD/e/lamp-1", raw))
    assert answers == []  # every write is refused by the recorder: nothing to report back
    assert all(device == "lamp-1" for device, _, _ in execute.calls)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: __import__("json").dumps(v).encode()))
def test_thingsboard_rpc_never_raises(raw: bytes) -> None:
    execute = Recorder()
    fmt = ThingsBoardFormat(None, execute)
    answers = run(fmt._on_rpc("v1/gateway/rpc", raw))
    assert len(answers) <= 1 and all(a.topic == "v1/gateway/rpc" for a in answers)
