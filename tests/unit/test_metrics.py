"""agent/pipeline/metrics.py's text format read back by prometheus_client's parser, and the last-hour rings of
agent/pipeline/health.py (the status page's trends)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pipeline.health import SLOTS, STEP_MS, Activity, DeviceHealth, DeviceHistory, Timeline, history_doc
from agent.pipeline.metrics import Histogram, Writer, escape_label, format_value
from agent.pipeline.reading import Reading

parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client (dev extra) is not installed"
)

T0 = 1_700_000_000_000 - 1_700_000_000_000 % STEP_MS  # the start of a minute


def parse(text: bytes) -> dict[str, object]:
    return {f.name: f for f in parser.text_string_to_metric_families(text.decode())}


@settings(max_examples=300, database=None, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_label_values_round_trip_through_the_official_parser(value: str) -> None:
    w = Writer()
    w.family("t_total", "counter", 'help with \\ and "quotes"\nand a line feed', [({"device": value}, 3)])
    fams = parse(w.text())
    (s,) = fams["t"].samples  # type: ignore[attr-defined]
    assert s.labels == {"device": value} and s.value == 3


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"), ('\\"', '\\\\\\"'), ("é µ", "é µ")],
)
def test_escape_label(raw: str, escaped: str) -> None:
    assert escape_label(raw) == escaped


def test_values() -> None:
    assert format_value(3) == "3"
    assert format_value(True) == "1"
    assert format_value(0.1) == "0.1"
    assert format_value(math.inf) == "+Inf"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"
    assert format_value(1e-7) == "1e-07"


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    w = Writer()
    w.histogram("x_seconds", "a histogram", [({"bus": "lan"}, h)])
    fams = parse(w.text())
    samples = {(s.name, s.labels.get("le")): s.value for s in fams["x_seconds"].samples}  # type: ignore[attr-defined]
    assert samples[("x_seconds_bucket", "0.1")] == 2  # 0.05 and 0.1 (le: less or equal)
    assert samples[("x_seconds_bucket", "1.0")] == 4
    assert samples[("x_seconds_bucket", "+Inf")] == 5
    assert samples[("x_seconds_count", None)] == 5
    assert samples[("x_seconds_sum", None)] == pytest.approx(4.65)
    merged = Histogram((0.1, 1.0))
    merged.merge(h)
    merged.merge(h)
    assert merged.counts == [4, 4, 2] and merged.count == 10


# -- the last hour ----------------------------------------------------------------------------------------


def test_point_history_means_per_minute_with_gaps() -> None:
    h = DeviceHistory()
    h.add([Reading("d", "p", T0 + 1_000, 10.0)])
    h.add([Reading("d", "p", T0 + 59_000, 20.0)])  # same minute: the mean
    h.add([Reading("d", "p", T0 + 2 * STEP_MS, 7)])
    series = h.series("p", T0 // STEP_MS + 2)
    assert len(series) == SLOTS
    assert series[-3:] == [15, None, 7]  # a minute without a value is None
    assert series[:-3] == [None] * (SLOTS - 3)
    # the next hour overwrites the ring, slot by slot
    h.add([Reading("d", "p", T0 + SLOTS * STEP_MS, 1.5)])
    later = h.series("p", T0 // STEP_MS + SLOTS)
    assert later[-1] == 1.5 and later[0] is None  # T0's minute left the window
    assert later[-SLOTS + 2 - 1] == 7  # still within the hour
    # a value older than what its slot holds now is outside the hour: ignored
    h.add([Reading("d", "p", T0 + 30_000, 99.0)])
    assert h.series("p", T0 // STEP_MS + SLOTS)[-1] == 1.5


def test_point_history_keeps_six_significant_digits() -> None:
    h = DeviceHistory()
    for v in (980.911, 1214.26, 1000.0):
        h.add([Reading("d", "p", T0, v)])
    assert h.series("p", T0 // STEP_MS)[-1] == pytest.approx(1065.06, abs=0.005)
    for v in (1000.1, -1000.0):  # cancellation: what float32 sums would get wrong (0.0499878)
        h.add([Reading("d", "q", T0, v)])
    assert h.series("q", T0 // STEP_MS)[-1] == 0.05
    h.add([Reading("d", "n", T0, 2**24 + 1)])  # an integer mean is shown whole
    assert h.series("n", T0 // STEP_MS)[-1] == 2**24 + 1


def _reference_means(
    feed: list[tuple[str, int, float]], end_minute: int
) -> dict[str, list[float | int | None]]:
    """What /api/history documents for each point (docs/STATUS_API.md): for each of the 60 minutes ending with
    `end_minute`, the mean of the values read in it, to 6 significant digits; None without a value."""
    out: dict[str, list[float | int | None]] = {}
    for point in dict.fromkeys(p for p, _, _ in feed):
        series: list[float | int | None] = []
        for minute in range(end_minute - SLOTS + 1, end_minute + 1):
            values = [v for p, ts, v in feed if p == point and ts // STEP_MS == minute]
            if not values:
                series.append(None)
                continue
            mean = math.fsum(values) / len(values)
            series.append(int(mean) if mean == int(mean) else float(f"{mean:.6g}"))
        out[point] = series
    return out


def _close(a: float | int | None, b: float | int | None) -> bool:
    """Equal to the 6 significant digits shown (the rings add in order; fsum is exact: the last digit of a
    mean that falls on a rounding edge may differ by one)."""
    if a is None or b is None:
        return a is b
    return a == b or abs(a - b) <= 1e-5 * max(abs(a), abs(b))


@settings(max_examples=200, database=None, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["v", "i", "p", "e"]),
            st.one_of(  # three hours, in any order; the second: few minutes, so slots are shared hour to hour
                st.integers(0, 3 * SLOTS * STEP_MS),
                st.builds(
                    lambda hour, minute, ms: (hour * SLOTS + minute) * STEP_MS + ms,
                    st.integers(0, 2),
                    st.integers(0, 3),
                    st.integers(0, STEP_MS - 1),
                ),
            ),
            st.one_of(st.integers(-(2**31), 2**31), st.floats(-1e6, 1e6, allow_nan=False)),
        ),
        max_size=120,
    ),
    st.one_of(st.integers(0, 3 * SLOTS), st.sampled_from([1, 3, SLOTS + 2, 2 * SLOTS + 3])),
)
def test_device_rings_give_each_points_mean_per_minute(feed: list[tuple[str, int, float]], end: int) -> None:
    """One ring of minutes per device, a column per point: each point's series is still the mean of its own
    values in each minute of the hour, whatever the other points of the device read and when (readings no
    later than the minute asked, as the gateway's clock stamps them)."""
    end_minute = T0 // STEP_MS + end
    feed = [(p, T0 + ts, v) for p, ts, v in feed if (T0 + ts) // STEP_MS <= end_minute]
    h = DeviceHealth(driver="modbus")
    for p, ts, v in feed:
        h.observe([Reading("d", p, ts, v)])
    got = h.trends(end_minute)["points"]
    want = _reference_means(feed, end_minute)
    assert list(got) == list(want)
    for point, series in want.items():
        assert all(_close(a, b) for a, b in zip(got[point], series, strict=True)), point


def test_device_rings_with_points_missing_from_cycles() -> None:
    """A point read in some minutes only (a point error, a bad quality) shows None in the others, though the
    device's other points moved the ring on."""
    h = DeviceHealth(driver="modbus")
    for m in range(SLOTS + 5):
        ts = T0 + m * STEP_MS + 1_000
        cycle = [Reading("d", "a", ts, float(m))]
        if m % 3 == 0:
            cycle.append(Reading("d", "b", ts, m * 10))
        cycle.append(Reading("d", "c", ts, 1.0, quality="bad" if m % 2 else None))
        h.observe(cycle)
    end = T0 // STEP_MS + SLOTS + 4
    points = h.trends(end)["points"]
    minutes = range(end - SLOTS + 1, end + 1)
    assert points["a"] == [m - T0 // STEP_MS for m in minutes]
    assert points["b"] == [
        (m - T0 // STEP_MS) * 10 if (m - T0 // STEP_MS) % 3 == 0 else None for m in minutes
    ]
    assert points["c"] == [None if (m - T0 // STEP_MS) % 2 else 1 for m in minutes]


def test_device_ring_counts_widen() -> None:
    """More than 255 values of a point in one minute (a chatty BLE sensor): its counts widen, the mean holds."""
    h = DeviceHistory()
    h.add([Reading("d", "other", T0, 5.0)])
    h.add(Reading("d", "p", T0 + k % STEP_MS, float(k % 7)) for k in range(70_000))
    assert h.counts.typecode == "I"
    assert h.series("p", T0 // STEP_MS)[-1] == float(f"{sum(k % 7 for k in range(70_000)) / 70_000:.6g}")
    assert h.series("other", T0 // STEP_MS)[-1] == 5


def test_activity_counts_ok_and_failed_cycles() -> None:
    a = Activity()
    a.ok(T0)
    a.ok(T0 + 10)
    a.error(T0 + STEP_MS)
    doc = a.doc(T0 // STEP_MS + 1)
    assert doc["ok"][-2:] == [2, 0] and doc["errors"][-2:] == [0, 1]
    assert len(doc["ok"]) == len(doc["errors"]) == SLOTS


def test_timeline_backlog_and_link() -> None:
    t = Timeline()
    t.sample(5, True, 1, ts=T0)
    t.sample(12, True, 1, ts=T0 + 5_000)
    t.sample(3, False, 1, ts=T0 + STEP_MS)
    t.sample(2, True, 2, ts=T0 + STEP_MS + 5_000)  # reconnected: counted down too
    t.sample(0, True, 2, ts=T0 + 3 * STEP_MS)
    doc = t.doc(T0 + 3 * STEP_MS + 10)
    assert doc["step_s"] == 60 and doc["end_ts"] == T0 + 4 * STEP_MS
    assert doc["pending"][-4:] == [12, 3, None, 0]  # the largest of the minute
    assert doc["connected"][-4:] == [1.0, pytest.approx(1 / 3, abs=0.001), None, 1.0]


def test_device_status_carries_the_trends() -> None:
    h = DeviceHealth(driver="modbus")
    h.observe([Reading("m", "power", T0 + 1000, 980.911, "W"), Reading("m", "on", T0 + 1000, True)])
    h.observe([Reading("m", "power", T0 + STEP_MS, 1214.26, "W"), Reading("m", "name", T0 + STEP_MS, "x")])
    h.failed(T0 + STEP_MS + 1)
    for r in (Reading("m", "power", T0 + STEP_MS, 1214.26, "W"),):
        h.last_readings[r.point] = r
    assert "history" not in h.status()["readings"]["power"]  # /api/status stays lean
    doc = history_doc({"m": h}, Timeline(), T0 + STEP_MS + 1)
    assert doc["ts"] == T0 + STEP_MS + 1 and doc["end_ts"] == T0 + 2 * STEP_MS and doc["step_s"] == 60
    trend = doc["devices"]["m"]
    assert trend["points"]["power"][-2:] == [980.911, 1214.26]
    assert set(trend["points"]) == {"power"}  # booleans and strings have no sparkline
    assert h.polled == {"value": 4}
    assert sum(trend["activity"]["ok"]) == 2 and sum(trend["activity"]["errors"]) == 1


# -- the route ----------------------------------------------------------------------------------------------


class _Source:
    def __init__(self, text: bytes | None = None, fail: bool = False) -> None:
        self.text, self.fail = text, fail

    def status(self) -> dict[str, object]:
        return {"devices": {}}

    async def refresh(self) -> None:
        pass


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, bytes]:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


async def test_metrics_route() -> None:
    from agent.control.localapi import LocalServer

    class WithMetrics(_Source):
        def metrics_text(self) -> bytes:
            if self.fail:
                raise RuntimeError("a bug")
            assert self.text is not None
            return self.text

    plain = LocalServer(_Source(), "127.0.0.1:0", None)  # a source without metrics or history: 404
    await plain.start()
    try:
        code, _, body = await _get(plain.port, "/metrics")
        assert code == 404 and b"no metrics" in body
        code, _, body = await _get(plain.port, "/api/history")
        assert code == 404 and b"no history" in body
    finally:
        await plain.aclose()
    source = WithMetrics(b"# HELP x_total x\n# TYPE x_total counter\nx_total 1\n")
    server = LocalServer(source, "127.0.0.1:0", None)
    await server.start()
    try:
        code, head, body = await _get(server.port, "/metrics")
        assert code == 200 and body == source.text
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        code, head, body = await _get(server.port, "/metrics", "HEAD")
        assert code == 200 and body == b"" and f"Content-Length: {len(source.text)}".encode() in head
        code, head, _ = await _get(server.port, "/metrics", "DELETE")
        assert code == 405 and b"Allow: GET, HEAD" in head
        source.fail = True  # a failure costs the request, never the server
        code, _, body = await _get(server.port, "/metrics")
        assert code == 500 and b"metrics" in body
        source.fail = False
        assert (await _get(server.port, "/metrics"))[0] == 200
    finally:
        await server.aclose()


def test_outlandish_readings_never_break_the_device_task() -> None:
    """A device's clock or value beyond what the rings hold (32-bit minutes, floats) is not drawn, and never
    raises in the scheduler's hands (OverflowError before the guard)."""
    h = DeviceHealth(driver="x")
    h.observe(
        [
            Reading("d", "big", T0, 10**400),
            Reading("d", "nan", T0, math.nan),
            Reading("d", "far", 2**62, 1.0),
            Reading("d", "past", -(2**40), 1.0),
            Reading("d", "ok", T0, 1.0),
        ]
    )
    h.observe([Reading("d", "ok", 2**62, 1.0)])  # the activity strip too
    h.observe([Reading("d", "ok", -(2**62), 1.0)])
    series = h.trends(T0 // STEP_MS)["points"]
    assert series["ok"][-1] == 1
    assert all(v is None for p, s in series.items() if p != "ok" for v in s)
