"""The config models of the control sections, `commands:` and `schedules:` (docs/COMMANDS.md).

Apart from the machinery that runs them (agent/control/commands.py, agent/control/lamp_schedule.py) so that the
validating child (agent/config/validate.py), which builds these models, imports neither the event loop nor
the command database's modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time
from typing import Any, Literal

from agent.config.base import Model
from agent.config.modelkit import Field, field_validator, model_validator
from agent.config.units import Duration, duration_field, parse_duration


class CommandsConfig(Model):
    """The `commands:` section: how long ids are remembered and how much audit is kept."""

    result_retention: Duration = duration_field(
        86400.0,
        "1m",
        "30d",
        description="how long a command's result is remembered to answer a repeated id without executing",
    )
    audit_max_rows: int = Field(
        10000, ge=10, le=10_000_000, description="audit rows kept; the oldest go first"
    )
    write_timeout: Duration = duration_field(
        10.0,
        "10ms",
        "5m",
        description="longest a device write (with its read-back) may take before the command fails",
    )


def known_timezone(value: str | None) -> str | None:
    """A field validator's check of an IANA timezone name (here and gateway.location.timezone)."""
    if value is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # only when a file names a zone

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown timezone '{value}' (an IANA name such as Europe/Paris)") from None
    return value


DEFAULT_TIMEZONE = "Europe/Paris"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

_AT = re.compile(
    r"^\s*(?:(?P<clock>\d{1,2}:\d{2}(?::\d{2})?)|(?P<sun>sunrise|sunset)\s*(?:(?P<sign>[+-])\s*(?P<offset>.+))?)\s*$"
)


@dataclass(frozen=True, slots=True)
class StepTime:
    """A step's `at`, parsed: a local clock time, or a sun event with an offset in seconds."""

    clock: time | None
    sun: Literal["sunrise", "sunset"] | None
    offset_s: float


def parse_at(text: str) -> StepTime:
    """`"23:00"`, `"06:30:00"`, `"sunset"`, `"sunset-10m"`, `"sunrise+1h"` -> StepTime, or ValueError."""
    m = _AT.match(text)
    if not m:
        raise ValueError(
            f"'{text}' is not a step time; write HH:MM (e.g. 23:00) or sunset/sunrise with an "
            "optional offset (e.g. sunset-10m, sunrise+15m)"
        )
    if m.group("clock"):
        parts = [int(p) for p in m.group("clock").split(":")] + [0]
        if parts[0] > 23 or parts[1] > 59 or parts[2] > 59:
            raise ValueError(f"'{text}' is not a time of day (00:00 to 23:59)")
        return StepTime(time(parts[0], parts[1], parts[2]), None, 0.0)
    offset = 0.0
    if m.group("offset"):
        offset = parse_duration(m.group("offset").strip())
        if offset > 6 * 3600:
            raise ValueError(f"'{text}': an offset from {m.group('sun')} is at most 6h")
        if m.group("sign") == "-":
            offset = -offset
    sun: Literal["sunrise", "sunset"] = "sunrise" if m.group("sun") == "sunrise" else "sunset"
    return StepTime(None, sun, offset)


class Target(Model):
    device: str
    point: str


class ScheduleStep(Model):
    at: str = Field(
        description='"HH:MM" local time, or sunset/sunrise with an offset: "sunset-10m", "sunrise+10m"'
    )
    value: float | int | bool | str = Field(description="what the targets are set to from this step on")
    weekdays: list[Weekday] | None = Field(
        None, description="only on these local days (mon..sun); default every day"
    )

    @field_validator("at")
    @classmethod
    def _check_at(cls, value: str) -> str:
        parse_at(value)
        return value

    def time_spec(self) -> StepTime:
        return parse_at(self.at)


class ScheduleConfig(Model):
    """One entry of `schedules:`: targets, a timezone and the day's steps."""

    device: str | None = Field(None, description="the target device (or use `targets` for several)")
    point: str | None = Field(None, description="the target point, e.g. dim")
    targets: list[Target] = Field(default_factory=list, description="several device+point targets")
    timezone: str | None = Field(
        None, description="IANA zone; default gateway.location.timezone, else Europe/Paris"
    )
    steps: list[ScheduleStep] = Field(min_length=1)
    retry: Duration = duration_field(
        30.0, "1s", "10m", description="first retry delay of a failed step; doubles up to 10m"
    )
    enabled: bool = True

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str | None) -> str | None:
        return known_timezone(value)

    @model_validator(mode="after")
    def _check_targets(self) -> ScheduleConfig:
        if (self.device is None) != (self.point is None):
            raise ValueError("give both 'device' and 'point', or a 'targets' list")
        if self.device is None and not self.targets:
            raise ValueError("no target: give 'device' and 'point', or a 'targets' list")
        return self

    def all_targets(self) -> list[Target]:
        own = [Target(device=self.device, point=self.point)] if self.device and self.point else []
        return own + list(self.targets)

    def uses_sun(self) -> bool:
        return any(s.time_spec().sun is not None for s in self.steps)


def schedule_problems(config: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-section rules for FieldgateConfig.problems: sun steps need a location; targets must exist."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    location = getattr(config.gateway, "location", None)
    devices = getattr(config, "devices", {})
    for name, schedule in getattr(config, "schedules", {}).items():
        if schedule.uses_sun() and location is None:
            found.append(
                (
                    ("schedules", name, "steps"),
                    "sunset/sunrise steps need gateway.location (latitude, longitude)",
                )
            )
        for i, target in enumerate(schedule.all_targets()):
            if target.device not in devices:
                path: tuple[str | int, ...] = (
                    ("schedules", name, "device")
                    if schedule.device == target.device and i == 0
                    else ("schedules", name, "targets", i - (1 if schedule.device else 0), "device")
                )
                found.append((path, f"unknown device '{target.device}'"))
    return found
