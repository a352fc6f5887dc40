"""Health figures: per-device state as the scheduler sees it, the buffer's figures as last read
(`BufferFigures`), and the health/status documents built from them.

Also the status page's trends (GET /api/history, docs/STATUS_API.md "The last hour"): the last hour of every numeric point, of
each device's poll cycles and of the backlog and upstream link, in fixed rings of one slot per minute
(`SLOTS` x `STEP_MS`), so their memory never grows: 540 B per numeric point (one ring of minutes per
device), 1 KiB per device.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.config.urls import redact_url
from agent.errors import StoreError
from agent.pipeline.metrics import POLL_BUCKETS, VALUE, Histogram
from agent.pipeline.reading import Reading, now_ms

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig
    from agent.control.commands import CommandProcessor
    from agent.control.remoteconfig import RemoteConfig
    from agent.pipeline.store import AsyncStore, StoreStats
    from agent.pipeline.writer import StoreWriter
    from agent.upstream.contract import Upstream
    from agent.upstream.mqtt import Uplink

log = logging.getLogger("fieldgate.runtime")

SLOTS = 60  # one hour...
STEP_MS = 60_000  # ...of one-minute slots
_EMPTY = -1  # a slot's minute when it was never written
_NO_SUMS = array("d", [0.0]) * SLOTS  # a new point's column of sums
_WIDER = {"B": "H", "H": "I", "I": "Q"}  # a column's counts when one reaches the largest its items hold


def _significant(value: float) -> float | int | None:
    """A minute's mean as sent in JSON: 6 significant digits are more than a sparkline can show; None for
    a minute that saw a NaN or an infinity."""
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.6g}")


class DeviceHistory:
    """A device's numeric points' last hour: the mean of each point's values in each minute, in one ring of
    SLOTS minutes for the whole device and one column of SLOTS sums and counts per point.

    The points of a device are polled together, so one ring of minutes serves them all: a slot holds the
    latest minute any point of the device wrote to it, and moving it on clears every point's sum and count
    there. For readings no later than the minute asked (every driver stamps them with the gateway's clock)
    the means are those of a ring per point; a reading older than what its slot holds is outside the hour
    and ignored, as before.

    Memory per point: SLOTS x (8 B sum + 1 B count) = 540 B (`counts` widens to 2 then 4 B per item when a
    point gets 256 values in a minute), no object of its own; per device the minutes, 240 B, and the arrays'
    headers (docs/STATUS_API.md). The sums stay float64: float32 would not keep the 6 significant digits
    shown (a mean of +1000.1 and -1000.0 comes out 0.0499878 in float32 sums; integers above 2**24 move).
    """

    __slots__ = ("columns", "counts", "minutes", "sums")

    def __init__(self) -> None:
        self.minutes = array("i", [_EMPTY]) * SLOTS  # which minute (since the epoch) each slot holds
        self.columns: dict[str, int] = {}  # point -> its column number in `sums` and `counts`
        self.sums = array("d")
        self.counts = array("B")

    def column(self, point: str) -> int:
        """Where `point`'s column starts in `sums` and `counts` (a new, empty one for a point not seen before).
        The dict holds column numbers, not these offsets: small ints are shared, offsets would be objects."""
        column = self.columns.get(point)
        if column is None:
            column = self.columns[point] = len(self.columns)
            self.sums.extend(_NO_SUMS)
            self.counts.extend(array(self.counts.typecode, bytes(SLOTS * self.counts.itemsize)))
        return column * SLOTS

    def add(self, readings: Iterable[Reading]) -> None:
        """Readings of the device, a cycle's usually: the numeric ones (not booleans, not strings) that are not
        of bad quality. A cycle's share their minute, whose slot is looked up once (-1: not held)."""
        columns = self.columns
        seen = None
        i = -1
        for r in readings:
            value = r.value
            if not (type(value) is float or type(value) is int) or r.quality == "bad":
                continue
            column = columns.get(r.point)
            base = self.column(r.point) if column is None else column * SLOTS
            minute = r.ts // STEP_MS
            if minute != seen:
                seen = minute
                i = self._slot(minute)
            if i < 0:
                continue
            k = base + i
            try:
                self.sums[k] += value
            except OverflowError:
                continue  # an integer beyond a float
            try:
                self.counts[k] += 1
            except OverflowError:
                self.counts = array(_WIDER[self.counts.typecode], self.counts)
                self.counts[k] += 1

    def _slot(self, minute: int) -> int:
        """The slot of `minute`, moved on to it if it held an older one; -1 if it holds a newer one (outside
        the hour shown) or `minute` is beyond 32-bit minutes (a device's clock)."""
        i = minute % SLOTS
        held = self.minutes[i]
        if held != minute:
            if minute < held:
                return -1
            try:
                self.minutes[i] = minute
            except OverflowError:
                return -1
            self._clear(i)
        return i

    def _clear(self, i: int) -> None:
        """Slot `i` starts a new minute: every point's sum and count there back to zero."""
        sums, counts = self.sums, self.counts
        for k in range(i, len(sums), SLOTS):
            sums[k] = 0.0
            counts[k] = 0

    def series(self, point: str, end_minute: int) -> list[float | int | None]:
        """Oldest first: `point`'s mean in each of the SLOTS minutes ending with `end_minute` (None: no value)."""
        base = self.columns[point] * SLOTS
        minutes, sums, counts = self.minutes, self.sums, self.counts
        out: list[float | int | None] = []
        for minute in range(end_minute - SLOTS + 1, end_minute + 1):
            i = minute % SLOTS
            count = counts[base + i]
            if minutes[i] == minute and count:
                out.append(_significant(sums[base + i] / count))
            else:
                out.append(None)
        return out

    def doc(self, end_minute: int) -> dict[str, list[float | int | None]]:
        """Every point's series (the `points` of a device in /api/history)."""
        return {point: self.series(point, end_minute) for point in self.columns}


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
    # GET /metrics (agent/pipeline/metrics.py) and the status page's trends:
    polled: dict[str, int] = field(default_factory=dict)  # readings returned by polls, by kind
    poll_seconds: Histogram = field(default_factory=lambda: Histogram(POLL_BUCKETS))
    history: DeviceHistory = field(default_factory=DeviceHistory)  # numeric points only
    activity: Activity = field(default_factory=Activity)

    def observe(self, readings: list[Reading]) -> None:
        """A successful cycle's readings (the scheduler, after `last_readings`): counters and trends."""
        self.polled[VALUE] = self.polled.get(VALUE, 0) + len(readings)
        self.activity.ok(readings[-1].ts if readings else now_ms())
        self.history.add(readings)

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
            "points": self.history.doc(end_minute),
        }


