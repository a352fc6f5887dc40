"""Edge processing with an injected clock: report by exception, heartbeats, aggregates, quality, events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config.base import DeviceConfigBase
from agent.driver import Driver, DriverContext, SharedResources
from agent.errors import DeviceUnreachable
from agent.pipeline.clock import FixedClock
from agent.pipeline.health import DeviceHealth
from agent.pipeline.polling import DeviceTask
from agent.pipeline.processing import DeviceProcessor, PointRule, changed, resolve_rule
from agent.pipeline.reading import Reading, Value
from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.profile import load_profile, merge_profile

T0 = 1_700_000_020_000  # 40 s past a minute boundary: the first 1m window is partial
MIN = 60_000


def device(**options: Any) -> DeviceConfigBase:
    return DeviceConfigBase(driver="fake", **options)


class Sent:
    """The store writer's side of the processor: every batch it was handed."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []

    def __call__(self, readings: list[Reading]) -> None:
        self.batches.append(list(readings))

    @property
    def readings(self) -> list[Reading]:
        return [r for b in self.batches for r in b]

    def values(self, point: str | None = None) -> list[Value]:
        return [r.value for r in self.readings if point is None or r.point == point]


def make(config: Any, synced: bool = True, now: int = T0) -> tuple[DeviceProcessor, Sent, FixedClock]:
    sent = Sent()
    clock = FixedClock(synced)
    return DeviceProcessor("dev", config, sent, clock, now=lambda: now), sent, clock


def feed(proc: DeviceProcessor, point: str, series: list[tuple[int, Value]], unit: str | None = None) -> None:
    for ts, value in series:
        proc([Reading("dev", point, ts, value, unit)])


# --- report modes ---------------------------------------------------------------------------------------


def test_default_is_always_and_good_quality_is_omitted() -> None:
    proc, sent, _ = make(device())
    feed(proc, "v", [(T0, 1.0), (T0 + 1000, 1.0), (T0 + 2000, 1.0)])
    assert sent.values() == [1.0, 1.0, 1.0]
    assert all(r.quality is None for r in sent.readings)


def test_on_change_sends_first_value_changes_and_heartbeat() -> None:
    proc, sent, _ = make(device(report="on_change", heartbeat="5m"))
    series = [(T0 + i * 10_000, v) for i, v in enumerate([1, 1, 1, 2, 2, 1])]
    feed(proc, "n", series)
    assert [(r.ts - T0, r.value) for r in sent.readings] == [(0, 1), (30_000, 2), (50_000, 1)]
    # Unchanged for 5 minutes after the last value sent: confirmed once, then silent again.
    feed(proc, "n", [(T0 + 50_000 + 299_000, 1), (T0 + 50_000 + 300_000, 1), (T0 + 50_000 + 310_000, 1)])
    assert [r.ts - T0 for r in sent.readings][3:] == [350_000]
    assert proc.counters["suppressed"] == 5


def test_heartbeat_defaults_to_15_minutes_when_not_always() -> None:
    assert resolve_rule([device(report="on_change")]).heartbeat_ms == 900_000
    assert resolve_rule([device()]).heartbeat_ms is None
    assert resolve_rule([device(report="on_change", heartbeat="0s")]).heartbeat_ms is None


def test_absolute_deadband_compares_with_the_last_value_sent() -> None:
    proc, sent, _ = make(device(deadband=0.5))  # deadband alone implies report: deadband
    feed(
        proc,
        "v",
        [(T0 + i * 1000, v) for i, v in enumerate([230.0, 230.4, 230.5, 230.6, 230.9, 231.2, 230.0])],
    )
    # 230.5 is exactly on the band (not beyond); 230.9 is within 0.5 of 230.6; the slow drift still shows.
    assert sent.values() == [230.0, 230.6, 231.2, 230.0]


def test_relative_deadband() -> None:
    proc, sent, _ = make(device(report="deadband", deadband="2%"))
    feed(
        proc,
        "p",
        [(T0 + i * 1000, v) for i, v in enumerate([100.0, 101.9, 102.1, 104.0, 104.2, 0.0, 0.0, 0.1])],
    )
    assert sent.values() == [100.0, 102.1, 104.2, 0.0, 0.1]  # from 0, any change is beyond 2 %


def test_non_numbers_under_a_deadband_are_sent_on_change() -> None:
    rule = PointRule(report="deadband", deadband=5.0)
    assert changed(True, False, rule) and not changed("on", "on", rule) and changed("on", "off", rule)
    assert changed(1, True, rule)  # a type change is news, even when 1 == True
    assert changed(float("nan"), 1.0, rule) and not changed(float("nan"), float("nan"), rule)


