"""Edge processing between a device and the store: report by exception, heartbeats, aggregates, quality.

One `DeviceProcessor` per device sits where the DeviceTask hands its readings
over (the runtime's sink). It decides, before anything reaches the disk, which
readings are worth sending (docs/EDGE_PROCESSING.md):

- `report: always` (the default) passes every value; `on_change` passes a value
  that differs from the last one sent; `deadband` passes a number that moved by
  more than the deadband (absolute, or relative to the last value sent). An
  unchanged value is still sent once `heartbeat` has passed since the last one
  sent (15 minutes unless configured), and the first value after a start, after a
  device recovered, or after a change of quality is always sent.
- `aggregate` replaces a point's numbers with per-window figures (`POINT.mean`...),
  windows aligned on the clock, stamped with the window's end.
- quality: readings taken while the system clock is not synchronised are marked
  `uncertain`; values marked `bad` by a driver are never sent.

Device events (`_state`, `_error`, emitted by the scheduler) always pass and make
the next value of every point of the device be sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config.base import AggregateConfig
from agent.pipeline.clock import ClockState, shared_clock
from agent.pipeline.polling import ERROR_POINT, STATE_POINT
from agent.pipeline.reading import Reading, Value, now_ms

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig
    from agent.driver import Driver

log = logging.getLogger("fieldgate.processing")

DEFAULT_HEARTBEAT = 900.0  # seconds: an unchanged value is confirmed at least every 15 minutes
WINDOW_GRACE_MS = 2000  # the timer closes a window this long after its end (readings still on their way)
EVENT_POINTS = frozenset({STATE_POINT, ERROR_POINT})
UNCERTAIN = "uncertain"
BAD = "bad"

Sink = Callable[[list[Reading]], None]


@dataclass(frozen=True, slots=True)
class PointRule:
    """The resolved options of one point."""

    report: str = "always"  # always | on_change | deadband
    deadband: float = 0.0  # absolute, or a fraction of the last value sent when `relative`
    relative: bool = False
    heartbeat_ms: int | None = None  # None: never confirm an unchanged value
    aggregate: AggregateConfig | None = None

    @property
    def passes_all(self) -> bool:
        return self.report == "always" and self.aggregate is None


def resolve_rule(levels: list[Any]) -> PointRule:
    """Field by field, the most specific level that sets an option wins (point, processing entry, device)."""

    def first(field: str) -> Any:
        for level in levels:
            value = getattr(level, field, None) if level is not None else None
            if value is not None:
                return value
        return None

    report = "always"
    for level in levels:  # a level that sets only `deadband` means report: deadband at that level
        own = getattr(level, "report", None) or (
            "deadband" if getattr(level, "deadband", None) is not None else None
        )
        if own is not None:
            report = own
            break
    deadband = first("deadband")
    amount, relative = 0.0, False
    if report == "deadband" and deadband is not None:
        if isinstance(deadband, str):
            amount, relative = float(deadband.rstrip("%")) / 100.0, True
        else:
            amount = float(deadband)
    heartbeat = first("heartbeat")
    if heartbeat is None:
        heartbeat = None if report == "always" else DEFAULT_HEARTBEAT
    heartbeat_ms = int(heartbeat * 1000) if heartbeat else None  # heartbeat: 0 turns confirmations off
    aggregate = None
    for level in levels:  # a level that sets its own report mode, below the aggregate's, opts its point out
        if getattr(level, "aggregate", None) is not None:
            aggregate = level.aggregate
            break
        if getattr(level, "report", None) is not None or getattr(level, "deadband", None) is not None:
            break
    rule = PointRule(report, amount, relative, heartbeat_ms, aggregate)
    if aggregate is not None:
        return rule
    # Shared: the points of a gateway resolve to a handful of distinct rules (10,000 points, one rule each,
    # were 0.7 MiB). Rules with an aggregate are left out: their config model need not be hashable.
    return _RULES.setdefault(rule, rule)


_RULES: dict[PointRule, PointRule] = {}  # every distinct rule without an aggregate, by value


def is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def changed(last: Value, value: Value, rule: PointRule) -> bool:
    """Whether `value` differs enough from the last value sent to be sent itself."""
    if not (is_number(last) and is_number(value)):
        return type(last) is not type(value) or last != value
    a, b = float(last), float(value)
    if math.isnan(a) or math.isnan(b):
        return not (math.isnan(a) and math.isnan(b))
    threshold = rule.deadband * abs(a) if rule.relative else rule.deadband
    return abs(b - a) > threshold


@dataclass(slots=True)
class _Sent:
    value: Value
    quality: str | None
    ts: int


@dataclass(slots=True)
class _Window:
    """One point's open aggregation window [start, end)."""

    start: int
    end: int
    unit: str | None
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    first: float = 0.0
    last: float = 0.0
    uncertain: bool = False
    ints: bool = True  # every value an integer: min, max, first, last and sum stay integers

    def add(self, value: float, uncertain: bool, integer: bool) -> None:
        if self.count == 0:
            self.first = value
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.last = value
        self.uncertain = self.uncertain or uncertain
        self.ints = self.ints and integer

    def figure(self, function: str) -> Value:
        if function == "count":
            return self.count
        if function == "mean":
            return self.total / self.count
        value = {
            "min": self.low,
            "max": self.high,
            "sum": self.total,
            "first": self.first,
            "last": self.last,
        }[function]
        return int(value) if self.ints and abs(value) < 2**53 else value


