"""Every bundled profile is a valid, self-consistent register map."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import loader
from drivers.modbus.config import ModbusDeviceConfig, ModbusPoint
from drivers.modbus.profile import BUNDLED_PROFILES, NOT_IN_PROFILE, load_profile, merge_profile

PROFILES = sorted(BUNDLED_PROFILES.glob("*.yaml"))
EXPECTED = {"eastron-sdm120", "eastron-sdm630", "senseair-s8", "dali-modbus-gateway", "streetlamp-controller"}
DIMENSIONLESS = ("power_factor", "status", "failures", "_on")


def test_the_bundled_profiles_are_there() -> None:
    assert {p.stem for p in PROFILES} >= EXPECTED


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_is_valid(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {"manufacturer", "model", "description", "device", "points"}
    assert raw["manufacturer"] and raw["model"] and raw["description"]
    device = raw.get("device") or {}
    assert set(device) <= set(ModbusDeviceConfig.model_fields) - NOT_IN_PROFILE
    points = {name: ModbusPoint.model_validate(spec) for name, spec in raw["points"].items()}
    assert points
    for name, p in points.items():
        measured = p.effective_type() in ("float32", "float64") or p.scale != 1.0
        if measured and not any(word in name for word in DIMENSIONLESS):
            assert p.unit, f"{name}: a measured value needs a unit"
        if p.writable and p.effective_type() not in ("bool", "string"):
            assert p.min is not None and p.max is not None, f"{name}: writable number without min/max"
    # Registers of two points may only be shared by a status register and its bit points.
    spans = [(n, p.table, p.address, p.address + p.register_count(), p) for n, p in points.items()]
    for i, (n1, t1, a1, e1, p1) in enumerate(spans):
        for n2, t2, a2, e2, p2 in spans[i + 1 :]:
            if t1 != t2 or a1 >= e2 or a2 >= e1:
                continue
            bitwise = p1.bit is not None or p2.bit is not None
            single = p1.register_count() == 1 and p2.register_count() == 1
            assert bitwise and single, f"{n1} and {n2} overlap"
    # a device config using the profile validates, and its own definitions win
    config = ModbusDeviceConfig(bus="b", profile=path.stem, points={"extra": {"address": 9999}})
    merged = merge_profile(config, load_profile(path.stem))
    assert set(merged.points) == set(points) | {"extra"}
    assert merge_profile(merged, load_profile(path.stem)) == merged


def test_device_fields_win_over_profile_defaults() -> None:
    config = ModbusDeviceConfig(bus="b", profile="eastron-sdm630", max_registers_per_request=20)
    merged = merge_profile(config, load_profile("eastron-sdm630"))
    assert merged.max_registers_per_request == 20
    default = merge_profile(ModbusDeviceConfig(bus="b"), load_profile("eastron-sdm630"))
    assert default.max_registers_per_request == 80


def test_unknown_profile_names_the_bundled_ones() -> None:
    with pytest.raises(ValueError, match="eastron-sdm120"):
        load_profile("eastron-sdm999")


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_the_config_loader_merges_each_profile_as_documented(path: Path, tmp_path: Path) -> None:
    # The daemon and `fieldgate check` merge profiles in agent/config/loader.py, not the driver: check that path too.
    config_file = tmp_path / "fieldgate.yaml"
    config_file.write_text(
        f"""gateway: {{id: gw-1}}
upstream: {{mqtt: {{url: "mqtt://127.0.0.1:1883"}}}}
buses:
  rs485: {{type: modbus-rtu, port: /dev/ttyUSB0}}
devices:
  dev:
    bus: rs485
    profile: {path.stem}
    points: {{extra: {{address: 9999, unit: V}}}}
"""
    )
    device = loader.load_config(config_file).devices["dev"]
    assert isinstance(device, ModbusDeviceConfig)
    expected = merge_profile(
        ModbusDeviceConfig(bus="rs485", profile=path.stem, points={"extra": {"address": 9999, "unit": "V"}}),
        load_profile(path.stem),
    )
    assert device.points == expected.points
    assert device.max_registers_per_request == expected.max_registers_per_request
