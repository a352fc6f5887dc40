"""Lamp schedules: step syntax, the state at any instant (DST included), start-up, overrides, retries."""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pydantic
import pytest

from agent.commands import OVERRIDE_LIMIT_MS, CommandProcessor, CommandsConfig
from agent.driver import Driver
from agent.errors import DeviceUnreachable
from agent.health import DeviceHealth
from agent.schedule import ScheduleConfig, ScheduleRunner, ScheduleTimeline, parse_at, schedule_problems
from agent.suntimes import sun_event
from tests.unit.test_commands import FakeLamp

PARIS = ZoneInfo("Europe/Paris")
LYON = (45.7640, 4.8357)

# The usual street-lighting night: full at sunset - 10 min, half from 23:00, off at sunrise + 10 min.
NIGHT = {
    "device": "lamp-1",
    "point": "dim",
    "steps": [
        {"at": "sunset-10m", "value": 100},
        {"at": "23:00", "value": 50},
        {"at": "sunrise+10m", "value": 0},
    ],
}


def local_ms(y: int, mo: int, d: int, h: int, mi: int = 0, s: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=PARIS).timestamp() * 1000)


def sun_ms(day: date, event: str, offset_min: int = 0) -> int:
    instant = sun_event(day, *LYON, "sunrise" if event == "sunrise" else "sunset")
    assert instant is not None
    return int(instant.timestamp() * 1000) + offset_min * 60_000


def timeline(doc: dict[str, Any] = NIGHT) -> ScheduleTimeline:
    return ScheduleTimeline(ScheduleConfig.model_validate(doc), PARIS, *LYON)


class FakeTime:
    def __init__(self, ts: int) -> None:
        self.ts = ts

    def __call__(self) -> int:
        return self.ts

    async def sleep(self, seconds: float) -> None:
        self.ts += int(seconds * 1000)
        await asyncio.sleep(0)


class Rig:
    """A processor over a fake lamp, a runner on a fake clock, and the results the hook received."""

    def __init__(self, tmp_path: Path, start: int, doc: dict[str, Any] = NIGHT) -> None:
        self.time = FakeTime(start)
        self.lamp = FakeLamp()
        self.health = {"lamp-1": DeviceHealth(driver="fake", state="ok")}
        drivers: dict[str, Driver[Any]] = {"lamp-1": self.lamp}
        self.proc = CommandProcessor(
            tmp_path / "commands.db", drivers.get, self.health.get, CommandsConfig(), clock=self.time
        )
        self.proc.open()
        self.results: list[dict[str, Any]] = []
        self.runner = ScheduleRunner(
            "night",
            ScheduleConfig.model_validate(doc),
            self.proc,
            latitude=LYON[0],
            longitude=LYON[1],
            clock=self.time,
            sleep=self.time.sleep,
            on_result=self.results.append,
        )

    async def run_until(self, ts: int) -> None:
        """Drive the runner step by step as its own loop would, jumping the clock to each wake-up."""
        while True:
            wake = await self.runner.step_once()
            if wake > ts:
                self.time.ts = ts
                return
            self.time.ts = max(wake, self.time.ts)

    def dims(self) -> list[Any]:
        return [v for p, v in self.lamp.writes if p == "dim"]


@pytest.fixture
def rig_factory(tmp_path: Path) -> Any:
    rigs: list[Rig] = []

    def make(start: int, doc: dict[str, Any] = NIGHT) -> Rig:
        rig = Rig(tmp_path, start, doc)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.proc.close()


# -- syntax --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "clock", "sun", "offset"),
    [
        ("23:00", "23:00:00", None, 0),
        ("6:05:30", "06:05:30", None, 0),
        ("sunset", None, "sunset", 0),
        ("sunset-10m", None, "sunset", -600),
        ("sunrise + 1h", None, "sunrise", 3600),
        ("sunrise+90s", None, "sunrise", 90),
    ],
)
def test_step_times_parse(text: str, clock: str | None, sun: str | None, offset: float) -> None:
    spec = parse_at(text)
    assert (spec.clock.isoformat() if spec.clock else None, spec.sun, spec.offset_s) == (clock, sun, offset)


