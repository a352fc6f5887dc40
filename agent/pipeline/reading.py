"""Reading: the one type that crosses from drivers to the agent."""

from __future__ import annotations

import time
from dataclasses import dataclass

Value = float | int | bool | str


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True, frozen=True)
class Reading:
    """One value of one point of one device at one instant.

    `quality` is None when good; "uncertain" for values a platform should
    treat with care (clock not synchronised, device in a degraded mode).
    """

    device: str
    point: str
    ts: int
    value: Value
    unit: str | None = None
    quality: str | None = None
