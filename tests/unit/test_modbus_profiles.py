"""Every bundled profile is a valid, self-consistent register map."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent import registry
from agent.config import loader
from agent.errors import ConfigError
from drivers.modbus.config import ModbusDeviceConfig, ModbusPoint
from drivers.modbus.profile import (
    BUNDLED_PROFILES,
    NOT_IN_PROFILE,
    Profile,
    load_profile,
    merge,
    merge_profile,
)

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


@pytest.mark.parametrize("key", sorted(NOT_IN_PROFILE))
def test_the_loader_and_the_driver_refuse_the_same_device_keys(key: str, tmp_path: Path) -> None:
    # One merge (drivers/modbus/profile.py `merge`): the loader's and `merge_profile` cannot disagree.
    (tmp_path / "profiles").mkdir()
    value = {"points": "{}", "driver": "modbus", "enabled": "false"}.get(key, "x")
    (tmp_path / "profiles" / "odd.yaml").write_text(
        f"manufacturer: M\nmodel: X\ndescription: D\ndevice:\n  {key}: {value}\npoints:\n  p: {{address: 1}}\n"
    )
    config_file = tmp_path / "fieldgate.yaml"
    config_file.write_text(
        """gateway: {id: gw-1}
upstream: {mqtt: {url: "mqtt://127.0.0.1:1883"}}
buses:
  rs485: {type: modbus-rtu, port: /dev/ttyUSB0}
devices:
  dev: {bus: rs485, profile: odd}
"""
    )
    with pytest.raises(ConfigError) as info:
        loader.load_config(config_file)
    assert (
        f"{tmp_path / 'profiles' / 'odd.yaml'}:5:3: {key}: a profile cannot set this device key"
        in info.value.problems
    )
    profile = Profile(
        "odd",
        tmp_path / "odd.yaml",
        "M",
        "X",
        "D",
        data=yaml.safe_load((tmp_path / "profiles" / "odd.yaml").read_text()),
    )
    with pytest.raises(ValueError, match=f"{key}: a profile cannot set this device key"):
        merge_profile(ModbusDeviceConfig(bus="rs485"), profile)


def test_the_loader_merges_through_the_drivers_merge() -> None:
    assert registry.profile_merge("modbus") is merge
    assert registry.profile_merge("ble") is None