def test_point_options_override_the_device_field_by_field() -> None:
    cfg = ModbusDeviceConfig(
        bus="lan",
        report="on_change",
        heartbeat="10m",
        points={
            "voltage": {"table": "input", "address": 0, "type": "float32", "deadband": 1.0},
            "status": {"table": "input", "address": 2, "report": "always"},
            "energy": {"table": "input", "address": 4, "type": "float32"},
        },
    )
    proc, sent, _ = make(cfg)
    assert proc.rule("voltage") == PointRule("deadband", 1.0, False, 600_000, None)
    assert proc.rule("status").report == "always" and proc.rule("status").heartbeat_ms == 600_000
    assert proc.rule("energy").report == "on_change"
    for i in range(3):
        proc(
            [
                Reading("dev", p, T0 + i * 1000, v)
                for p, v in (("voltage", 230.0), ("status", 0), ("energy", 5.0))
            ]
        )
    assert [r.point for r in sent.readings] == ["voltage", "status", "energy", "status", "status"]


def test_processing_map_for_drivers_without_point_definitions() -> None:
    cfg = device(report="always", processing={"pm10": {"report": "deadband", "deadband": 2}})
    proc, sent, _ = make(cfg)
    for i, (a, b) in enumerate([(10, 10), (11, 11), (12, 13)]):
        proc([Reading("dev", "pm2_5", T0 + i, a), Reading("dev", "pm10", T0 + i, b)])
    assert sent.values("pm2_5") == [10, 11, 12] and sent.values("pm10") == [10, 13]


def test_profile_device_section_carries_device_defaults(tmp_path: Path) -> None:
    prof = tmp_path / "meter.yaml"
    prof.write_text(
        "manufacturer: X\nmodel: Y\ndescription: Z\n"
        "device: {report: on_change, heartbeat: 5m}\n"
        "points:\n  v: {table: input, address: 0, type: float32, deadband: 0.5}\n"
        "  f: {table: input, address: 2}\n"
    )
    cfg = merge_profile(ModbusDeviceConfig(bus="lan", profile=str(prof)), load_profile(str(prof)))
    proc, _, _ = make(cfg)
    assert proc.rule("v") == PointRule("deadband", 0.5, False, 300_000, None)
    assert proc.rule("f") == PointRule("on_change", 0.0, False, 300_000, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"deadband": "abc"}, "not a deadband"),
        ({"deadband": -1}, "cannot be negative"),
        ({"report": "on_change", "deadband": 1}, "does not apply to report: on_change"),
        ({"report": "deadband"}, "needs a 'deadband'"),
        ({"processing": {"x": {"report": "deadband"}}}, "processing.x: report: deadband needs"),
        ({"aggregate": {"window": "500ms"}}, "at least 1s"),
        ({"aggregate": {"window": "1m", "functions": ["median"]}}, "median"),
        ({"report": "sometimes"}, "always"),
    ],
)
def test_contradictory_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        device(**options)
    assert message in str(err.value)


def test_point_deadband_rules_are_checked_with_the_device_deadband() -> None:
    ok = ModbusDeviceConfig(bus="b", deadband="1%", points={"p": {"address": 0, "report": "deadband"}})
    assert resolve_rule([ok.points["p"], None, ok]) == PointRule("deadband", 0.01, True, 900_000, None)
    with pytest.raises(ValidationError, match=r"points\.p: report: deadband needs"):
        ModbusDeviceConfig(bus="b", points={"p": {"address": 0, "report": "deadband"}})


# --- quality --------------------------------------------------------------------------------------------


def test_readings_before_clock_sync_are_uncertain_and_sync_is_news() -> None:
    proc, sent, clock = make(device(report="on_change"), synced=False)
    feed(proc, "v", [(T0, 5), (T0 + 1000, 5)])
    clock.is_synced = True
    feed(proc, "v", [(T0 + 2000, 5), (T0 + 3000, 5)])
    assert [(r.value, r.quality) for r in sent.readings] == [(5, "uncertain"), (5, None)]


def test_driver_quality_is_kept_and_its_changes_are_news() -> None:
    proc, sent, _ = make(device(report="on_change"))
    for ts, q in [(T0, None), (T0 + 1, "uncertain"), (T0 + 2, "uncertain"), (T0 + 3, None)]:
        proc([Reading("dev", "co2", ts, 400, "ppm", q)])
    assert [r.quality for r in sent.readings] == [None, "uncertain", None]


