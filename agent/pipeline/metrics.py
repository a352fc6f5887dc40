"""`GET /metrics`: the daemon's figures in the Prometheus text exposition format 0.0.4, rendered on request.

Nothing here runs unless somebody scrapes. While the gateway works, the hot paths only add integers to the
plain dicts below (and the per-device figures of `agent.pipeline.health.DeviceHealth`); `render()` reads them, with the
runtime's own state (health, buffer figures, upstream links), and writes the text when `/metrics` is asked
for. No prometheus_client at run time: the format is a few lines of text per metric (docs/OPERATIONS.md,
"Monitoring"; the names are listed there and checked by tests/unit/test_metrics.py).

Counters here are process-wide: they start at 0 when the daemon starts and are never reset (a device
removed by a reload keeps its stored and sent counts until the next restart; its per-device figures kept in
its DeviceHealth go with it).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__

if TYPE_CHECKING:
    from agent.pipeline.health import Gateway
    from agent.pipeline.polling import DeviceTask
    from agent.upstream.contract import Upstream

    class Source(Gateway, Protocol):
        """What `render` reads of the running daemon (agent/runtime.py): what /api/status reads, and the
        device tasks (their processing's counters)."""

        @property
        def tasks(self) -> Mapping[str, DeviceTask]: ...


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Modbus RTU at 9600 baud answers a request in ~20-50 ms; a poll of several blocks on a busy bus
# takes a few hundred ms; timeouts are 1-30 s.
POLL_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Publish -> PUBACK: ~1 ms on loopback, tens of ms over 4G, seconds when the link is struggling.
PUBLISH_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

EVENT = "event"  # the device events `_state`, `_error` (points whose name starts with "_")
VALUE = "value"  # everything else: a device's points, aggregates


def kind_of(point: str) -> str:
    return EVENT if point[:1] == "_" else VALUE


class Histogram:
    """Cumulative-on-render histogram: one integer per bucket, incremented by `observe`."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in its bucket
        self.sum += value

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)


# -- process-wide counters (the hot paths add to these) ------------------------------------------------

STORED: dict[tuple[str, str], int] = {}  # (device, kind) -> readings committed to the buffer
SENT: dict[tuple[str, str, str], int] = {}  # (upstream, device, kind) -> readings acknowledged (PUBACK)
COMMANDS: dict[str, int] = {}  # outcome (the audit's: executed, failed, refused, duplicate, unknown) -> n
INFLIGHT: dict[str, int] = {}  # upstream -> messages published, PUBACK not yet received
PUBLISH_LATENCY: dict[str, Histogram] = {}  # upstream -> publish-to-PUBACK seconds
STARTED = time.time()
OUTCOMES = ("executed", "failed", "refused", "duplicate", "unknown")  # always exposed, 0 until one happens


def count_stored(rows: Iterable[Any]) -> None:
    """Rows just committed to the buffer (anything with `device` and `point`): ~0.3 us per row. (A Counter
    over map/zip measured no faster for a poll's batch of 20.)"""
    get = STORED.get
    for r in rows:
        key = (r.device, EVENT if r.point[:1] == "_" else VALUE)
        STORED[key] = get(key, 0) + 1


def publish_started(upstream: str, messages: int) -> float:
    INFLIGHT[upstream] = INFLIGHT.get(upstream, 0) + messages
    return time.monotonic()


def publish_ended(upstream: str, messages: int) -> None:
    INFLIGHT[upstream] = INFLIGHT.get(upstream, 0) - messages


def published(upstream: str, rows: Iterable[Any], started: float) -> None:
    """The broker acknowledged every message carrying `rows` (published at monotonic `started`)."""
    hist = PUBLISH_LATENCY.get(upstream)
    if hist is None:
        hist = PUBLISH_LATENCY[upstream] = Histogram(PUBLISH_BUCKETS)
    hist.observe(time.monotonic() - started)
    get = SENT.get
    for r in rows:
        key = (upstream, r.device, EVENT if r.point[:1] == "_" else VALUE)
        SENT[key] = get(key, 0) + 1


def command_outcome(outcome: str) -> None:
    COMMANDS[outcome] = COMMANDS.get(outcome, 0) + 1


# -- the text format -------------------------------------------------------------------------------------


def escape_label(value: str) -> str:
    """A label value in the text format: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items()) + "}"


class Writer:
    """Accumulates families; each family's HELP and TYPE once, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
    ) -> None:
        self.names.append(name)
        self.lines.append(f"# HELP {name} {escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {format_value(value)}")

    def histogram(
        self, name: str, help_text: str, series: Iterable[tuple[dict[str, str], Histogram]]
    ) -> None:
        self.names.append(name)
        self.lines.append(f"# HELP {name} {escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, hist in series:
            cumulative = 0
            for bound, n in zip((*hist.bounds, math.inf), hist.counts, strict=True):
                cumulative += n
                le = "+Inf" if math.isinf(bound) else format_value(bound)
                self.lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
            self.lines.append(f"{name}_sum{_labels(labels)} {format_value(hist.sum)}")
            self.lines.append(f"{name}_count{_labels(labels)} {cumulative}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def _sorted(items: Iterable[tuple[Any, int]]) -> Iterator[tuple[Any, int]]:
    return iter(sorted(items, key=lambda kv: kv[0]))


def bus_of(name: str, cfg: Any) -> str:
    """The poll-duration histogram a device counts in: its bus, its serial port, or itself."""
    return str(getattr(cfg, "bus", None) or getattr(cfg, "port", None) or name)


def render(rt: Source) -> bytes:
    """The exposition text of a running `agent.runtime.Runtime`: its state (the figures /api/status
    shows, read from the same objects) and the counters above."""
    w = Writer()
    health = dict(rt.health)
    buses = {name: bus_of(name, cfg) for name, cfg in rt.config.device_items()}
    processing: dict[str, dict[str, int]] = {}
    for name, task in rt.tasks.items():
        counters = getattr(task.sink, "counters", None)  # a processor's (processing.py); a bare sink has none
        if isinstance(counters, dict):
            processing[name] = counters
    st = rt.last_stats
    writer = rt.writer
    buf: dict[str, Any] = {
        "pending": st.pending if st else 0,
        "oldest_ts": st.oldest_ts if st else None,
        "evicted": st.evicted if st else 0,
        "bytes": st.bytes if st else 0,
        "recovered": st.recovered if st else 0,
        "disk_errors": st.disk_errors if st else 0,
        "dropped": writer.dropped if writer else 0,
    }
    uplinks: dict[str, Upstream] = {}
    if rt.uplink is not None:
        uplinks["mqtt"] = rt.uplink
    uplinks.update(rt.extra_uplinks)
    w.family(
        "fieldgate_build_info",
        "gauge",
        "Always 1; the daemon's version and the gateway's id as labels.",
        [({"version": __version__, "gateway": str(rt.config.gateway.id)}, 1)],
    )
    w.family(
        "fieldgate_start_time_seconds",
        "gauge",
        "When the daemon started, in seconds since the Unix epoch.",
        [({}, round(STARTED, 3))],
    )

    # -- devices
    polled = [
        ({"device": name, "kind": kind}, n)
        for name, h in sorted(health.items())
        for kind, n in sorted(h.polled.items())
    ]
    w.family("fieldgate_readings_polled_total", "counter", "Readings returned by device polls.", polled)
    w.family(
        "fieldgate_readings_stored_total",
        "counter",
        "Readings committed to the buffer (after edge processing); kind=event are the _state/_error events.",
        [({"device": d, "kind": k}, n) for (d, k), n in _sorted(STORED.items())],
    )
    w.family(
        "fieldgate_readings_sent_total",
        "counter",
        "Readings acknowledged by an MQTT upstream (PUBACK).",
        [({"upstream": u, "device": d, "kind": k}, n) for (u, d, k), n in _sorted(SENT.items())],
    )
    w.family(
        "fieldgate_device_poll_errors_total",
        "counter",
        "Failed poll cycles (timeouts, device errors) per device.",
        [({"device": name}, h.errors) for name, h in sorted(health.items())],
    )
    w.family(
        "fieldgate_device_failing",
        "gauge",
        "1 while the device's last attempt failed, else 0.",
        [({"device": name}, int(h.state == "failing")) for name, h in sorted(health.items())],
    )
    per_bus: dict[str, Histogram] = {}
    for name, h in health.items():
        if h.poll_seconds.count == 0:
            continue
        bus = buses.get(name, name)
        per_bus.setdefault(bus, Histogram(POLL_BUCKETS)).merge(h.poll_seconds)
    w.histogram(
        "fieldgate_poll_duration_seconds",
        "Duration of poll cycles (successful or not), per bus (a device with its own link is its own bus).",
        [({"bus": bus}, hist) for bus, hist in sorted(per_bus.items())],
    )
    drops = [
        ({"device": name, "reason": reason}, counters.get(reason, 0))
        for name, counters in sorted(processing.items())
        for reason in ("suppressed", "bad", "late")
    ]
    w.family(
        "fieldgate_processing_dropped_total",
        "counter",
        "Readings edge processing did not pass on: suppressed (unchanged, report by exception), "
        "bad (quality bad), late (after their aggregate window closed).",
        drops,
    )

    # -- buffer
    w.family("fieldgate_buffer_pending_readings", "gauge", "Readings not yet acknowledged upstream.",
             [({}, buf.get("pending", 0))])  # fmt: skip
    oldest = buf.get("oldest_ts")
    w.family(
        "fieldgate_buffer_oldest_timestamp_seconds",
        "gauge",
        "Time of the oldest pending reading, seconds since the epoch (absent when the buffer is empty).",
        [({}, oldest / 1000)] if oldest else [],
    )
    w.family("fieldgate_buffer_evicted_readings_total", "counter",
             "Readings dropped because the buffer reached storage.max_size.", [({}, buf.get("evicted", 0))])  # fmt: skip
    recoveries: list[tuple[dict[str, str], float]] = [({}, buf.get("recovered", 0))]
    w.family("fieldgate_buffer_recoveries_total", "counter",
             "Starts that found the buffer corrupt (moved aside) or behind its seq mark (seq resumed above it).",
             recoveries)  # fmt: skip
    w.family("fieldgate_buffer_recovered_readings_total", "counter",
             "Deprecated name of fieldgate_buffer_recoveries_total (it counts recoveries, not readings).",
             recoveries)  # fmt: skip
    w.family("fieldgate_buffer_bytes", "gauge", "Size of the buffer's SQLite files on disk.",
             [({}, buf.get("bytes", 0))])  # fmt: skip
    w.family("fieldgate_buffer_disk_errors_total", "counter", "Failed writes to the buffer (disk full, I/O).",
             [({}, buf.get("disk_errors", 0))])  # fmt: skip
    w.family("fieldgate_buffer_dropped_readings_total", "counter",
             "Readings lost from memory while the buffer could not be written.", [({}, buf.get("dropped", 0))])  # fmt: skip

    # -- upstreams
    names = sorted(uplinks)
    w.family("fieldgate_upstream_connected", "gauge", "1 while the upstream link is up.",
             [({"upstream": n}, int(bool(uplinks[n].connected))) for n in names])  # fmt: skip
    w.family(
        "fieldgate_upstream_reconnects_total",
        "counter",
        "Connections established after the first one (since the upstream was last (re)configured).",
        [({"upstream": n}, max(uplinks[n].connections - 1, 0)) for n in names],
    )
    w.family(
        "fieldgate_upstream_messages_total",
        "counter",
        "Messages carrying readings acknowledged by the upstream.",
        [({"upstream": n}, uplinks[n].messages) for n in names],
    )
    w.family(
        "fieldgate_upstream_inflight_messages",
        "gauge",
        "Messages published and not yet acknowledged (PUBACK).",
        [({"upstream": n}, INFLIGHT.get(n, 0)) for n in names],
    )
    w.histogram(
        "fieldgate_upstream_publish_latency_seconds",
        "Time from publishing a batch of readings to the broker's PUBACK of its last message.",
        [({"upstream": n}, hist) for n, hist in sorted(PUBLISH_LATENCY.items())],
    )

    # -- commands
    w.family(
        "fieldgate_commands_total",
        "counter",
        "Commands (MQTT, local API, schedules) by outcome: executed, failed, refused, duplicate, unknown.",
        [({"outcome": o}, n) for o, n in _sorted({**dict.fromkeys(OUTCOMES, 0), **COMMANDS}.items())],
    )
    return w.text()