@pytest.mark.parametrize(
    "text", ["24:00", "23:60", "sundown", "sunset-10", "sunset*2m", "sunrise+7h", "", "11pm"]
)
def test_bad_step_times_are_config_errors(text: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ScheduleConfig.model_validate({**NIGHT, "steps": [{"at": text, "value": 1}]})
    assert "steps.0.at" in str(info.value).replace("\n", ".").replace(" ", "")


def test_config_rules() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown timezone 'Europe/Pariss'"):
        ScheduleConfig.model_validate({**NIGHT, "timezone": "Europe/Pariss"})
    with pytest.raises(pydantic.ValidationError, match="give both 'device' and 'point'"):
        ScheduleConfig.model_validate({"device": "lamp-1", "steps": NIGHT["steps"]})
    with pytest.raises(pydantic.ValidationError, match="no target"):
        ScheduleConfig.model_validate({"steps": NIGHT["steps"]})
    with pytest.raises(pydantic.ValidationError, match="weekdays"):
        ScheduleConfig.model_validate(
            {**NIGHT, "steps": [{"at": "23:00", "value": 1, "weekdays": ["monday"]}]}
        )
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        ScheduleConfig.model_validate({**NIGHT, "stepz": []})


def test_cross_section_problems() -> None:
    config = SimpleNamespace(
        gateway=SimpleNamespace(location=None),
        devices={"lamp-1": object()},
        schedules={
            "night": ScheduleConfig.model_validate(NIGHT),
            "other": ScheduleConfig.model_validate(
                {
                    "targets": [{"device": "lamp-1", "point": "on"}, {"device": "lamp-7", "point": "on"}],
                    "steps": [{"at": "06:00", "value": True}],
                }
            ),
        },
    )

    assert schedule_problems(config) == [
        (("schedules", "night", "steps"), "sunset/sunrise steps need gateway.location (latitude, longitude)"),
        (("schedules", "other", "targets", 1, "device"), "unknown device 'lamp-7'"),
    ]


# -- the state at an instant -----------------------------------------------------------------------------


def test_state_at_arbitrary_instants() -> None:
    tl = timeline()
    jan15 = date(2026, 1, 15)
    cases = [
        (local_ms(2026, 1, 15, 3, 0), 50, local_ms(2026, 1, 14, 23, 0)),  # mid-night: yesterday's 23:00 step
        (local_ms(2026, 1, 15, 12, 0), 0, sun_ms(jan15, "sunrise", 10)),
        (sun_ms(jan15, "sunset", -10) - 1, 0, sun_ms(jan15, "sunrise", 10)),  # one ms before the step
        (sun_ms(jan15, "sunset", -10), 100, sun_ms(jan15, "sunset", -10)),  # at the step itself
        (local_ms(2026, 1, 15, 22, 59), 100, sun_ms(jan15, "sunset", -10)),
        (local_ms(2026, 1, 15, 23, 0), 50, local_ms(2026, 1, 15, 23, 0)),
    ]
    for ts, value, since in cases:
        current = tl.current(ts)
        assert current is not None and (current.value, current.ts) == (value, since), ts
    nxt = tl.next_after(local_ms(2026, 1, 15, 23, 0))
    assert nxt is not None and nxt.ts == sun_ms(date(2026, 1, 16), "sunrise", 10)


def test_fixed_steps_follow_the_local_clock_across_dst() -> None:
    tl = timeline({**NIGHT, "steps": [{"at": "23:00", "value": 50}, {"at": "02:30", "value": 20}]})
    utc = ZoneInfo("UTC")

    def utc_hm(day: date) -> list[str]:
        return [datetime.fromtimestamp(e.ts / 1000, utc).strftime("%H:%M") for e in tl.occurrences(day)]

    assert utc_hm(date(2026, 3, 28)) == ["01:30", "22:00"]  # CET, UTC+1
    # 29 March: 02:30 does not exist on the wall clock; it runs at 03:30 CEST (01:30 UTC).
    # 23:00 CEST = 21:00 UTC.
    assert utc_hm(date(2026, 3, 29)) == ["01:30", "21:00"]
    assert utc_hm(date(2026, 10, 24)) == ["00:30", "21:00"]
    # 25 October: 02:30 happens twice; the first one (CEST, 00:30 UTC) is used. 23:00 CET = 22:00 UTC.
    assert utc_hm(date(2026, 10, 25)) == ["00:30", "22:00"]


def test_sun_steps_across_the_dst_night() -> None:
    tl = timeline()
    events = tl.occurrences(date(2026, 3, 29))
    assert [e.value for e in events] == [0, 100, 50]
    local = [datetime.fromtimestamp(e.ts / 1000, PARIS).strftime("%H:%M") for e in events]
    # Lyon, 29 March 2026 (CEST): sunrise 07:27 -> +10 min, sunset 20:05 -> -10 min (see test_suntimes).
    assert local[0] in ("07:36", "07:37") and local[1] in ("19:54", "19:55") and local[2] == "23:00"


def test_weekdays_limit_a_step_and_the_state_looks_back_over_days() -> None:
    doc = {
        **NIGHT,
        "steps": [
            {"at": "08:00", "value": 10, "weekdays": ["sat"]},
            {"at": "20:00", "value": 0, "weekdays": ["sun"]},
        ],
    }
    tl = timeline(doc)
    # Wednesday 2026-01-14: the last step was Sunday 11th 20:00.
    current = tl.current(local_ms(2026, 1, 14, 12))
    assert current is not None and (current.value, current.ts) == (0, local_ms(2026, 1, 11, 20))
    nxt = tl.next_after(local_ms(2026, 1, 14, 12))
    assert nxt is not None and nxt.ts == local_ms(2026, 1, 17, 8)


# -- the runner -----------------------------------------------------------------------------------------


async def test_restart_in_the_middle_of_the_night_applies_the_night_level(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 10, 25, 2, 15))  # power back during the DST night
    await rig.run_until(local_ms(2026, 10, 25, 2, 16))
    assert rig.dims() == [50]
    entry = rig.proc.recent(1)[0]
    assert (entry["source"], entry["outcome"], entry["value"]) == ("schedule", "executed", 50)
    assert rig.results[0]["ok"] is True and rig.results[0]["source"] == "schedule"
    assert (rig.results[0]["device"], rig.results[0]["point"], rig.results[0]["step"]) == (
        "lamp-1",
        "dim",
        "23:00",
    )