def test_bad_values_are_never_sent() -> None:
    proc, sent, _ = make(device())
    proc([Reading("dev", "v", T0, 1, None, "bad"), Reading("dev", "w", T0, 2)])
    assert sent.values() == [2] and proc.counters["bad"] == 1


def test_device_events_pass_and_make_the_next_value_news() -> None:
    proc, sent, _ = make(device(report="on_change"), synced=False)
    feed(proc, "v", [(T0, 1), (T0 + 1000, 1)])
    proc([Reading("dev", "_state", T0 + 2000, "failing"), Reading("dev", "_error", T0 + 2000, "no answer")])
    proc([Reading("dev", "_state", T0 + 9000, "ok")])
    feed(proc, "v", [(T0 + 9000, 1), (T0 + 10_000, 1)])
    assert [(r.point, r.value) for r in sent.readings] == [
        ("v", 1),
        ("_state", "failing"),
        ("_error", "no answer"),
        ("_state", "ok"),
        ("v", 1),
    ]
    assert all(r.quality == "uncertain" for r in sent.readings)  # the clock was not synchronised


# --- aggregates -----------------------------------------------------------------------------------------


def agg_device(functions: list[str] | None = None, window: str = "1m", **more: Any) -> DeviceConfigBase:
    agg: dict[str, Any] = {"window": window}
    if functions is not None:
        agg["functions"] = functions
    return device(aggregate=agg, **more)


def test_aggregates_across_window_edges_are_stamped_with_the_window_end() -> None:
    proc, sent, _ = make(agg_device(["min", "max", "mean", "first", "last", "sum", "count"]))
    edge = T0 - T0 % MIN + MIN  # the first minute boundary after T0 (20 s later)
    # Every 10 s from T0: 2 values in the first (partial) window, 6 in the next, then one in the third.
    series = [(T0 + i * 10_000, float(i)) for i in range(9)]
    feed(proc, "power_w", series, "W")
    first = {r.point: r for r in sent.readings if r.ts == edge}
    assert {p: r.value for p, r in first.items()} == {
        "power_w.min": 0.0,
        "power_w.max": 1.0,
        "power_w.mean": 0.5,
        "power_w.first": 0.0,
        "power_w.last": 1.0,
        "power_w.sum": 1.0,
        "power_w.count": 2,
    }
    assert first["power_w.mean"].unit == "W" and first["power_w.count"].unit is None
    second = {r.point: r.value for r in sent.readings if r.ts == edge + MIN}
    assert second["power_w.count"] == 6 and second["power_w.mean"] == 4.5 and second["power_w.max"] == 7.0
    assert len(sent.readings) == 14  # the third window is still open
    proc.close_due(edge + 2 * MIN + 1999)  # within the grace after its end: not yet
    assert len(sent.readings) == 14
    proc.close_due(edge + 2 * MIN + 2000)
    assert [r.value for r in sent.readings[14:] if r.point == "power_w.count"] == [1]
    assert all(r.ts == edge + 2 * MIN for r in sent.readings[14:])


def test_a_window_without_values_emits_nothing_and_late_values_are_dropped() -> None:
    proc, sent, _ = make(agg_device(["mean", "count"]))
    edge = T0 - T0 % MIN + MIN
    feed(proc, "p", [(T0, 1.0)])
    feed(proc, "p", [(edge + 3 * MIN + 5000, 3.0)])  # 3 empty windows in between
    assert [(r.ts, r.point, r.value) for r in sent.readings] == [(edge, "p.mean", 1.0), (edge, "p.count", 1)]
    feed(proc, "p", [(edge - 1000, 9.0)])  # stamped in the window already sent
    assert proc.counters["late"] == 1 and len(sent.readings) == 2
    proc.close_due(edge + 5 * MIN)
    assert [r.ts for r in sent.readings] == [edge, edge, edge + 4 * MIN, edge + 4 * MIN]


def test_aggregate_of_integers_stays_integer_and_quality_is_kept() -> None:
    proc, sent, clock = make(agg_device(["min", "max", "mean", "sum"]), synced=False)
    feed(proc, "n", [(T0, 2), (T0 + 1000, 5)])
    clock.is_synced = True
    feed(proc, "n", [(T0 + 2000, 4), (T0 + MIN, 1)])
    figures = {r.point: r.value for r in sent.readings}
    assert figures == {"n.min": 2, "n.max": 5, "n.mean": 11 / 3, "n.sum": 11}
    assert isinstance(figures["n.max"], int) and not isinstance(figures["n.max"], bool)
    assert {r.quality for r in sent.readings} == {"uncertain"}  # some values of the window were uncertain


