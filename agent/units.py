"""Durations and sizes as the config writes them: `500ms`, `10s`, `5m`, `1h`, `64MB`, `1GiB`."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from agent.modelkit import BeforeValidator, Field, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)\s*$")
_SIZE_FACTORS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from a duration string; bare numbers are refused so that units are never guessed."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        if value == 0:
            return 0.0
        raise ValueError(f"a duration needs a unit, e.g. '{value}s' or '{value}ms'")
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 500ms, 10s, 5m or 1h")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a duration; write it like 500ms, 10s, 5m or 1h")
    seconds = float(m.group(1)) * _DURATION_FACTORS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"'{value[:40]}' is not a finite duration")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from a size string (`64MB` decimal, `1GiB` binary)."""
    if not isinstance(value, str):
        raise ValueError("expected a size such as 64MB or 1GiB")
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a size; write it like 64MB, 512KiB or 1GiB")
    size = float(m.group(1)) * _SIZE_FACTORS[m.group(2)]
    if not math.isfinite(size):
        raise ValueError(f"'{value[:40]}' is not a finite size")
    return int(size)


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)$", "examples": ["500ms", "10s", "5m"]}
    ),
]
"""A duration in seconds, written in the config as a string with a unit."""

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(lambda b: f"{b}B", return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\d+(\.\d+)?(B|kB|KB|MB|GB|KiB|MiB|GiB)$", "examples": ["256MB"]}
    ),
]
"""A size in bytes, written in the config as a string with a unit."""


# --- bounds (docs/SPEC.md §2, "Bounds") ---------------------------------------------------------------------
# Every duration and size of the config has a range, checked by `fieldgate check`: a value that validates is
# one the daemon runs with (a `poll: 0s` once passed the check and killed the daemon at start). The range is
# also in the JSON Schema (`fieldgate schema`) as x-minimum / x-maximum, in the config's own units.
BOUND_MIN, BOUND_MAX = "x-minimum", "x-maximum"


ZERO_OFF = "x-zero-disables"


def duration_field(default: Any, minimum: str, maximum: str, *, zero_off: bool = False, **kwargs: Any) -> Any:
    """A Duration field between `minimum` and `maximum` (both written as in the config, e.g. "100ms"),
    or 0 too with `zero_off` (0 turns the feature off); checked by config_base.Model (`bound_problem`)."""
    parse_duration(minimum), parse_duration(maximum)  # a typo in a bound fails at import, not at check
    extra: dict[str, Any] = {BOUND_MIN: minimum, BOUND_MAX: maximum}
    if zero_off:
        extra[ZERO_OFF] = True
    return Field(default, json_schema_extra=extra, **kwargs)


def size_field(default: Any, minimum: str, maximum: str, **kwargs: Any) -> Any:
    """A Size field between `minimum` and `maximum` (e.g. "256KiB", "1024GiB")."""
    parse_size(minimum), parse_size(maximum)
    return Field(default, json_schema_extra={BOUND_MIN: minimum, BOUND_MAX: maximum}, **kwargs)


def _parse_bound(text: str) -> tuple[float, str]:
    if _DURATION.match(text):
        return parse_duration(text), text
    return float(parse_size(text)), text


def bound_problem(extra: Any, value: Any) -> str | None:
    """Why `value` (seconds or bytes) is outside the bounds in a field's json_schema_extra; None inside."""
    if not isinstance(extra, dict) or not isinstance(value, int | float) or isinstance(value, bool):
        return None
    low, high = extra.get(BOUND_MIN), extra.get(BOUND_MAX)
    if value == 0 and extra.get(ZERO_OFF):
        return None
    is_size = isinstance(low, str) and not _DURATION.match(low)
    shown = f"{value}B" if is_size else format_duration(value)
    for bound, below in ((low, True), (high, False)):
        if isinstance(bound, str):
            limit, text = _parse_bound(bound)
            if (value < limit) if below else (value > limit):
                off = " or 0 (off)" if below and extra.get(ZERO_OFF) else ""
                return f"must be {'at least' if below else 'at most'} {text}{off} (got {shown})"
    return None
