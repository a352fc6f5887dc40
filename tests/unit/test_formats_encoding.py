"""The upstream formats' encodings, without a broker: Sparkplug B, ThingsBoard, fieldgate JSON, NGSI-LD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import payloads
from agent.config import GatewayConfig, NgsiEntityConfig, NgsiLdConfig
from agent.formats import PointInfo
from agent.formats.fieldgate import FieldgateFormat
from agent.formats.ngsild import EntityMapper, iso
from agent.formats.sparkplug import DT, SparkplugFormat, _pb
from agent.formats.thingsboard import ThingsBoardFormat
from agent.reading import Reading
from agent.store import StoredRow
from tests import sdm_schemas as sdm
from tests import sparkplug_wire as wire
from tests.vectors import load_vectors

DATA = Path(__file__).resolve().parents[1] / "data"
TS = 1_700_000_000_000


def rows(*readings: Reading, first_seq: int = 1) -> list[StoredRow]:
    return [
        StoredRow(first_seq + i, r.ts, payloads.reading_body(first_seq + i, r))
        for i, r in enumerate(readings)
    ]


def test_fieldgate_format_is_spec_telemetry() -> None:
    fmt = FieldgateFormat(payloads.Topics("fieldgate", "gw-1"), "gw-1", "1.0", "none")
    (msg,) = fmt.encode(rows(Reading("m", "v", TS, 230.5, "V")), backlog=True)
    assert msg.topic == "fieldgate/gw-1/telemetry" and msg.seqs == (1,)
    doc = orjson.loads(msg.payload)
    assert doc == {
        "gateway": "gw-1",
        "readings": [{"seq": 1, "device": "m", "point": "v", "ts": TS, "value": 230.5, "unit": "V"}],
        "backlog": True,
    }
    assert orjson.loads(fmt.birth()[0].payload)["state"] == "online"
    will = fmt.will()
    assert will is not None and will.retain and orjson.loads(will.payload)["state"] == "offline"


def catalog() -> dict[str, list[PointInfo]]:
    return {"lamp-1": [PointInfo("dim", "uint16", "%", True), PointInfo("on", "bool", None, True)]}


def test_sparkplug_birth_then_data_with_aliases_and_history() -> None:
    fmt = SparkplugFormat("city", "gw-1", catalog, version="1.0")
    will = fmt.will()
    assert will is not None and will.topic == "spBv1.0/city/NDEATH/gw-1"
    death = wire.payload(will.payload)
    assert "seq" not in death and death["metrics"] == [
        {
            "name": "bdSeq",
            "timestamp": death["timestamp"],
            "datatype": DT.Int64,
            "type": "Int64",
            "field": "long_value",
            "value": 0,
        }
    ]
    nbirth, dbirth = fmt.birth()
    assert nbirth.topic == "spBv1.0/city/NBIRTH/gw-1" and dbirth.topic == "spBv1.0/city/DBIRTH/gw-1/lamp-1"
    nb = wire.payload(nbirth.payload)
    assert nb["seq"] == 0
    names = {m["name"]: m for m in nb["metrics"]}
    assert names["bdSeq"]["value"] == 0 and names["Node Control/Rebirth"]["value"] is False
    db = wire.payload(dbirth.payload)
    assert db["seq"] == 1
    dim = next(m for m in db["metrics"] if m["name"] == "dim")
    assert (
        dim["type"] == "UInt16"  # the point's declared type, from the first birth on
        and dim["is_null"]
        and dim["properties"] == {"engUnit": "%", "writable": 1}
    )

    # A point not in the birth (an aggregate) makes the device born again, before its data.
    out = fmt.encode(
        rows(Reading("lamp-1", "dim", TS, 40, "%"), Reading("lamp-1", "power.mean", TS, 12.5, "W")), True
    )
    assert [m.topic.split("/")[2] for m in out] == ["DBIRTH", "DDATA"]
    assert out[0].seqs == () and out[1].seqs == (1, 2)
    rebirth, data = wire.payload(out[0].payload), wire.payload(out[1].payload)
    assert (rebirth["seq"], data["seq"]) == (2, 3)
    aliases = {m["name"]: m["alias"] for m in rebirth["metrics"]}
    assert {"dim", "on", "power.mean"} <= set(aliases)
    assert [(m["alias"], m["value"], m["timestamp"], m.get("is_historical")) for m in data["metrics"]] == [
        (aliases["dim"], 40, TS, True),
        (aliases["power.mean"], 12.5, TS, True),
    ]
    assert all("name" not in m for m in data["metrics"])  # data by alias only
    live = wire.payload(
        fmt.encode(rows(Reading("lamp-1", "on", TS + 1, True), first_seq=3), False)[0].payload
    )
    assert live["metrics"][0]["value"] is True and "is_historical" not in live["metrics"][0]


def test_sparkplug_values_keep_their_type() -> None:
    fmt = SparkplugFormat("g", "e")
    fmt.will()
    fmt.birth()
    big = 2**62 + 1
    out = fmt.encode(rows(Reading("d", "n", TS, -big), Reading("d", "s", TS, "failing")), False)
    data = wire.payload(out[-1].payload)
    assert [m["value"] for m in data["metrics"]] == [-big, "failing"]
    assert [m["datatype"] for m in data["metrics"]] == [DT.Int64, DT.String]


async def test_sparkplug_rebirth_and_dcmd() -> None:
    calls: list[tuple[str, str, Any, str]] = []

    async def execute(device: str, point: str, value: Any, *, source: str) -> dict[str, Any]:
        calls.append((device, point, value, source))
        return {"ok": True, "value": value}

    fmt = SparkplugFormat("g", "e", catalog, execute)
    fmt.will()
    fmt.birth()
    cmd = _pb.Payload()
    m = cmd.metrics.add()
    m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", DT.Boolean, True
    answers = await fmt._on_ncmd("spBv1.0/g/NCMD/e", cmd.SerializeToString())
    assert [a.topic for a in answers] == ["spBv1.0/g/NBIRTH/e", "spBv1.0/g/DBIRTH/e/lamp-1"]
    assert wire.payload(answers[0].payload)["seq"] == 0
    write = _pb.Payload()
    w = write.metrics.add()
    w.alias = fmt.devices["lamp-1"]["dim"].alias
    w.datatype, w.double_value = DT.Double, 55.0
    answers = await fmt._on_dcmd("spBv1.0/g/DCMD/e/lamp-1", write.SerializeToString())
    assert calls == [("lamp-1", "dim", 55, "sparkplug")] and isinstance(calls[0][2], int)
    assert answers[-1].topic == "spBv1.0/g/DDATA/e/lamp-1"
    assert await fmt._on_dcmd("spBv1.0/g/DCMD/e/lamp-1", b"\xff\xff garbage") == []


async def test_thingsboard_shapes_and_rpc() -> None:
    calls: list[tuple[str, str, Any]] = []

    async def execute(device: str, point: str, value: Any, *, source: str) -> dict[str, Any]:
        calls.append((device, point, value))
        return {"ok": True, "value": value}

    fmt = ThingsBoardFormat(lambda: {"Device A": []}, execute)
    assert [(m.topic, orjson.loads(m.payload)) for m in fmt.birth()] == [
        ("v1/gateway/connect", {"device": "Device A"})
    ]
    out = fmt.encode(
        rows(
            Reading("Device A", "temperature", 1483228800000, 42),
            Reading("Device A", "humidity", 1483228800000, 73),
            Reading("Device B", "power", 1483228801000, 5.5, "W"),
        ),
        backlog=True,
    )
    assert [(m.topic, orjson.loads(m.payload)) for m in out] == [
        ("v1/gateway/connect", {"device": "Device B"}),
        (
            "v1/gateway/telemetry",
            {
                "Device A": [{"ts": 1483228800000, "values": {"temperature": 42, "humidity": 73}}],
                "Device B": [{"ts": 1483228801000, "values": {"power": 5.5}}],
            },
        ),
    ]
    assert out[-1].seqs == (1, 2, 3)
    rpc = {
        "device": "Device A",
        "data": {"id": 7, "method": "write", "params": {"point": "dim", "value": 30}},
    }
    (reply,) = await fmt._on_rpc("v1/gateway/rpc", orjson.dumps(rpc))
    assert reply.topic == "v1/gateway/rpc"
    assert orjson.loads(reply.payload) == {"device": "Device A", "id": 7, "data": {"ok": True, "value": 30}}
    (reply,) = await fmt._on_rpc(
        "v1/gateway/rpc", orjson.dumps({**rpc, "data": {"id": 8, "method": "set_on", "params": True}})
    )
    assert calls == [("Device A", "dim", 30), ("Device A", "on", True)]
    assert (
        await fmt._on_rpc(
            "v1/gateway/rpc", orjson.dumps({"device": "Device A", "id": 7, "data": {"ok": True}})
        )
        == []
    )
    assert await fmt._on_rpc("v1/gateway/rpc", b"not json") == []
    (reply,) = await fmt._on_rpc(
        "v1/gateway/rpc", orjson.dumps({**rpc, "data": {"id": 9, "method": "reboot"}})
    )
    assert orjson.loads(reply.payload)["data"]["ok"] is False and len(calls) == 2


GATEWAY = GatewayConfig(id="gw-lyon-0042", location={"latitude": 45.7578, "longitude": 4.8320})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "readings", "type_"),
    [
        (
            ("modbus", "eastron-sdm630"),
            [("voltage_l1", 230.1, "V"), ("voltage_l2", 229.0, "V"), ("import_active_energy", 1234.5, "kWh")],
            "ThreePhaseAcMeasurement",
        ),
        (
            ("modbus", "streetlamp-controller"),
            [("dim", 40, "%"), ("power", 35.5, "W"), ("lamp_failure", True, None)],
            "Streetlight",
        ),
        (("sds011", None), [("pm2_5", 3.1, "µg/m³"), ("pm10", 7.2, "µg/m³")], "AirQualityObserved"),
        (
            ("mbus", None),
            [("volume", 54.321, "m³"), ("fabrication_no", "11490378", None)],
            "WaterConsumptionObserved",
        ),
        (("tic", None), [("PAPP", 1200, "VA"), ("PTEC", "TH..", None)], "DeviceMeasurement"),
    ],
)
def test_ngsild_entities_validate_against_the_smart_data_models(
    kind: tuple[str, str | None], readings: list[tuple[str, Any, str | None]], type_: str
) -> None:
    mapper = EntityMapper(NgsiLdConfig(url="http://127.0.0.1:1026"), GATEWAY, lambda: {"dev": kind})
    stored = rows(*(Reading("dev", p, TS, v, u) for p, v, u in readings))
    requests = mapper.requests(stored)
    entities = [e for body, _ in requests for e in body]
    assert sorted(s for _, seqs in requests for s in seqs) == [r.seq for r in stored]  # each row once
    assert entities and all(e["type"] == type_ for e in entities)
    for e in entities:
        assert sdm.errors(e) == []  # the official schema, key-values form, formats checked
        assert set(e) - {"@context"} <= sdm.declared(type_)  # only the model's own attribute names
        assert e["id"].startswith(f"urn:ngsi-ld:{type_}:gw-lyon-0042:dev")
        assert e["location"]["value"] == {"type": "Point", "coordinates": [4.8320, 45.7578]}
        assert e["@context"]
    first = entities[0]
    if type_ == "ThreePhaseAcMeasurement":
        assert first["phaseVoltage"]["value"] == {"L1": 230.1, "L2": 229.0}
        assert first["phaseVoltage"]["unitCode"] == "VLT" and first["phaseVoltage"]["observedAt"] == iso(TS)
        assert first["totalActiveEnergyImport"]["unitCode"] == "KWH"
    if type_ == "Streetlight":
        assert first["illuminanceLevel"]["value"] == 0.4 and first["status"]["value"] == "defectiveLamp"
    if type_ == "AirQualityObserved":
        assert first["pm25"] == {"type": "Property", "value": 3.1, "observedAt": iso(TS), "unitCode": "GQ"}
    if type_ == "WaterConsumptionObserved":
        assert first["waterConsumption"]["value"] == 54321  # the model's integer reading, in litres
        assert first["waterConsumption"]["unitCode"] == "LTR" and "fabrication_no" not in first


def test_ngsild_one_entity_per_request_in_time_order_and_required_attributes_kept() -> None:
    cfg = NgsiLdConfig(
        url="http://127.0.0.1:1026",
        devices={
            "cab": NgsiEntityConfig(
                type="StreetlightControlCabinet",
                static={
                    "refStreetlightGroup": {
                        "type": "Relationship",
                        "object": ["urn:ngsi-ld:StreetlightGroup:g1"],  # the model: an array of groups
                    }
                },
                attributes={"p": "totalActivePower"},
            )
        },
    )
    mapper = EntityMapper(cfg, GATEWAY)
    requests = mapper.requests(
        rows(Reading("cab", "p", TS, 1.0, "kW"), Reading("cab", "p", TS + 1000, 2.0, "kW"))
    )
    assert [[e["totalActivePower"]["value"] for e in body] for body, _ in requests] == [[1.0], [2.0]]
    for body, _ in requests:
        assert sdm.errors(body[0]) == []
        assert body[0]["workingMode"]["value"] == "automatic"
    assert iso(TS) == "2023-11-14T22:13:20.000Z"


SDM_VECTORS = "fiware_smart_data_models.json"


OFFICIAL_EXAMPLE_ERRORS = {
    # Upstream's own example disagrees with upstream's own schema (AirQualityObserved 0.1.4, commit f0150e5):
    # kept here so that a fix upstream, or a change in our key-values conversion, shows.
    "AirQualityObserved": [
        "dateObserved: '2016-03-15T11:00:00' is not a 'date-time'",  # no time zone (RFC 3339 wants one)
        "tsp: 73.3 is not of type 'integer'",
        "windDirection: 186 is greater than the maximum of 180",
    ],
}


@pytest.mark.parametrize("index", range(len(load_vectors(SDM_VECTORS)["official_examples"])))
def test_the_official_normalized_examples_pass_the_official_schemas(index: int) -> None:
    """Checks the normalized -> key-values conversion of tests/sdm_schemas.py on the models' own examples."""
    vector = load_vectors(SDM_VECTORS)["official_examples"][index]
    example = vector["official_normalized_example"]
    assert example["type"] == vector["entity_type"]
    assert sdm.errors(example) == OFFICIAL_EXAMPLE_ERRORS.get(vector["entity_type"], [])
    for name in vector["required_attributes"]:
        assert name in example, f"{vector['id']}: the official example lacks required {name!r}"
    assert set(vector["required_attributes"]) <= set(sdm.schema(vector["entity_type"])["required"])


@pytest.mark.parametrize("index", range(len(load_vectors(SDM_VECTORS)["minimal_valid_entities_built_by_us"])))
def test_the_official_schemas_accept_the_minimal_entities_and_refuse_them_broken(index: int) -> None:
    entity = load_vectors(SDM_VECTORS)["minimal_valid_entities_built_by_us"][index]
    assert sdm.errors(entity) == []
    for name in sdm.schema(entity["type"])["required"]:  # each required attribute is really enforced
        if name in ("id", "type"):
            continue
        broken = {k: v for k, v in entity.items() if k != name}
        assert any(name in e for e in sdm.errors(broken))