async def test_a_whole_day_of_steps_in_order(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 12))
    await rig.run_until(local_ms(2026, 1, 16, 12))
    assert rig.dims() == [0, 100, 50, 0]
    times = [r["ts"] for r in rig.results]
    assert times[1:] == [
        sun_ms(date(2026, 1, 15), "sunset", -10),
        local_ms(2026, 1, 15, 23),
        sun_ms(date(2026, 1, 16), "sunrise", 10),
    ]


async def test_platform_command_overrides_until_the_next_step(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 20))
    await rig.run_until(local_ms(2026, 1, 15, 20, 5))
    assert rig.dims() == [100]
    result = await rig.proc.handle(b'{"id": "p1", "device": "lamp-1", "point": "dim", "value": 20}')
    assert result is not None and result["ok"] is True
    await rig.run_until(local_ms(2026, 1, 15, 22, 59))
    assert rig.dims() == [100, 20]  # the schedule left the platform's value alone
    await rig.run_until(local_ms(2026, 1, 15, 23, 1))
    assert rig.dims() == [100, 20, 50]  # and took over again at its next step


async def test_override_for_a_duration_then_resume(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 20))
    await rig.run_until(local_ms(2026, 1, 15, 21))
    payload = b'{"id": "p2", "device": "lamp-1", "point": "dim", "value": 0, "override": "30m"}'
    assert (await rig.proc.handle(payload, source="local") or {}).get("ok") is True
    await rig.run_until(local_ms(2026, 1, 15, 21, 29))
    assert rig.dims() == [100, 0]
    await rig.run_until(local_ms(2026, 1, 15, 21, 31))
    assert rig.dims() == [100, 0, 100]  # resumed the current step: full power until 23:00


async def test_an_override_beyond_what_a_schedule_can_hold_is_refused_before_the_write(
    rig_factory: Any,
) -> None:
    # The runner shows and compares the override's end as a local datetime (ScheduleRunner._local), and
    # Python's datetime ends with the year 9999: a longer override used to be written to the lamp, then
    # fail in the runner's listener and come back as "internal error".
    rig = rig_factory(local_ms(2026, 1, 15, 20))
    await rig.run_until(local_ms(2026, 1, 15, 21))
    longest = (OVERRIDE_LIMIT_MS - rig.time.ts) // 86_400_000
    for n, too_long in enumerate((f"{longest + 1}d", "100000000d")):
        payload = orjson.dumps(
            {"id": f"long-{n}", "device": "lamp-1", "point": "dim", "value": 0, "override": too_long}
        )
        result = await rig.proc.handle(payload)
        assert result == {
            "id": f"long-{n}",
            "ok": False,
            "error": "'override' is longer than a schedule can hold: it must end before 9999-12-30"
            f" (at most {longest}d from now)",
        }, too_long
    # A duration too long to be a number at all is refused by the duration parser itself.
    payload = orjson.dumps(
        {"id": "long-inf", "device": "lamp-1", "point": "dim", "value": 0, "override": "1" + "0" * 400 + "d"}
    )
    result = await rig.proc.handle(payload) or {}
    assert result.get("ok") is False and "is not a finite duration" in result.get("error", ""), result
    assert rig.dims() == [100]  # none of them written
    assert rig.runner.state[("lamp-1", "dim")].override_until is None
    # The longest accepted one is written and held.
    payload = orjson.dumps(
        {"id": "longest", "device": "lamp-1", "point": "dim", "value": 0, "override": f"{longest}d"}
    )
    assert (await rig.proc.handle(payload) or {}).get("ok") is True
    assert rig.runner.state[("lamp-1", "dim")].override_until == rig.time.ts + longest * 86_400_000
    await rig.run_until(local_ms(2026, 1, 16, 23))
    assert rig.dims() == [100, 0]


