"""Device profiles (config/profiles/*.yaml): register maps merged into a Modbus device's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.config import loader
from drivers.modbus.config import ModbusDeviceConfig, ModbusPoint

BUNDLED_PROFILES = Path(__file__).resolve().parents[2] / "config" / "profiles"
# Device fields a profile's `device:` section may not set: they identify one device on one bus.
NOT_IN_PROFILE = frozenset({"driver", "bus", "unit_id", "points", "profile", "enabled"})


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    path: Path
    manufacturer: str
    model: str
    description: str
    device: dict[str, Any] = field(default_factory=dict)
    points: dict[str, ModbusPoint] = field(default_factory=dict)


def find_profile(ref: str, config_dir: Path | None = None) -> Path:
    """A profile's file, looked up like the config loader does (agent.config.loader.find_profile)."""
    base = (config_dir or Path.cwd()) / "fieldgate.yaml"
    found = loader.find_profile(ref, base)
    if found is None:
        known = ", ".join(loader.available_profiles(base)) or "none"
        raise ValueError(f"profile '{ref}' not found (known: {known})")
    return found


def load_profile(ref: str, config_dir: Path | None = None) -> Profile:
    """Read and validate a profile; ValueError says what is wrong and where."""
    path = find_profile(ref, config_dir)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile is a mapping (manufacturer, model, description, device, points)")
    unknown = set(data) - {"manufacturer", "model", "description", "device", "points"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    device = data.get("device") or {}
    bad = set(device) & NOT_IN_PROFILE or set(device) - set(ModbusDeviceConfig.model_fields)
    if bad:
        raise ValueError(f"{path}: device keys not allowed in a profile: {sorted(bad)}")
    points = {}
    for name, spec in (data.get("points") or {}).items():
        if not isinstance(name, str):
            raise ValueError(
                f"{path}: point name {name!r} is not text (YAML reads on/off/yes/no as booleans: quote it)"
            )
        try:
            points[str(name)] = ModbusPoint.model_validate(spec)
        except ValueError as exc:
            raise ValueError(f"{path}: points.{name}: {exc}") from None
    return Profile(
        name=path.stem,
        path=path,
        manufacturer=str(data.get("manufacturer", "")),
        model=str(data.get("model", "")),
        description=str(data.get("description", "")),
        device=dict(device),
        points=points,
    )


def merge_profile(config: ModbusDeviceConfig, profile: Profile) -> ModbusDeviceConfig:
    """The device config with the profile applied: the device's own points and fields win.

    Idempotent: merging the same profile twice gives the same config.
    """
    explicit = config.model_fields_set
    updates: dict[str, Any] = {k: v for k, v in profile.device.items() if k not in explicit}
    points = dict(profile.points)
    points.update(config.points)
    data = config.model_dump()
    data.update(updates)
    data["points"] = {name: p.model_dump() for name, p in points.items()}
    merged = ModbusDeviceConfig.model_validate(data)
    return merged
