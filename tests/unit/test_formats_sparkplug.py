"""Sparkplug B 3.0 datatypes, bdSeq and quality, decoded with the third party's schema (tests/sparkplug_wire.py).

Every point type of docs/MODBUS.md fixes its metric's datatype at birth for the whole session; bdSeq is an
Int64 metric that goes on increasing across restarts (kept beside the buffer); a reading's quality reaches
the host as metric properties.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from agent import payloads
from agent.formats import PointInfo
from agent.formats.sparkplug import SparkplugFormat
from agent.reading import Reading
from agent.store import StoredRow
from tests import sparkplug_wire as wire

TS = 1_700_000_000_000

# (point type, a value of it, the datatype a host must see)
EVERY_TYPE: list[tuple[str, Any, str]] = [
    ("bool", True, "Boolean"),
    ("int16", -32768, "Int16"),
    ("uint16", 65535, "UInt16"),
    ("int32", -2_000_000_000, "Int32"),
    ("uint32", 4_294_967_295, "UInt32"),
    ("int64", -(2**63), "Int64"),
    ("uint64", 2**64 - 1, "UInt64"),  # all-FF registers: a meter's "not available"
    ("float32", 1.5, "Float"),
    ("float64", -2.25e300, "Double"),
    ("string", "SN-0042", "String"),
]


def rows(*readings: Reading, first_seq: int = 1) -> list[StoredRow]:
    return [
        StoredRow(first_seq + i, r.ts, payloads.reading_body(first_seq + i, r))
        for i, r in enumerate(readings)
    ]


def every_type_catalog() -> dict[str, list[PointInfo]]:
    return {
        "m": [PointInfo(t, t) for t, _, _ in EVERY_TYPE] + [PointInfo("scaled", "int16", "V", scaled=True)]
    }


def by_name(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in p["metrics"]}


def test_every_point_type_is_born_with_its_datatype_and_keeps_it() -> None:
    fmt = SparkplugFormat("g", "e", every_type_catalog)
    fmt.will()
    _, dbirth = fmt.birth()
    born = by_name(wire.payload(dbirth.payload))
    # Before any value: the declared type, never Double-then-Int64.
    assert {n: born[n]["type"] for n, _, _ in EVERY_TYPE} == {n: dt for n, _, dt in EVERY_TYPE}
    assert born["scaled"]["type"] == "Double"  # scale/offset: engineering values
    aliases = {n: m["alias"] for n, m in born.items()}

    out = fmt.encode(rows(*(Reading("m", n, TS, v) for n, v, _ in EVERY_TYPE)), False)
    assert [m.topic.split("/")[2] for m in out] == ["DDATA"]  # no new birth: nothing changed type
    data = {m["alias"]: m for m in wire.payload(out[0].payload)["metrics"]}
    for name, value, datatype in EVERY_TYPE:
        got = data[aliases[name]]
        assert (got["type"], got["value"]) == (datatype, value), name
    assert data[aliases["uint64"]]["value"] == 18446744073709551615  # not -1 (it was sent as Int64)
    assert data[aliases["int64"]]["field"] == "long_value" and data[aliases["int16"]]["field"] == "int_value"


def test_a_value_the_datatype_cannot_carry_is_null_with_bad_quality_and_no_rebirth() -> None:
    fmt = SparkplugFormat("g", "e", every_type_catalog)
    fmt.will()
    fmt.birth()
    out = fmt.encode(
        rows(
            Reading("m", "uint16", TS, 70000),
            Reading("m", "int64", TS, 2**64 - 1),
            Reading("m", "bool", TS, 3),
        ),
        False,
    )
    assert [m.topic.split("/")[2] for m in out] == ["DDATA"]
    metrics = wire.payload(out[0].payload)["metrics"]
    assert [(m["type"], m.get("is_null"), m["properties"]["Quality"]) for m in metrics] == [
        ("UInt16", True, 0),
        ("Int64", True, 0),
        ("Boolean", True, 0),
    ]


def test_an_undeclared_integer_point_keeps_its_first_datatype() -> None:
    fmt = SparkplugFormat("g", "e")
    fmt.will()
    fmt.birth()
    first = fmt.encode(rows(Reading("d", "count", TS, 2**64 - 1)), False)
    assert [m.topic.split("/")[2] for m in first] == ["DBIRTH", "DDATA"]
    assert by_name(wire.payload(first[0].payload))["count"]["type"] == "UInt64"
    again = fmt.encode(rows(Reading("d", "count", TS + 1, 5), first_seq=2), False)
    assert [m.topic.split("/")[2] for m in again] == ["DDATA"]  # no datatype flip, no rebirth
    (m,) = wire.payload(again[0].payload)["metrics"]
    assert (m["type"], m["value"]) == ("UInt64", 5)


def test_quality_reaches_the_host_as_metric_properties() -> None:
    fmt = SparkplugFormat("g", "e", lambda: {"s": [PointInfo("co2", "uint16", "ppm")]})
    fmt.will()
    fmt.birth()
    out = fmt.encode(
        rows(
            Reading("s", "co2", TS, 410, "ppm", "uncertain"),
            Reading("s", "co2", TS + 1, 420, "ppm", "bad"),
            Reading("s", "co2", TS + 2, 430, "ppm"),
        ),
        True,
    )
    metrics = wire.payload(out[-1].payload)["metrics"]
    assert [m.get("properties") for m in metrics] == [
        {"fieldgate quality": "uncertain"},  # Sparkplug has no code for it: no 'Quality'
        {"Quality": 0, "fieldgate quality": "bad"},  # Int32 0 = BAD (Sparkplug 3.0 §6.4.7)
        None,  # good: no property (the specification's default)
    ]


def test_bd_seq_is_int64_and_increases_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db.mqtt.bdseq"

    def session() -> tuple[int, int]:
        fmt = SparkplugFormat("g", "e", bd_seq_file=path)
        will = fmt.will()
        assert will is not None
        death = wire.payload(will.payload)["metrics"][0]
        birth = by_name(wire.payload(fmt.birth()[0].payload))["bdSeq"]
        assert death["type"] == birth["type"] == "Int64" and death["value"] == birth["value"]
        return death["value"], fmt.bd_seq

    assert session() == (0, 0)
    assert session() == (1, 1)  # a restart: the next CONNECT, not 0 again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("255\n")
    assert session()[0] == 0  # 255 wraps to 0
    path.write_text("garbage")
    assert session()[0] == 0  # unreadable: starts again, never stops the uplink


def test_bd_seq_file_that_cannot_be_written_does_not_stop_the_session(tmp_path: Path) -> None:
    fmt = SparkplugFormat("g", "e", bd_seq_file=tmp_path / "missing-dir" / "x.bdseq")
    assert fmt.will() is not None and fmt.will() is not None and fmt.bd_seq == 1


def _descriptor_of(module: str) -> descriptor_pb2.FileDescriptorProto:
    """A generated module's FileDescriptorProto, imported alone in a child (no shared descriptor pool)."""
    raw = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, {module} as m; sys.stdout.buffer.write(m.DESCRIPTOR.serialized_pb)",
        ],
        check=True,
        capture_output=True,
    ).stdout
    fd = descriptor_pb2.FileDescriptorProto()
    fd.ParseFromString(raw)
    return fd


