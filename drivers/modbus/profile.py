"""Device profiles (drivers/modbus/profiles/*.yaml, and the profile directories): register maps merged into a Modbus device's config."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.config import loader
from drivers.modbus.config import ModbusDeviceConfig, ModbusPoint

BUNDLED_PROFILES = loader.bundled_profiles()  # package data: drivers/modbus/profiles/*.yaml
PROFILE_KEYS = ("manufacturer", "model", "description", "device", "points")
# Device fields a profile's `device:` section may not set: they identify one device on one bus.
NOT_IN_PROFILE = frozenset({"driver", "bus", "unit_id", "points", "profile", "enabled"})

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ProfileProblem:
    """What is wrong in a profile: at `loc` inside the profile file (None: the file as a whole)."""

    loc: Loc | None
    label: str  # the key path or `(profile)`, as the message shows it
    message: str


@dataclass(frozen=True, slots=True)
class Merged:
    """A device's mapping with its profile applied, and where each value taken from the profile was."""

    device: dict[str, Any]
    taken: list[tuple[Loc, Loc]] = field(default_factory=list)  # (loc in the profile, loc in the device)
    problems: list[ProfileProblem] = field(default_factory=list)


def merge(device: dict[str, Any], profile: Any) -> Merged:
    """The one profile merge, on the mappings as read (the config loader, and `merge_profile` below).

    The profile's `points` are the device's, except a point the device defines itself; its `device:` section
    gives defaults for the fields the device does not set, never those of NOT_IN_PROFILE. A profile that is
    not a mapping of PROFILE_KEYS is a problem and changes nothing. Idempotent: merging twice changes nothing.
    """
    if not isinstance(profile, dict):
        return Merged(
            device, problems=[ProfileProblem(None, "(profile)", "a profile is a mapping with 'points'")]
        )
    problems = []
    for key in profile:
        if key not in PROFILE_KEYS:
            hint = difflib.get_close_matches(str(key), PROFILE_KEYS, n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            problems.append(ProfileProblem((key,), str(key), f"unknown profile key{more}"))
    defaults = profile.get("device") or {}
    points = profile.get("points") or {}
    if not isinstance(defaults, dict) or not isinstance(points, dict):
        problems.append(ProfileProblem(None, "(profile)", "'device' and 'points' must be mappings"))
        return Merged(device, problems=problems)
    merged = dict(device)
    taken: list[tuple[Loc, Loc]] = []
    for key, value in defaults.items():
        if key in NOT_IN_PROFILE:
            problems.append(ProfileProblem(("device", key), str(key), "a profile cannot set this device key"))
            continue
        if key not in merged:
            merged[key] = value
            taken.append((("device", key), (key,)))
    own = device.get("points") or {}
    own = own if isinstance(own, dict) else {}
    all_points = dict(points)
    all_points.update(own)  # a point named in both takes the device's definition
    taken += [(("points", name), ("points", name)) for name in points if name not in own]
    merged["points"] = all_points
    return Merged(merged, taken, problems)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    path: Path
    manufacturer: str
    model: str
    description: str
    device: dict[str, Any] = field(default_factory=dict)
    points: dict[str, ModbusPoint] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # the file's mapping, as `merge` takes it


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
    unknown = set(data) - set(PROFILE_KEYS)
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
        data=data,
    )


def merge_profile(config: ModbusDeviceConfig, profile: Profile) -> ModbusDeviceConfig:
    """The device config with the profile applied by `merge`, as the config loader applies it: the device's
    own points and fields win (the fields it set, not its defaults). For configs built in code and tests.

    Idempotent: merging the same profile twice gives the same config.
    """
    merged = merge(config.model_dump(exclude_unset=True), profile.data)
    if merged.problems:
        raise ValueError("; ".join(f"{profile.path}: {p.label}: {p.message}" for p in merged.problems))
    return ModbusDeviceConfig.model_validate(merged.device)
