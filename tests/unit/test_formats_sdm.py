"""Every built-in NGSI-LD mapping, fed every point its profile or driver produces, against the OFFICIAL Smart
Data Models schemas (tests/data/sdm, `$ref`s resolved offline by tests/sdm_schemas.py, formats checked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import payloads
from agent.config import GatewayConfig, NgsiEntityConfig, NgsiLdConfig
from agent.formats.ngsild import DEFAULTS, EntityMapper
from agent.reading import Reading
from agent.store import StoredRow
from drivers.pms5003 import codec as pms5003
from tests import sdm_schemas as sdm

REPO = Path(__file__).resolve().parents[2]
TS = 1_700_000_000_000
GATEWAY = GatewayConfig(id="gw-1", location={"latitude": 45.7578, "longitude": 4.8320})  # type: ignore[arg-type]


def profile_points(name: str) -> list[tuple[str, Any, str | None]]:
    points = yaml.safe_load((REPO / "config" / "profiles" / f"{name}.yaml").read_text())["points"]
    out = []
    for point, p in points.items():
        boolean = p.get("table") in ("coil", "discrete") or "bit" in p
        value: Any = (
            False if boolean else 0.95 if "power_factor" in point else 40 if p.get("unit") == "%" else 230.5
        )
        out.append((str(point), value, p.get("unit")))
    return out


# Every built-in mapping with every point its device produces (profiles: the vendored profile files).
SOURCES: dict[str, tuple[tuple[str, str | None], list[tuple[str, Any, str | None]]]] = {
    "eastron-sdm120": (("modbus", "eastron-sdm120"), profile_points("eastron-sdm120")),
    "eastron-sdm630": (("modbus", "eastron-sdm630"), profile_points("eastron-sdm630")),
    "streetlamp-controller": (("modbus", "streetlamp-controller"), profile_points("streetlamp-controller")),
    "senseair-s8": (("modbus", "senseair-s8"), profile_points("senseair-s8")),
    "sds011": (("sds011", None), [("pm2_5", 3.1, "µg/m³"), ("pm10", 7.2, "µg/m³")]),
    "pms5003": (("pms5003", None), [(n, 4, u) for n, u in pms5003.FIELDS]),
    "mhz19": (("mhz19", None), [("co2", 415, "ppm")]),
    "mbus": (("mbus", None), [("volume", 54.321, "m³"), ("fabrication_no", "11490378", None)]),
}


def rows(readings: list[Reading]) -> list[StoredRow]:
    return [StoredRow(i + 1, r.ts, payloads.reading_body(i + 1, r)) for i, r in enumerate(readings)]


def test_every_built_in_mapping_is_covered() -> None:
    assert set(SOURCES) == set(DEFAULTS)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_built_in_mapping_entities_pass_the_official_schema_with_the_models_own_names(name: str) -> None:
    kind, points = SOURCES[name]
    mapper = EntityMapper(NgsiLdConfig(url="http://127.0.0.1:1026"), GATEWAY, lambda: {"dev": kind})
    stored = rows([Reading("dev", p, TS, v, u) for p, v, u in points])
    requests = mapper.requests(stored)
    assert sorted(s for _, seqs in requests for s in seqs) == [r.seq for r in stored]  # each row once
    entities = [e for body, _ in requests for e in body]
    assert len(entities) == 1
    (entity,) = entities
    model = DEFAULTS[name].type
    assert entity["type"] == model
    assert sdm.errors(entity) == []
    assert set(entity) - {"@context"} <= sdm.declared(model), "a name that is not the model's own"
    mapped = DEFAULTS[name].attributes
    for point, _, unit in points:
        if point in mapped:
            attr = entity[mapped[point].partition(".")[0]]
            ratio = unit == "%"  # a 0..1 ratio of the model (illuminanceLevel): no unit any more
            assert unit is None or ratio or "unitCode" in attr, f"{point} ({unit}) sent without unitCode"


def test_streetlight_names_are_the_models() -> None:
    mapper = EntityMapper(
        NgsiLdConfig(url="http://127.0.0.1:1026"), GATEWAY, lambda: {"d": ("modbus", "streetlamp-controller")}
    )
    readings = [("on", True, None), ("burning_hours", 1200.5, "h"), ("lamp_failure", False, None)]
    ((body, _),) = mapper.requests(rows([Reading("d", p, TS, v, u) for p, v, u in readings]))
    (e,) = body
    assert e["powerState"]["value"] == "on" and "on" not in e and "burning_hours" not in e
    assert e["status"]["value"] == "ok"


def test_three_phase_power_factors_and_reactive_power_units() -> None:
    mapper = EntityMapper(
        NgsiLdConfig(url="http://127.0.0.1:1026"), GATEWAY, lambda: {"m": ("modbus", "eastron-sdm630")}
    )
    readings = [
        ("power_factor_l1", 0.9, None),
        ("power_factor_l2", 0.8, None),
        ("total_power_factor", 0.85, None),
        ("total_reactive_power", 120.0, "VAr"),
        ("voltage_l1_l2", 400.1, "V"),
        ("total_active_energy", 1.0, "kWh"),
    ]
    ((body, _),) = mapper.requests(rows([Reading("m", p, TS, v, u) for p, v, u in readings]))
    (e,) = body
    assert e["powerFactor"]["value"] == {"L1": 0.9, "L2": 0.8}  # one value per phase
    assert e["totalPowerFactor"]["value"] == 0.85  # the single figure
    assert e["totalReactivePower"]["unitCode"] == "D44"  # var (UN/CEFACT Rec. 20)
    assert e["phaseToPhaseVoltage"]["value"] == {"L12": 400.1}
    assert "total_active_energy" not in e  # no place in the model: left out
    assert sdm.errors(e) == []


def test_a_user_mapping_sends_a_point_the_built_in_one_leaves_out() -> None:
    cfg = NgsiLdConfig(
        url="http://127.0.0.1:1026",
        profiles={
            "streetlamp-controller": NgsiEntityConfig(
                type="Streetlight", attributes={"burning_hours": "burningHours", "lamp_failure": "status"}
            )
        },
    )
    mapper = EntityMapper(cfg, GATEWAY, lambda: {"d": ("modbus", "streetlamp-controller")})
    ((body, _),) = mapper.requests(rows([Reading("d", "burning_hours", TS, 12.5, "h")]))
    assert body[0]["burningHours"]["value"] == 12.5 and body[0]["burningHours"]["unitCode"] == "HUR"


def test_the_schemas_check_formats_and_never_reach_the_network() -> None:
    entity = {
        "id": "urn:ngsi-ld:AirQualityObserved:x",
        "type": "AirQualityObserved",
        "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [4.8, 45.7]}},
        "dateObserved": {"type": "Property", "value": {"@type": "DateTime", "@value": "not a date"}},
    }
    assert any("date-time" in e for e in sdm.errors(entity))  # format checking is on
    entity["dateObserved"]["value"]["@value"] = "2023-11-14T22:13:20.000Z"
    assert sdm.errors(entity) == []
    from referencing.exceptions import Unresolvable

    with pytest.raises(Unresolvable):
        sdm.registry().resolver().lookup("https://smart-data-models.github.io/data-models/elsewhere.json")