def test_the_gateway_schema_is_the_third_partys() -> None:
    ours = _descriptor_of("agent.formats.sparkplug_b_pb2")
    theirs = _descriptor_of(wire.THIRD_PARTY)
    assert ours.package == theirs.package == "org.eclipse.tahu.protobuf"
    assert list(ours.message_type) == list(theirs.message_type)
    assert list(ours.enum_type) == list(theirs.enum_type)


async def test_state_messages_of_the_primary_host() -> None:
    fmt = SparkplugFormat("g", "e", primary_host_id="scada")
    topics = [t for t, _ in fmt.inbound()]
    assert topics[0] == "spBv1.0/STATE/scada"  # subscribed (and so received) before anything else
    assert fmt.holding
    state = fmt._on_state
    for garbage in (b"not json", b"[]", b'{"online": "yes", "timestamp": 5}', b'{"online": true}'):
        assert await state("spBv1.0/STATE/scada", garbage) == [] and fmt.holding
    await state("spBv1.0/STATE/other", b'{"online": true, "timestamp": 5}')
    assert fmt.holding  # another host's STATE
    await state("spBv1.0/STATE/scada", b'{"online": true, "timestamp": 5}')
    assert not fmt.holding and fmt.host_changed.is_set()
    await state("spBv1.0/STATE/scada", b'{"online": false, "timestamp": 4}')
    assert not fmt.holding  # older than the last one: a late death certificate, ignored
    await state("spBv1.0/STATE/scada", b'{"online": false, "timestamp": 5}')
    assert fmt.holding  # same timestamp counts ("greater than or equal")
    # A rebirth request while held publishes nothing.
    from agent.formats.sparkplug import DT, _pb

    cmd = _pb.Payload()
    m = cmd.metrics.add()
    m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", DT.Boolean, True
    assert await fmt._on_ncmd("spBv1.0/g/NCMD/e", cmd.SerializeToString()) == []


