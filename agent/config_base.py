"""The base models every config section and driver config inherits: unknown keys are errors."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from agent.modelkit import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from agent.units import Duration, bound_problem, duration_field


class Model(BaseModel):
    """A config section: strict about unknown keys, immutable once loaded."""

    # allow_inf_nan: .nan and .inf are YAML floats; no field of the config means them (a nan scale or deadband
    # would make every value nan, an infinite duration a timer that never fires).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _within_bounds(cls, value: Any, info: Any) -> Any:
        """Durations and sizes declared with units.duration_field / size_field stay within their bounds."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and field.json_schema_extra is not None:
            problem = bound_problem(field.json_schema_extra, value)
            if problem is not None:
                raise ValueError(problem)
        return value


# --- edge processing options (docs/EDGE_PROCESSING.md), shared by devices, points and profiles --------------

ReportMode = Literal["always", "on_change", "deadband"]
AggregateFunction = Literal["min", "max", "mean", "sum", "first", "last", "count"]
DEFAULT_FUNCTIONS: tuple[AggregateFunction, ...] = ("min", "max", "mean", "last")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_deadband(value: Any) -> float | str:
    """A deadband: a number (absolute, in the point's unit) or a string such as `2%` (relative)."""
    if isinstance(value, bool):
        raise ValueError("a deadband is a number (absolute, e.g. 0.5) or a percentage (relative, e.g. '2%')")
    if isinstance(value, int | float):
        if value < 0 or value != value or value == float("inf"):
            raise ValueError("a deadband cannot be negative, nan or infinite")
        return float(value)
    if isinstance(value, str):
        m = _RELATIVE.match(value)
        if m:
            return f"{m.group(1)}%"
    raise ValueError(f"{value!r} is not a deadband; write 0.5 (absolute) or '2%' (relative)")


Deadband = Annotated[
    float | str,
    BeforeValidator(parse_deadband),
    WithJsonSchema(
        {
            "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\d+(\.\d+)?%$"}],
            "examples": [0.5, "2%"],
        }
    ),
]


class AggregateConfig(Model):
    """Windowed aggregates of a point, aligned on the clock, sent instead of its raw values."""

    window: Duration = duration_field(
        ..., "1s", "1d", description="window length, aligned on the clock (1m windows end at :00)"
    )
    functions: list[AggregateFunction] = Field(
        default_factory=lambda: list(DEFAULT_FUNCTIONS),
        min_length=1,
        description="each gives one reading named POINT.FUNCTION, e.g. power_w.mean",
    )

    @model_validator(mode="after")
    def _check(self) -> AggregateConfig:
        if self.window < 1.0:
            raise ValueError("an aggregate window is at least 1s")
        if len(set(self.functions)) != len(self.functions):
            raise ValueError("an aggregate function is listed twice")
        return self


class ReportOptions(Model):
    """The report options of one point (an entry of a device's `processing:` map)."""

    report: ReportMode | None = Field(None, description="always | on_change | deadband; default always")
    deadband: Deadband | None = Field(None, description="0.5 (absolute) or '2%' (relative): report: deadband")
    heartbeat: Duration | None = duration_field(
        None,
        "1s",
        "7d",
        zero_off=True,
        description="longest time without sending an unchanged value (default 15m)",
    )
    aggregate: AggregateConfig | None = None


def report_problems(options: Any, inherited_deadband: float | str | None = None) -> list[str]:
    """Contradictions within one level of report options (device, processing entry or point)."""
    report = getattr(options, "report", None)
    deadband = getattr(options, "deadband", None)
    if report in ("always", "on_change") and deadband is not None:
        return [f"'deadband' does not apply to report: {report} (use report: deadband, or drop 'deadband')"]
    if report == "deadband" and deadband is None and inherited_deadband is None:
        return ["report: deadband needs a 'deadband' here or on the device, e.g. deadband: 0.5 or 2%"]
    return []


class DeviceConfigBase(Model):
    """Fields every device has, whatever its driver. Drivers narrow `driver` to a Literal of their name."""

    driver: str
    poll: Duration = duration_field(
        10.0, "10ms", "1d", description="time between two reads of the device (polled drivers)"
    )
    timeout: Duration | None = duration_field(
        None,
        "10ms",
        "1h",
        description="longest time one read cycle may take, queueing on a shared bus included; "
        "default: 3 x poll, between 10s and 60s",
    )
    enabled: bool = True
    report: ReportMode | None = Field(
        None, description="always | on_change | deadband, for every point of the device; default always"
    )
    deadband: Deadband | None = Field(None, description="0.5 (absolute) or '2%' (relative): report: deadband")
    heartbeat: Duration | None = duration_field(
        None,
        "1s",
        "7d",
        zero_off=True,
        description="longest time without sending an unchanged value (default 15m)",
    )
    aggregate: AggregateConfig | None = Field(None, description="windowed aggregates instead of raw values")
    processing: dict[str, ReportOptions] = Field(
        default_factory=dict, description="per-point report options by point name; override the device's"
    )

    @model_validator(mode="after")
    def _report_rules(self) -> DeviceConfigBase:
        found = report_problems(self)
        for name, opts in self.processing.items():
            found += [f"processing.{name}: {p}" for p in report_problems(opts, self.deadband)]
        points = getattr(self, "points", None)
        if isinstance(points, dict):
            for name, point in points.items():
                found += [f"points.{name}: {p}" for p in report_problems(point, self.deadband)]
        if found:
            raise ValueError("; ".join(found))
        return self

    def cycle_timeout(self) -> float:
        return self.timeout if self.timeout is not None else min(max(3 * self.poll, 10.0), 60.0)
