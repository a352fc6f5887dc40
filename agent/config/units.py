"""Durations and sizes as the config writes them: `500ms`, `10s`, `5m`, `1h`, `64MB`, `1GiB`."""

from __future__ import annotations

import re
from typing import Annotated, Any

from agent.config.modelkit import BeforeValidator, PlainSerializer, WithJsonSchema

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
    return float(m.group(1)) * _DURATION_FACTORS[m.group(2)]


def parse_size(value: Any) -> int:
    """Bytes from a size string (`64MB` decimal, `1GiB` binary)."""
    if not isinstance(value, str):
        raise ValueError("expected a size such as 64MB or 1GiB")
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a size; write it like 64MB, 512KiB or 1GiB")
    return int(float(m.group(1)) * _SIZE_FACTORS[m.group(2)])


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
