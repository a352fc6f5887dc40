"""Reading: the one type that crosses from drivers to the agent."""

from __future__ import annotations

import time
from typing import NamedTuple

Value = float | int | bool | str


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


class Reading(NamedTuple):
    """One value of one point of one device at one instant.

    `quality` is None when good; "uncertain" for values a platform should
    treat with care (clock not synchronised, device in a degraded mode).

    A named tuple rather than a frozen dataclass: every polled value creates one, and a tuple is built in
    one C call where a frozen dataclass's __init__ sets each field through object.__setattr__ (about 7 % of
    the daemon's CPU on the reference workload went to building readings and the store's rows). Immutable
    and hashable as before; `_replace` makes a changed copy.
    """

    device: str
    point: str
    ts: int
    value: Value
    unit: str | None = None
    quality: str | None = None