class DeviceProcessor:
    """The processing of one device's readings; called as the DeviceTask's sink."""

    def __init__(
        self,
        device: str,
        config: Any,
        sink: Sink,
        clock: ClockState,
        now: Callable[[], int] = now_ms,
    ) -> None:
        self.device = device
        self.config = config
        self.sink = sink
        self.clock = clock
        self.now = now
        self.counters: dict[str, int] = {
            "received": 0,
            "sent": 0,
            "suppressed": 0,
            "bad": 0,
            "late": 0,
            "windows": 0,
        }
        self._rules: dict[str, PointRule] = {}
        self._sent: dict[str, _Sent] = {}
        self._windows: dict[str, _Window] = {}
        self._closed_until: dict[str, int] = {}  # per point: readings stamped before this are late
        self._timers: set[asyncio.TimerHandle] = set()

    # -- rules -----------------------------------------------------------------------------------------

    def rule(self, point: str) -> PointRule:
        rule = self._rules.get(point)
        if rule is None:
            points = getattr(self.config, "points", None)
            processing = getattr(self.config, "processing", None) or {}
            own = points.get(point) if isinstance(points, dict) else None
            rule = self._rules[point] = resolve_rule([own, processing.get(point), self.config])
        return rule

    # -- the sink --------------------------------------------------------------------------------------

    def __call__(self, readings: list[Reading]) -> None:
        if not readings:
            return
        # Once per batch, not per reading: the clock's state and the counters (every polled value comes here).
        synced = self.clock.synced()
        rules = self._rules
        counters = self.counters
        out: list[Reading] = []
        received = 0
        for r in readings:
            if r.quality is None and not synced:
                r = r._replace(quality=UNCERTAIN)
            point = r.point
            if point in EVENT_POINTS:
                # A failure or a recovery: whatever comes next from the device is news, whatever its value.
                self._sent.clear()
                out.append(r)
                continue
            received += 1
            if r.quality == BAD:
                counters["bad"] += 1
                continue
            rule = rules.get(point) or self.rule(point)
            if rule.passes_all:
                # `report: always` without an aggregate: nothing to remember (the last value sent is only
                # read by the other report modes, and a point's rule never changes in a processor's life).
                out.append(r)
            elif rule.aggregate is not None and is_number(r.value):
                self._aggregate(r, rule.aggregate, out)
            elif self._worth_sending(r, rule):
                self._sent[point] = _Sent(r.value, r.quality, r.ts)
                out.append(r)
            else:
                counters["suppressed"] += 1
        counters["received"] += received
        if out:
            counters["sent"] += len(out)
            self.sink(out)

    def _worth_sending(self, r: Reading, rule: PointRule) -> bool:
        sent = self._sent.get(r.point)
        if sent is None or sent.quality != r.quality:
            return True
        if rule.heartbeat_ms is not None and r.ts - sent.ts >= rule.heartbeat_ms:
            return True
        return changed(sent.value, r.value, rule)

    # -- aggregates ------------------------------------------------------------------------------------

    def _aggregate(self, r: Reading, agg: AggregateConfig, out: list[Reading]) -> None:
        if r.ts < self._closed_until.get(r.point, -(2**62)):
            # Stamped inside a window already sent: counting it in a later window would misplace it.
            self.counters["late"] += 1
            log.debug(
                "%s.%s: value at %d arrived after its window closed; dropped", self.device, r.point, r.ts
            )
            return
        win = self._windows.get(r.point)
        if win is not None and r.ts >= win.end:
            self._close(r.point, win, agg, out)
            win = None
        if win is None:
            length = int(agg.window * 1000)
            start = r.ts - r.ts % length  # aligned on the clock (UTC epoch multiples)
            win = self._windows[r.point] = _Window(start, start + length, r.unit)
            self._schedule(win.end + WINDOW_GRACE_MS)
        win.add(float(r.value), r.quality == UNCERTAIN, isinstance(r.value, int))

    def _close(self, point: str, win: _Window, agg: AggregateConfig, out: list[Reading]) -> None:
        del self._windows[point]
        self._closed_until[point] = win.end
        self.counters["windows"] += 1
        quality = UNCERTAIN if win.uncertain else None
        for fn in agg.functions:
            unit = None if fn == "count" else win.unit
            out.append(Reading(self.device, f"{point}.{fn}", win.end, win.figure(fn), unit, quality))

    def close_due(self, now: int | None = None) -> None:
        """Send the windows whose end (plus a grace for readings on their way) has passed."""
        t = self.now() if now is None else now
        out: list[Reading] = []
        for point, win in list(self._windows.items()):
            if win.end + WINDOW_GRACE_MS <= t:
                agg = self.rule(point).aggregate
                assert agg is not None
                self._close(point, win, agg, out)
        if out:
            self.counters["sent"] += len(out)
            self.sink(out)

    def _schedule(self, at_ms: int) -> None:
        """A timer so that a window closes even when its device falls silent (none outside an event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max((at_ms - self.now()) / 1000.0, 0.0)
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self.close_due()

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def close(self) -> None:
        """Cancel the window timers (open windows are not sent: they would claim a period not all seen)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()


def processor_for(driver: Driver[Any], config: FieldgateConfig, sink: Sink) -> DeviceProcessor:
    """The runtime's hook: the processing of one device, feeding `sink` (the store writer)."""
    return DeviceProcessor(driver.device, driver.config, sink, shared_clock(config.gateway.clock))