def test_aggregated_device_passes_states_by_report_rules() -> None:
    proc, sent, _ = make(agg_device(["mean"], report="on_change"))
    proc([Reading("dev", "on", T0, True), Reading("dev", "power", T0, 80.0)])
    proc([Reading("dev", "on", T0 + 1000, True), Reading("dev", "power", T0 + 1000, 82.0)])
    proc([Reading("dev", "on", T0 + MIN, False)])
    assert [(r.point, r.value) for r in sent.readings] == [("on", True), ("on", False)]


async def test_window_timer_closes_windows_of_a_silent_device() -> None:
    """In the event loop, a window is closed by a timer even when no later value comes."""
    now = [T0]
    sent = Sent()
    proc = DeviceProcessor("dev", agg_device(["count"], window="1s"), sent, FixedClock(), now=lambda: now[0])
    start = T0 - T0 % 1000
    proc([Reading("dev", "p", start + 100, 1.0)])
    now[0] = start + 3000  # the timer reads this clock when it fires (its delay is 1.9 s of loop time)
    for _ in range(100):
        if sent.readings:
            break
        await asyncio.sleep(0.05)
    proc.close()
    assert [(r.point, r.ts, r.value) for r in sent.readings] == [("p.count", start + 1000, 1)]


# --- device events from the scheduler ---------------------------------------------------------------------


class FlakyDriver(Driver[DeviceConfigBase]):
    """Fails while `down`, else returns one value."""

    name = "flaky"

    def __init__(self) -> None:
        cfg = DeviceConfigBase(driver="flaky", poll="50ms", report="on_change")
        super().__init__("dev", cfg, DriverContext(SharedResources(), {}, Path(".")))
        self.down = True
        self.calls = 0

    async def read(self) -> list[Reading]:
        self.calls += 1
        if self.down:
            raise DeviceUnreachable("dev: no answer from unit 7")
        return [Reading("dev", "v", 0, 42)]


async def test_failing_device_sends_events_and_no_values_then_recovers() -> None:
    driver = FlakyDriver()
    sent = Sent()
    proc = DeviceProcessor("dev", driver.config, sent, FixedClock())
    task = DeviceTask(driver, DeviceHealth(driver="flaky"), proc)
    run = asyncio.create_task(task.run())
    try:
        for _ in range(200):
            if driver.calls >= 3:
                break
            if driver.calls:
                task.poll_now()  # skip the backoff
            await asyncio.sleep(0.01)
        assert [(r.point, r.value) for r in sent.readings] == [
            ("_state", "failing"),
            ("_error", "dev: no answer from unit 7"),
        ]  # once per episode, however many failed attempts
        driver.down = False
        task.poll_now()
        for _ in range(200):
            if len(sent.readings) >= 4:
                break
            await asyncio.sleep(0.01)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert [(r.point, r.value) for r in sent.readings][2:4] == [("_state", "ok"), ("v", 42)]
    assert all(r.point != "v" for r in sent.readings[:2])


def test_a_point_with_its_own_report_mode_is_not_aggregated() -> None:
    cfg = ModbusDeviceConfig(
        bus="b",
        aggregate={"window": "1m"},
        points={"energy": {"address": 0, "deadband": 10}, "power": {"address": 1}},
    )
    proc, _, _ = make(cfg)
    assert proc.rule("energy").aggregate is None and proc.rule("energy").report == "deadband"
    assert proc.rule("power").aggregate is not None


def test_points_with_the_same_options_share_one_rule() -> None:
    from agent.pipeline.processing import resolve_rule

    class Level:
        report = "on_change"
        deadband = None
        heartbeat = 60.0
        aggregate = None

    a, b = resolve_rule([Level(), None]), resolve_rule([None, Level()])
    assert a == b and a is b
    assert resolve_rule([]) is resolve_rule([None])  # the default rule, once


def test_report_always_keeps_no_last_value_and_passes_every_reading() -> None:
    from agent.pipeline.clock import FixedClock
    from agent.pipeline.processing import DeviceProcessor
    from agent.pipeline.reading import Reading

    out: list[list[Reading]] = []
    proc = DeviceProcessor("d", None, out.append, FixedClock(False))
    batch = [Reading("d", "a", 1, 5), Reading("d", "a", 2, 5), Reading("d", "b", 2, "x", quality="bad")]
    proc(batch)
    assert out == [
        [Reading("d", "a", 1, 5, quality="uncertain"), Reading("d", "a", 2, 5, quality="uncertain")]
    ]
    assert proc._sent == {}
    assert proc.counters["received"] == 3 and proc.counters["bad"] == 1 and proc.counters["sent"] == 2