def test_sparkplug_3_0_edge_node_payload_statements() -> None:
    """The payload statements of docs/PLATFORMS.md's conformance table, over one session of 300 messages."""
    fmt = SparkplugFormat("g", "e", every_type_catalog, version="1.0")
    will = fmt.will()
    assert will is not None and will.qos == 1 and not will.retain
    death = wire.payload(will.payload)
    assert "seq" not in death and [m["name"] for m in death["metrics"]] == ["bdSeq"]  # ndeath-payload, -seq
    nbirth_msg, dbirth_msg = fmt.birth()
    assert (nbirth_msg.qos, nbirth_msg.retain, dbirth_msg.qos, dbirth_msg.retain) == (0, False, 0, False)
    assert nbirth_msg.topic == "spBv1.0/g/NBIRTH/e" and dbirth_msg.topic == "spBv1.0/g/DBIRTH/e/m"
    nbirth, dbirth = wire.payload(nbirth_msg.payload), wire.payload(dbirth_msg.payload)
    assert nbirth["seq"] == 0 and dbirth["seq"] == 1
    rebirth = by_name(nbirth)["Node Control/Rebirth"]
    assert rebirth["type"] == "Boolean" and rebirth["value"] is False and "alias" not in rebirth
    now = fmt._payload(seq=False).timestamp
    for p in (nbirth, dbirth):
        assert abs(p["timestamp"] - now) < 60_000  # ms since the Unix epoch (UTC)
        for m in p["metrics"]:
            assert "name" in m and "datatype" in m and "timestamp" in m  # birth: name, datatype, timestamp
            assert m.get("is_null") is not True or "value" not in m  # null: no value
    aliases = [m["alias"] for m in dbirth["metrics"]]
    assert all(isinstance(a, int) for a in aliases) and len(set(aliases)) == len(aliases)  # unique
    # 300 more messages: seq goes on by one, 255 wraps to 0.
    seqs = [nbirth["seq"], dbirth["seq"]]
    for i in range(300):
        (msg,) = fmt.encode(rows(Reading("m", "uint16", TS + i, i), first_seq=i + 1), False)
        assert msg.qos == 1 and not msg.retain and msg.topic == "spBv1.0/g/DDATA/e/m"
        data = wire.payload(msg.payload)
        seqs.append(data["seq"])
        (m,) = data["metrics"]
        assert "name" not in m and "alias" in m and m["timestamp"] == TS + i  # alias only, with timestamp
    assert seqs == [n % 256 for n in range(302)]
    (msg,) = fmt.encode(rows(Reading("m", "uint16", TS, 1, quality="bad")), False)
    (m,) = wire.payload(msg.payload)["metrics"]
    payload = wire.payload_class()()
    payload.ParseFromString(msg.payload)
    props = payload.metrics[0].properties
    assert len(props.keys) == len(props.values)
    assert props.values[0].type == 3 and props.values[0].WhichOneof("value") == "int_value"  # Quality: Int32


def test_sparkplug_ids_refuse_the_reserved_characters() -> None:
    import pydantic

    from agent.config import SparkplugConfig

    for bad in ("a/b", "a+b", "a#b", "a b"):
        for key in ("group_id", "edge_node_id", "primary_host_id"):
            with pytest.raises(pydantic.ValidationError):
                SparkplugConfig(**{key: bad})
    assert SparkplugConfig(group_id="Éclairage-Lyon", primary_host_id="scada.1").group_id == "Éclairage-Lyon"


def test_a_failing_device_gets_a_ddeath_and_a_new_dbirth_when_it_answers_again() -> None:
    fmt = SparkplugFormat("g", "e", lambda: {"m": [PointInfo("uint16", "uint16")]})
    fmt.will()
    fmt.birth()  # seq 0 NBIRTH, 1 DBIRTH
    out = fmt.encode(
        rows(
            Reading("m", "uint16", TS, 1),
            Reading("m", "_state", TS + 1, "failing"),
            Reading("m", "_error", TS + 1, "timeout"),
        ),
        False,
    )
    assert [(m.topic, m.qos, m.retain) for m in out] == [
        ("spBv1.0/g/DDATA/e/m", 1, False),
        ("spBv1.0/g/DDEATH/e/m", 0, False),  # Sparkplug 3.0: DDEATH QoS 0, seq numbered
    ]
    death = wire.payload(out[1].payload)
    assert death["seq"] == 3 and death["metrics"] == [] and "timestamp" in death
    assert sorted(s for m in out for s in m.seqs) == [1, 2, 3]  # every row in one message
    # Back: DBIRTH (its own seq) before the values, which need no other birth.
    out = fmt.encode(
        rows(Reading("m", "_state", TS + 5, "ok"), Reading("m", "uint16", TS + 5, 2), first_seq=4), False
    )
    assert [m.topic.split("/")[2] for m in out] == ["DBIRTH", "DDATA"]
    assert [wire.payload(m.payload)["seq"] for m in out] == [4, 5]
    # Data of a dead device (a batch without the ok event) is born again first.
    fmt.encode(rows(Reading("m", "_state", TS + 6, "failing"), first_seq=6), False)
    out = fmt.encode(rows(Reading("m", "uint16", TS + 7, 3), first_seq=7), False)
    assert [m.topic.split("/")[2] for m in out] == ["DBIRTH", "DDATA"]


def test_replayed_device_events_are_past_states_not_sent() -> None:
    fmt = SparkplugFormat("g", "e", lambda: {"m": [PointInfo("uint16", "uint16")]})
    fmt.will()
    fmt.birth()
    out = fmt.encode(
        rows(
            Reading("m", "_state", TS, "failing"),
            Reading("m", "_error", TS, "x"),
            Reading("m", "uint16", TS, 4),
        ),
        True,
    )
    assert [m.topic.split("/")[2] for m in out] == ["DDATA"] and sorted(out[0].seqs) == [1, 2, 3]
    (m,) = wire.payload(out[0].payload)["metrics"]
    assert m["value"] == 4 and m["is_historical"] is True