STATS_EVERY = 5.0  # seconds between two background reads of the buffer's figures (systemd STATUS=, health)
STATS_FRESH = 0.5  # seconds: a status request reads them again when they are older than this


class BufferFigures:
    """The buffer's figures as last read (`last`), and the status page's `timeline` sampled at each read.

    Read every STATS_EVERY in the background (`run`) and before each status request (`refresh`), so the status
    page is never older than STATS_FRESH while an idle gateway does not ask its store thread every second.
    `link` is the main upstream, whose state the timeline samples with the backlog."""

    def __init__(
        self,
        store: AsyncStore,
        link: Callable[[], Upstream | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.link = link
        self.last: StoreStats | None = None
        self.timeline = Timeline()
        self._clock = clock
        self._at = 0.0  # `clock` time: when `last` was read

    async def first(self) -> StoreStats:
        """The figures at start (a store that cannot answer them fails the start)."""
        self.last = await self.store.stats()
        return self.last

    async def refresh(self) -> None:
        """Read the figures again unless they are fresher than STATS_FRESH; a store error keeps the last known
        ones (the store writer reports the disk)."""
        if self.last is None or self._clock() - self._at >= STATS_FRESH:
            try:
                self.last = await self.store.stats()
                up = self.link()
                self.timeline.sample(
                    self.last.pending, bool(up and up.connected), up.connections if up else 0
                )
            except StoreError as exc:
                log.debug("buffer figures not refreshed: %s", exc)
            self._at = self._clock()

    async def run(self, refreshed: Callable[[], object]) -> None:
        """Refresh every STATS_EVERY, calling `refreshed` after each read (systemd's STATUS= line)."""
        while True:
            await self.refresh()
            refreshed()
            await asyncio.sleep(STATS_EVERY)


class Gateway(Protocol):
    """What the health and status documents read of the running daemon (agent/runtime.py)."""

    @property
    def config(self) -> FieldgateConfig: ...
    @property
    def config_path(self) -> Path: ...
    @property
    def started(self) -> float: ...  # monotonic
    @property
    def last_stats(self) -> StoreStats | None: ...
    @property
    def health(self) -> Mapping[str, DeviceHealth]: ...
    @property
    def writer(self) -> StoreWriter | None: ...
    @property
    def uplink(self) -> Uplink | None: ...
    @property
    def extra_uplinks(self) -> Mapping[str, Upstream]: ...
    @property
    def commands(self) -> CommandProcessor | None: ...
    @property
    def remote(self) -> RemoteConfig: ...
    @property
    def config_hash(self) -> str: ...
    @property
    def config_applied_ts(self) -> int: ...
    @property
    def config_source(self) -> str: ...
    @property
    def reloads(self) -> int: ...
    @property
    def reload_ts(self) -> int | None: ...
    @property
    def reload_error(self) -> str | None: ...


def _buffer_doc(st: StoreStats | None) -> dict[str, Any]:
    return {
        "pending": st.pending if st else 0,
        "oldest_ts": st.oldest_ts if st else None,
        "evicted": st.evicted if st else 0,
        "bytes": st.bytes if st else 0,
    }


def _upstreams_doc(gw: Gateway) -> dict[str, Any]:
    """Compatible extension: every upstream's format, link and lane (pending = not yet acknowledged)."""
    stats = gw.last_stats
    lanes = stats.lanes if stats else {}
    ups: list[tuple[str, Upstream | None]] = [("mqtt", gw.uplink), *gw.extra_uplinks.items()]
    doc: dict[str, Any] = {}
    for name, up in ups:
        if up is None:
            continue
        doc[name] = {
            "format": up.format_name,
            "connected": bool(up.connected),
            "sent": up.sent,
            "pending": lanes.get(name, stats.pending if stats else 0),
            "last_error": up.last_error,
        }
    return doc


def health_document(gw: Gateway) -> dict[str, Any]:
    """SPEC §3 health."""
    up = gw.uplink
    return {
        "ts": now_ms(),
        "uptime_s": int(time.monotonic() - gw.started),
        "version": __version__,
        "buffer": _buffer_doc(gw.last_stats),
        "upstream": {"connected": bool(up and up.connected), "sent": up.sent if up else 0},
        "upstreams": _upstreams_doc(gw),
        "devices": {name: h.spec() for name, h in gw.health.items()},
        # compatible extension (docs/SPEC.md "Compatible extensions: configuration")
        "config": {
            "hash": gw.config_hash,
            "version": gw.config.version,
            "reload_error": gw.reload_error,
        },
    }


def status_document(gw: Gateway) -> dict[str, Any]:
    """The local API's /api/status: health plus what a technician needs on site (docs/STATUS_API.md)."""
    doc = health_document(gw)
    st = gw.last_stats
    writer = gw.writer
    doc["gateway"] = {"id": gw.config.gateway.id, "name": gw.config.gateway.name}
    doc["buffer"].update(
        recovered=st.recovered if st else 0,
        disk_errors=st.disk_errors if st else 0,
        last_error=writer.failing if writer else None,  # cleared once the buffer is writable again
        in_memory=len(writer.pending) if writer else 0,
        dropped=writer.dropped if writer else 0,
    )
    up = gw.uplink
    if up is not None:
        doc["upstream"].update(
            url=redact_url(up.url),  # the broker in use (upstream.mqtt.url may list several)
            failovers=up.failovers,
            last_error=up.last_error,
            since_ts=up.since_ts,
            messages=up.messages,
            connections=up.connections,
        )
    if gw.commands is not None:
        # messages refused before an id could be read (docs/COMMANDS.md)
        doc["commands"] = {"malformed": gw.commands.malformed}
    doc["devices"] = {name: h.status() for name, h in gw.health.items()}
    doc["config"].update(
        path=str(gw.config_path),
        applied_ts=gw.config_applied_ts,
        source=gw.config_source,
        reloads=gw.reloads,
        reload_ts=gw.reload_ts,
        remote={
            "enabled": gw.config.remote_config.enabled,
            "state": gw.remote.state,
        },
    )
    return doc


def summary(gw: Gateway) -> str:
    """One line for systemd's STATUS= and the logs."""
    failing = sum(1 for h in gw.health.values() if h.state == "failing")
    up = "connected" if gw.uplink and gw.uplink.connected else "offline"
    pending = gw.last_stats.pending if gw.last_stats else 0
    return f"{len(gw.health)} devices ({failing} failing), upstream {up}, {pending} readings pending"


def history_doc(health: dict[str, DeviceHealth], timeline: Timeline, ts: int | None = None) -> dict[str, Any]:
    """GET /api/history (docs/STATUS_API.md): the last hour of the gateway and of every device, the minutes
    ending with the one of `ts`. Separate from /api/status because it is ~60 times larger (60 numbers per
    point): the page fetches it once a minute, the status every 2 s."""
    ts = now_ms() if ts is None else ts
    doc = timeline.doc(ts)
    doc["ts"] = ts
    doc["devices"] = {name: h.trends(ts // STEP_MS) for name, h in health.items()}
    return doc