async def test_a_refused_command_does_not_override(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 20))
    await rig.run_until(local_ms(2026, 1, 15, 21))
    assert (
        await rig.proc.handle(b'{"id": "p3", "device": "lamp-1", "point": "dim", "value": 300}') or {}
    ).get("ok") is False
    assert rig.runner.state[("lamp-1", "dim")].override_until is None


async def test_failed_step_is_retried_with_backoff_until_it_works(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 22, 50))
    await rig.run_until(local_ms(2026, 1, 15, 22, 55))
    rig.lamp.fail_with = DeviceUnreachable("no answer")
    await rig.run_until(local_ms(2026, 1, 15, 23, 7))
    failures = [r for r in rig.results if not r["ok"]]
    # 23:00:00, then after 30 s, 60 s, 120 s, 240 s: 23:00:30, 23:01:30, 23:03:30, 23:07:30 (not yet).
    assert [r["ts"] for r in failures] == [local_ms(2026, 1, 15, 23) + s * 1000 for s in (0, 30, 90, 210)]
    rig.lamp.fail_with = None
    await rig.run_until(local_ms(2026, 1, 15, 23, 8))
    assert rig.dims() == [100, 50] and rig.results[-1]["ts"] == local_ms(2026, 1, 15, 23, 7, 30)


async def test_a_failing_step_is_dropped_when_the_next_one_comes(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 22, 50))
    rig.health["lamp-1"].state = "failing"
    rig.health["lamp-1"].last_error = "timeout"
    await rig.run_until(local_ms(2026, 1, 16, 6, 0))
    assert rig.dims() == [] and rig.results and all(not r["ok"] for r in rig.results)
    assert {r["step"] for r in rig.results} == {"sunset-10m", "23:00"}
    assert rig.results[-1]["error"] == "device 'lamp-1' is failing: timeout"
    rig.health["lamp-1"].state = "ok"
    await rig.run_until(local_ms(2026, 1, 16, 12, 0))
    assert rig.dims() == [50, 0]  # the night level as soon as it works, then the morning step


async def test_run_loop_applies_then_sleeps_until_the_next_step(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 22, 0))
    task = asyncio.create_task(rig.runner.run())
    try:
        for _ in range(10_000):
            await asyncio.sleep(0)
            if len(rig.results) >= 2:  # reported, not only written
                break
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rig.dims() == [100, 50]
    assert rig.results[1]["ts"] == local_ms(2026, 1, 15, 23, 0)  # sleeps are capped but land on the step


async def test_actions_taken_offline_are_reported_in_order_once_the_platform_is_back(
    rig_factory: Any,
) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 22, 0))
    online: list[bool] = []  # empty: the platform is unreachable
    sent: list[dict[str, Any]] = []

    async def publish(doc: dict[str, Any]) -> bool:
        if not online:
            return False
        sent.append(doc)
        return True

    runner = ScheduleRunner(
        "night",
        ScheduleConfig.model_validate(NIGHT),
        rig.proc,
        latitude=LYON[0],
        longitude=LYON[1],
        clock=rig.time,
        sleep=rig.time.sleep,
        on_result=publish,
    )
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(10_000):
            await asyncio.sleep(0)
            if len(runner.unreported) >= 2:  # written and queued for the platform
                break
        assert rig.dims()[:2] == [100, 50]  # the lamps did not wait for the platform
        assert sent == [] and [d["value"] for d in runner.unreported][:2] == [100, 50]
        online.append(True)
        for _ in range(10_000):
            await asyncio.sleep(0)
            if len(sent) >= 2:
                break
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [d["value"] for d in sent][:2] == [100, 50]
    assert all(d["source"] == "schedule" and d["ok"] is True for d in sent)


async def test_a_disabled_schedule_does_nothing(rig_factory: Any) -> None:
    rig = rig_factory(local_ms(2026, 1, 15, 22, 0), {**NIGHT, "enabled": False})
    await asyncio.wait_for(rig.runner.run(), 5)
    assert rig.dims() == [] and rig.results == []
