"""Health figures: per-device state as the scheduler sees it, and the health/status documents built from it.

Also the status page's trends (GET /api/history, docs/STATUS_API.md "The last hour"): the last hour of every numeric point, of
each device's poll cycles and of the backlog and upstream link, in fixed rings of one slot per minute
(`SLOTS` x `STEP_MS`), so their memory never grows: 1.2 KiB per numeric point, 1 KiB per device.
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from agent.metrics import POLL_BUCKETS, VALUE, Histogram
from agent.reading import Reading, now_ms

SLOTS = 60  # one hour...
STEP_MS = 60_000  # ...of one-minute slots
_EMPTY = -1  # a slot's minute when it was never written


def _significant(value: float) -> float | int | None:
    """A minute's mean as sent in JSON: 6 significant digits are more than a sparkline can show; None for
    a minute that saw a NaN or an infinity."""
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.6g}")


class PointHistory:
    """One point's last hour: the mean of its values in each minute, in a ring of SLOTS slots.

    Memory per point: three arrays of SLOTS items (minute: 4 B, sum: 8 B, count: 4 B) = 960 B of data plus
    the object headers: 1,256 B (sys.getsizeof, docs/STATUS_API.md).
    """

    __slots__ = ("counts", "minutes", "sums")

    def __init__(self) -> None:
        self.minutes = array("i", [_EMPTY]) * SLOTS  # which minute (since the epoch) each slot holds
        self.sums = array("d", [0.0]) * SLOTS
        self.counts = array("I", [0]) * SLOTS

    def add(self, ts: int, value: float) -> None:
        minute = ts // STEP_MS
        i = minute % SLOTS
        try:
            if self.minutes[i] != minute:
                if minute < self.minutes[i]:
                    return  # older than what the slot holds now: outside the hour shown
                self.minutes[i] = minute  # OverflowError: a device's clock beyond 32-bit minutes
                self.sums[i] = 0.0
                self.counts[i] = 0
            self.sums[i] += value  # OverflowError: an integer beyond a float
        except OverflowError:
            return
        self.counts[i] += 1

    def series(self, end_minute: int) -> list[float | int | None]:
        """Oldest first: the mean of each of the SLOTS minutes ending with `end_minute` (None: no value)."""
        out: list[float | int | None] = []
        for minute in range(end_minute - SLOTS + 1, end_minute + 1):
            i = minute % SLOTS
            if self.minutes[i] == minute and self.counts[i]:
                out.append(_significant(self.sums[i] / self.counts[i]))
            else:
                out.append(None)
        return out


class Activity:
    """Per minute of the last hour: how many poll cycles succeeded and how many failed (the error strip)."""

    __slots__ = ("errors", "minutes", "oks")

    def __init__(self) -> None:
        self.minutes = array("i", [_EMPTY]) * SLOTS
        self.oks = array("I", [0]) * SLOTS
        self.errors = array("I", [0]) * SLOTS

    def _slot(self, ts: int) -> int:
        minute = min(max(ts // STEP_MS, 0), 2**31 - 1)  # 32-bit minutes: a device's clock beyond is clamped
        i = minute % SLOTS
        if self.minutes[i] != minute:
            self.minutes[i] = minute
            self.oks[i] = 0
            self.errors[i] = 0
        return i

    def ok(self, ts: int) -> None:
        self.oks[self._slot(ts)] += 1

    def error(self, ts: int) -> None:
        self.errors[self._slot(ts)] += 1

    def doc(self, end_minute: int) -> dict[str, list[int]]:
        oks: list[int] = []
        errors: list[int] = []
        for minute in range(end_minute - SLOTS + 1, end_minute + 1):
            i = minute % SLOTS
            held = self.minutes[i] == minute
            oks.append(self.oks[i] if held else 0)
            errors.append(self.errors[i] if held else 0)
        return {"ok": oks, "errors": errors}


class Timeline:
    """The gateway's last hour, sampled at each refresh of the buffer's figures (every 5 s, and before each
    status request): the backlog (the largest `pending` seen in each minute) and the upstream link (the
    share of samples it was connected; a reconnection within the minute counts as a disconnected sample)."""

    __slots__ = ("_connections", "downs", "minutes", "pending", "ups")

    def __init__(self) -> None:
        self.minutes = array("i", [_EMPTY]) * SLOTS
        self.pending = array("q", [0]) * SLOTS
        self.ups = array("I", [0]) * SLOTS
        self.downs = array("I", [0]) * SLOTS
        self._connections = 0

    def sample(self, pending: int, connected: bool, connections: int, ts: int | None = None) -> None:
        minute = (now_ms() if ts is None else ts) // STEP_MS
        i = minute % SLOTS
        if self.minutes[i] != minute:
            self.minutes[i] = minute
            self.pending[i] = pending
            self.ups[i] = self.downs[i] = 0
        else:
            self.pending[i] = max(self.pending[i], pending)
        if connections != self._connections and self._connections:
            self.downs[i] += 1  # reconnected since the last sample: it was down in between
        self._connections = connections
        if connected:
            self.ups[i] += 1
        else:
            self.downs[i] += 1

    def doc(self, ts: int) -> dict[str, Any]:
        end_minute = ts // STEP_MS
        pending: list[int | None] = []
        connected: list[float | None] = []
        for minute in range(end_minute - SLOTS + 1, end_minute + 1):
            i = minute % SLOTS
            if self.minutes[i] != minute:
                pending.append(None)
                connected.append(None)
                continue
            pending.append(self.pending[i])
            total = self.ups[i] + self.downs[i]
            connected.append(round(self.ups[i] / total, 3) if total else None)
        return {
            "step_s": STEP_MS // 1000,
            "end_ts": (end_minute + 1) * STEP_MS,
            "pending": pending,
            "connected": connected,
        }


@dataclass(slots=True)
class DeviceHealth:
    """What the gateway knows of one device's recent behaviour (SPEC §3 health, plus the status page's extras)."""

    driver: str
    state: str = "unknown"  # "ok" | "failing" | "unknown"
    errors: int = 0
    consecutive_errors: int = 0
    last_ok_ts: int | None = None
    last_error: str | None = None
    last_error_ts: int | None = None
    point_errors: dict[str, str] = field(default_factory=dict)
    last_readings: dict[str, Reading] = field(default_factory=dict)
    cycles: int = 0
    next_attempt_ts: int | None = None  # when a failing device is tried again
    last_progress: float = field(default_factory=time.monotonic)  # monotonic; the watchdog reads it
    counters: dict[str, int] = field(
        default_factory=dict
    )  # driver-specific (frames_ok, bad_checksum, restarts...)
    # GET /metrics (agent/metrics.py) and the status page's trends:
    polled: dict[str, int] = field(default_factory=dict)  # readings returned by polls, by kind
    poll_seconds: Histogram = field(default_factory=lambda: Histogram(POLL_BUCKETS))
    history: dict[str, PointHistory] = field(default_factory=dict)  # numeric points only
    activity: Activity = field(default_factory=Activity)

    def observe(self, readings: list[Reading]) -> None:
        """A successful cycle's readings (the scheduler, after `last_readings`): counters and trends."""
        self.polled[VALUE] = self.polled.get(VALUE, 0) + len(readings)
        self.activity.ok(readings[-1].ts if readings else now_ms())
        history = self.history
        for r in readings:
            value = r.value
            if (type(value) is float or type(value) is int) and r.quality != "bad":  # not bool, not str
                hist = history.get(r.point)
                if hist is None:
                    hist = history[r.point] = PointHistory()
                hist.add(r.ts, value)

    def failed(self, ts: int | None = None) -> None:
        """A failed cycle (the scheduler): the error strip."""
        self.activity.error(now_ms() if ts is None else ts)

    def spec(self) -> dict[str, Any]:
        """The SPEC §3 per-device health object."""
        return {
            "state": self.state,
            "errors": self.errors,
            "last_ok_ts": self.last_ok_ts,
            "last_error": self.last_error,
        }

    def status(self) -> dict[str, Any]:
        """The richer object of /api/status: the SPEC fields plus last readings and point errors."""
        doc = self.spec()
        doc.update(
            driver=self.driver,
            point_errors=dict(self.point_errors),
            next_attempt_ts=self.next_attempt_ts,
            counters=dict(self.counters),
            readings={
                r.point: {
                    "value": r.value,
                    "unit": r.unit,
                    "ts": r.ts,
                    **({"quality": r.quality} if r.quality else {}),
                }
                for r in self.last_readings.values()
            },
        )
        return doc

    def trends(self, end_minute: int) -> dict[str, Any]:
        """This device's part of /api/history: its poll minutes and its numeric points' last hour."""
        return {
            "activity": self.activity.doc(end_minute),
            "points": {point: hist.series(end_minute) for point, hist in self.history.items()},
        }


def history_doc(health: dict[str, DeviceHealth], timeline: Timeline, ts: int | None = None) -> dict[str, Any]:
    """GET /api/history (docs/STATUS_API.md): the last hour of the gateway and of every device, the minutes
    ending with the one of `ts`. Separate from /api/status because it is ~60 times larger (60 numbers per
    point): the page fetches it once a minute, the status every 2 s."""
    ts = now_ms() if ts is None else ts
    doc = timeline.doc(ts)
    doc["ts"] = ts
    doc["devices"] = {name: h.trends(ts // STEP_MS) for name, h in health.items()}
    return doc
