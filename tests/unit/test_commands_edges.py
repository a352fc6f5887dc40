"""CommandProcessor edges that mutation testing found untested (docs/TESTING.md, "Mutation testing"):
the stop-time drain, the local entry point `execute()` (made-up ids, expiry, in-flight and repeated ids),
the re-check under the device lock, the exact results of refused and timed-out writes, the read-back of
an unknown outcome, the audit's fields and bound, and the wording of refusals.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.control import commands as commands_module
from agent.control.commands import OUTCOME_UNKNOWN, CommandEvent, CommandProcessor
from agent.errors import WriteRefused
from agent.pipeline.health import DeviceHealth
from agent.pipeline.reading import Reading
from tests.unit.test_commands import T0, Clock, FakeLamp, cmd, make


@pytest.fixture
def lamp() -> FakeLamp:
    return FakeLamp()


@pytest.fixture
def health() -> dict[str, DeviceHealth]:
    return {"lamp-1": DeviceHealth(driver="fake", state="ok")}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def proc(tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock) -> Any:
    p = make(tmp_path, lamp, health, clock)
    yield p
    p.close()


class CountingLamp(FakeLamp):
    """FakeLamp that counts its reads, and can hold them (`read_gate`) or hang them (`read_hangs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.read_hangs = False
        self.asked: list[list[str]] = []

    async def read_points(self, names: list[str]) -> list[Reading]:
        self.asked.append(list(names))
        return await super().read_points(names)

    async def read(self) -> list[Reading]:
        self.reads += 1
        if self.read_hangs:
            await asyncio.Event().wait()
        return await super().read()


class StubbornLamp(FakeLamp):
    """A driver that ignores its first cancellation (its write timeout) and so outlives `write_timeout`."""

    async def write(self, point: str, value: Any) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # cancelled again only by the drain
        return value


async def settle(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def executing_row(db_path: Path, key: str) -> tuple[Any, ...] | None:
    conn = sqlite3.connect(db_path)
    try:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT result, device, point FROM results WHERE id = ?", (key,)
        ).fetchone()
        return row
    finally:
        conn.close()


# -- drain ---------------------------------------------------------------------------------------------


async def test_drain_lets_a_write_in_progress_finish(
    tmp_path: Path,
    lamp: FakeLamp,
    health: dict[str, DeviceHealth],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = make(tmp_path, lamp, health, clock, write_timeout="1s")
    try:
        lamp.gate = asyncio.Event()
        command = asyncio.create_task(p.handle(cmd(value=64)))
        await settle(lambda: lamp.active == 1)
        with caplog.at_level(logging.INFO, logger=commands_module.log.name):
            drain = asyncio.create_task(p.drain())
            await asyncio.sleep(0.01)
            assert not drain.done()  # waiting for the write, not cancelling it
            lamp.gate.set()
            await drain
        assert await command == {"id": "c1", "ok": True, "value": 64, "ts": T0}
        assert lamp.writes == [("dim", 64)]
        assert any("waiting for 1 command(s) in progress" in r.getMessage() for r in caplog.records)
    finally:
        p.close()


async def test_drain_with_nothing_in_progress_returns_at_once(proc: CommandProcessor) -> None:
    async with asyncio.timeout(1):
        await proc.drain()


async def test_drain_cancels_a_write_that_outlives_its_bound_and_keeps_it_executing(
    tmp_path: Path, health: dict[str, DeviceHealth], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    lamp = StubbornLamp()
    p = make(tmp_path, lamp, health, clock, write_timeout="50ms")
    try:
        command = asyncio.create_task(p.handle(cmd(id="stuck")))
        await settle(lambda: executing_row(tmp_path / "commands.db", '"stuck"') is not None)
        with caplog.at_level(logging.ERROR):
            async with asyncio.timeout(10):  # bounded: write_timeout + 1 s, never forever
                await p.drain()  # returns normally, the cancelled write is not an error of the stop
            await asyncio.sleep(0)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert not p._running  # every write has ended when drain returns
        assert command.done()
        # Cancelled mid-write: the id stays executing, so after a restart a repeat is never written again.
        assert executing_row(tmp_path / "commands.db", '"stuck"') == (None, "lamp-1", "dim")
    finally:
        p.close()


# -- execute(): the local entry point ------------------------------------------------------------------


async def test_made_up_ids_count_up_per_source_and_instant(proc: CommandProcessor) -> None:
    first = await proc.execute("lamp-1", "on", True, source="schedule")
    second = await proc.execute("lamp-1", "on", False, source="local")
    assert (first["id"], second["id"]) == (f"schedule-{T0}-1", f"local-{T0}-2")
    assert [e["id"] for e in proc.recent(2)] == [f"local-{T0}-2", f"schedule-{T0}-1"]


async def test_execute_without_id_still_honours_expiry_and_override(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    events: list[CommandEvent] = []
    proc.add_listener(events.append)
    late = await proc.execute("lamp-1", "dim", 10, source="local", expires_ts=T0 - 5)
    assert late["ok"] is False and late["error"] == f"expired: expires_ts {T0 - 5} is 5 ms in the past"
    assert lamp.writes == []
    done = await proc.execute("lamp-1", "dim", 10, source="schedule", override_s=900.0)
    assert done["ok"] is True
    assert [(e.source, e.override_s, e.ok) for e in events] == [("schedule", 900.0, True)]


async def test_execute_with_an_id_in_flight_waits_for_its_result(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    lamp.gate = asyncio.Event()
    first = asyncio.create_task(proc.execute("lamp-1", "dim", 20, source="local", command_id="L1"))
    await settle(lambda: lamp.active == 1)
    second = asyncio.create_task(proc.execute("lamp-1", "dim", 20, source="local", command_id="L1"))
    await asyncio.sleep(0.01)
    assert not second.done()  # the first attempt's result answers it
    lamp.gate.set()
    a, b = await asyncio.gather(first, second)
    assert a == b == {"id": "L1", "ok": True, "value": 20, "ts": T0}
    assert lamp.writes == [("dim", 20)]
    latest = proc.recent(1)[0]
    assert (latest["outcome"], latest["source"], latest["received_ts"], latest["result_value"]) == (
        "duplicate",
        "local",
        T0,
        20,
    )


async def test_execute_with_a_known_id_answers_from_the_database(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    first = await proc.execute("lamp-1", "dim", 30, source="local", command_id=17)
    again = await proc.execute("lamp-1", "dim", 99, source="cli", command_id=17)
    assert again == first == {"id": 17, "ok": True, "value": 30, "ts": T0}
    assert lamp.writes == [("dim", 30)]
    entry = proc.recent(1)[0]
    assert (entry["outcome"], entry["source"], entry["id"], entry["value"]) == ("duplicate", "cli", 17, 99)


async def test_an_unknown_outcome_without_a_stored_point_reads_back_the_requested_one(
    tmp_path: Path, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    lamp = CountingLamp()
    p = make(tmp_path, lamp, health, clock)
    try:
        # A row of a commands.db written before results kept the device and point.
        unknown = orjson.dumps({"id": "old", "ok": False, "error": OUTCOME_UNKNOWN}).decode()
        p._conn().execute("INSERT INTO results (id, ts, result) VALUES (?, ?, ?)", ('"old"', T0, unknown))
        lamp.values["dim"] = 33
        answer = await p.execute("lamp-1", "dim", 80, source="local", command_id="old")
        assert answer == {"id": "old", "ok": False, "error": OUTCOME_UNKNOWN, "value": 33, "ts": T0}
        assert lamp.writes == []
    finally:
        p.close()


# -- the re-check under the device lock ----------------------------------------------------------------


@pytest.mark.parametrize(("last_error", "said"), [("no answer from 10.0.0.7:502", None), (None, "no answer")])
async def test_a_device_failing_while_a_command_waits_refuses_it(
    proc: CommandProcessor,
    lamp: FakeLamp,
    health: dict[str, DeviceHealth],
    last_error: str | None,
    said: str | None,
) -> None:
    lamp.gate = asyncio.Event()
    first = asyncio.create_task(proc.handle(cmd(id="a", value=1)))
    await settle(lambda: lamp.active == 1)
    queued = asyncio.create_task(proc.handle(cmd(id="b", value=2)))
    await asyncio.sleep(0.01)
    health["lamp-1"].state = "failing"  # the first write's failure marks the device failing meanwhile
    health["lamp-1"].last_error = last_error
    lamp.gate.set()
    await first
    result = await queued
    assert result == {"id": "b", "ok": False, "error": f"device 'lamp-1' is failing: {said or last_error}"}
    assert lamp.writes == [("dim", 1)]
    assert proc.recent(1)[0]["outcome"] == "refused"


# -- exact results of refused and timed-out writes -----------------------------------------------------


async def test_a_write_the_device_refuses_is_a_failed_command(proc: CommandProcessor, lamp: FakeLamp) -> None:
    events: list[CommandEvent] = []
    proc.add_listener(events.append)
    lamp.fail_with = WriteRefused("point 'dim' is locked by the local switch")
    result = await proc.handle(cmd())
    assert result == {"id": "c1", "ok": False, "error": "point 'dim' is locked by the local switch"}
    assert proc.recent(1)[0]["outcome"] == "failed"
    assert [e.ok for e in events] == [False]


async def test_a_timed_out_write_is_a_failed_command(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock, write_timeout="20ms")
    events: list[CommandEvent] = []
    p.add_listener(events.append)
    lamp.gate = asyncio.Event()
    try:
        result = await p.handle(cmd())
        assert result == {
            "id": "c1",
            "ok": False,
            "error": "no answer within 0.02s; the write may or may not have reached the device",
        }
        assert p.recent(1)[0]["outcome"] == "failed"
        assert [e.ok for e in events] == [False]
    finally:
        p.close()


# -- read-back of an unknown outcome ------------------------------------------------------------------


async def unknown_outcome(p: CommandProcessor, lamp: FakeLamp, command_id: str = "u1") -> None:
    """Leave `command_id` with an unknown outcome (a driver bug during its write)."""
    lamp.fail_with = ZeroDivisionError("bug in a driver")
    await p.handle(cmd(id=command_id))
    lamp.fail_with = None


async def test_read_back_of_a_point_the_device_no_longer_has_reads_nothing(
    tmp_path: Path, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    lamp = CountingLamp()
    p = make(tmp_path, lamp, health, clock)
    try:
        await unknown_outcome(p, lamp)
        p._conn().execute("UPDATE results SET point = 'gone' WHERE id = '\"u1\"'")
        reads = lamp.reads
        answer = await p.handle(cmd(id="u1"))
        assert answer == {"id": "u1", "ok": False, "error": OUTCOME_UNKNOWN}
        assert lamp.reads == reads  # no request for a point it does not have
    finally:
        p.close()


async def test_read_back_of_a_device_no_longer_configured_is_answered_without_value(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock)
    try:
        await unknown_outcome(p, lamp)
        p._conn().execute("UPDATE results SET device = 'lamp-9' WHERE id = '\"u1\"'")
        assert await p.handle(cmd(id="u1")) == {"id": "u1", "ok": False, "error": OUTCOME_UNKNOWN}
        assert lamp.writes == []
    finally:
        p.close()


async def test_read_back_waits_for_the_write_in_progress_on_the_device(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock)
    try:
        await unknown_outcome(p, lamp)
        lamp.gate = asyncio.Event()
        writing = asyncio.create_task(p.handle(cmd(id="w", value=77)))
        await settle(lambda: lamp.active == 1)
        repeat = asyncio.create_task(p.handle(cmd(id="u1")))
        await asyncio.sleep(0.01)
        assert not repeat.done()  # the read-back queues behind the write like any other request
        lamp.gate.set()
        await writing
        assert await repeat == {"id": "u1", "ok": False, "error": OUTCOME_UNKNOWN, "value": 77, "ts": T0}
    finally:
        p.close()


async def test_read_back_that_hangs_is_bounded_and_logged(
    tmp_path: Path, health: dict[str, DeviceHealth], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    lamp = CountingLamp()
    p = make(tmp_path, lamp, health, clock, write_timeout="30ms")
    try:
        await unknown_outcome(p, lamp)
        lamp.read_hangs = True
        with caplog.at_level(logging.WARNING, logger=commands_module.log.name):
            async with asyncio.timeout(10):
                answer = await p.handle(cmd(id="u1"))
        assert answer == {"id": "u1", "ok": False, "error": OUTCOME_UNKNOWN}
        (warning,) = [r.getMessage() for r in caplog.records if "read-back" in r.getMessage()]
        assert warning == f"command u1: read-back of lamp-1.dim failed: {TimeoutError()}"
        assert lamp.asked == [["dim"]]  # only the command's point is asked for
    finally:
        p.close()


async def test_read_back_of_an_unknown_outcome_reports_the_value_now(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock)
    try:
        await unknown_outcome(p, lamp)
        lamp.values["dim"] = 12
        lamp.values["on"] = True
        clock.ts = T0 + 1000
        answer = await p.handle(cmd(id="u1"))
        assert answer == {"id": "u1", "ok": False, "error": OUTCOME_UNKNOWN, "value": 12, "ts": T0 + 1000}
    finally:
        p.close()


# -- the audit -----------------------------------------------------------------------------------------


async def test_audit_entries_carry_every_field(
    proc: CommandProcessor, lamp: FakeLamp, clock: Clock, tmp_path: Path
) -> None:
    await proc.handle(cmd(id="a1", value=5))
    clock.ts = T0 + 250
    await proc.handle(cmd(id="a2", value=6))
    newest, oldest = proc.recent(2)
    assert newest == {
        "seq": oldest["seq"] + 1,
        "received_ts": T0 + 250,
        "done_ts": T0 + 250,
        "source": "mqtt",
        "id": "a2",
        "device": "lamp-1",
        "point": "dim",
        "value": 6,
        "outcome": "executed",
        "error": None,
        "result_value": 6,
    }


async def test_recent_defaults_to_fifty_and_honours_its_limit(proc: CommandProcessor) -> None:
    for i in range(60):
        await proc.handle(cmd(id=f"r{i}", value=i % 100))
    assert len(proc.recent()) == 50
    assert [e["id"] for e in proc.recent(3)] == ["r59", "r58", "r57"]
    conn = sqlite3.connect(proc.db_path)
    try:
        assert len(commands_module.read_audit(conn)) == 50
    finally:
        conn.close()


async def test_a_structured_value_is_audited_by_its_kind_only(proc: CommandProcessor) -> None:
    refused = await proc.handle(cmd(id="s1", value={"level": 5}))
    assert refused is not None and refused["ok"] is False
    assert proc.recent(1)[0]["value"] == "<an object>"
    await proc.handle(cmd(id="s2", value=[1, 2]))
    assert proc.recent(1)[0]["value"] == "<an array>"
    await proc.handle(cmd(id="s3", value=8))
    await proc.handle(cmd(id="s3", value=9))  # a duplicate keeps a scalar as it is
    assert [e["value"] for e in proc.recent(2)] == [9, 8]


# -- wording of refusals -------------------------------------------------------------------------------


async def test_refusals_name_what_they_got(proc: CommandProcessor) -> None:
    long_label = "x" * 200
    on = await proc.execute("lamp-1", "on", long_label, source="local")
    assert on["error"] == "point 'on' expects true or false, got " + f"the string {long_label!r}"[:80]
    raw = await proc.execute("lamp-1", "on", b"\x01", source="local")
    assert raw["error"] == "point 'on' expects true or false, got bytes"
    inf = await proc.execute("lamp-1", "setpoint", float("inf"), source="local")
    assert inf["error"] == "point 'setpoint' expects a finite number"
    await proc.handle(orjson.dumps({"id": {"n": 1}}))
    assert proc.recent(1)[0]["error"] == "'id' must be a string or an integer, got an object"
    await proc.handle(orjson.dumps({"id": [1]}))
    assert proc.recent(1)[0]["error"] == "'id' must be a string or an integer, got an array"


async def test_the_bounds_themselves_are_accepted(proc: CommandProcessor, lamp: FakeLamp) -> None:
    assert (await proc.execute("lamp-1", "dim", 100, source="local"))["ok"] is True
    assert (await proc.execute("lamp-1", "dim", 0, source="local"))["ok"] is True
    assert (await proc.execute("lamp-1", "setpoint", 10.5, source="local"))["ok"] is True
    assert (await proc.execute("lamp-1", "setpoint", -10.5, source="local"))["ok"] is True
    assert lamp.writes == [("dim", 100), ("dim", 0), ("setpoint", 10.5), ("setpoint", -10.5)]


# -- _run: the audit id, the unknown outcome, listeners -------------------------------------------------


async def test_a_string_id_that_looks_like_a_number_stays_a_string(proc: CommandProcessor) -> None:
    result = await proc.handle(cmd(id="7"))
    assert result is not None and result["id"] == "7"
    assert proc.recent(1)[0]["id"] == "7"


async def test_an_unknown_outcome_is_audited_and_recorded_once(
    tmp_path: Path,
    lamp: FakeLamp,
    health: dict[str, DeviceHealth],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = make(tmp_path, lamp, health, clock)
    try:
        with caplog.at_level(logging.ERROR, logger=commands_module.log.name):
            await unknown_outcome(p, lamp)
        entry = p.recent(1)[0]
        assert {k: entry[k] for k in ("id", "device", "point", "value", "outcome", "error", "source")} == {
            "id": "u1",
            "device": "lamp-1",
            "point": "dim",
            "value": 50,
            "outcome": "unknown",
            "error": OUTCOME_UNKNOWN,
            "source": "mqtt",
        }
        assert any(
            '"u1" on lamp-1.dim: unexpected error during the write' in r.getMessage() for r in caplog.records
        )
    finally:
        p.close()
    # Its outcome is already recorded: a restart finds nothing interrupted.
    again = make(tmp_path, lamp, health, clock)
    try:
        assert [e["outcome"] for e in again.recent()] == ["unknown"]
    finally:
        again.close()


async def test_listeners_learn_device_point_and_time(
    proc: CommandProcessor, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[CommandEvent] = []

    def broken(event: CommandEvent) -> None:
        raise RuntimeError("listener bug")

    proc.add_listener(broken)
    proc.add_listener(events.append)
    clock.ts = T0 + 42
    with caplog.at_level(logging.ERROR, logger=commands_module.log.name):
        result = await proc.handle(cmd(id="ev", point="on", value=True))
    assert result == {"id": "ev", "ok": True, "value": True, "ts": T0 + 42}  # the write stands
    assert events == [CommandEvent("lamp-1", "on", "mqtt", True, T0 + 42, None)]
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage() == 'command "ev": a listener failed'
    assert error.exc_info is not None


async def test_a_failed_write_is_audited_with_its_error_and_point(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    lamp.fail_with = WriteRefused("locked")
    await proc.handle(cmd(id="f1", point="setpoint", value=1.5))
    entry = proc.recent(1)[0]
    assert (entry["point"], entry["outcome"], entry["error"], entry["result_value"]) == (
        "setpoint",
        "failed",
        "locked",
        None,
    )


async def test_a_successful_command_logs_no_error(
    proc: CommandProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        assert (await proc.handle(cmd()))["ok"] is True  # type: ignore[index]
        await asyncio.sleep(0)  # the task's done callback
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_processor_closed_under_a_write_answers_an_internal_error_and_logs_it(
    tmp_path: Path,
    lamp: FakeLamp,
    health: dict[str, DeviceHealth],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = make(tmp_path, lamp, health, clock)
    lamp.gate = asyncio.Event()
    command = asyncio.create_task(p.handle(cmd(id="late")))
    await settle(lambda: lamp.active == 1)
    p.close()  # the result can no longer be stored
    with caplog.at_level(logging.ERROR, logger=commands_module.log.name):
        lamp.gate.set()
        result = await command
        await asyncio.sleep(0)
    assert result == {"id": "late", "ok": False, "error": "internal error in the gateway (see its log)"}
    failed = [r for r in caplog.records if r.getMessage() == "command task failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None


# -- _validate ----------------------------------------------------------------------------------------

# A clock this many whole days before the end a schedule can hold: the limit falls exactly on a day.
DAYS_LEFT = 2_912_293


async def test_an_override_must_end_before_the_year_9999(
    proc: CommandProcessor, clock: Clock, lamp: FakeLamp
) -> None:
    clock.ts = commands_module.OVERRIDE_LIMIT_MS - DAYS_LEFT * 86_400_000
    too_long = await proc.handle(cmd(id="o1", override=f"{DAYS_LEFT + 1}d"))
    assert too_long == {
        "id": "o1",
        "ok": False,
        "error": "'override' is longer than a schedule can hold: it must end before 9999-12-30"
        f" (at most {DAYS_LEFT}d from now)",
    }
    assert lamp.writes == []
    longest = await proc.handle(cmd(id="o2", override=f"{DAYS_LEFT}d"))  # ends exactly on the limit
    assert longest is not None and longest["ok"] is True
    clock.ts += 1
    assert (await proc.handle(cmd(id="o3", override=f"{DAYS_LEFT}d")))["ok"] is False  # type: ignore[index]
    one_hour = await proc.execute("lamp-1", "dim", 5, source="local", override_s=3600.0)
    assert one_hour["ok"] is True


async def test_an_unknown_point_without_a_close_name_gets_no_hint(proc: CommandProcessor) -> None:
    result = await proc.handle(cmd(point="zzz"))
    assert result == {"id": "c1", "ok": False, "error": "unknown point 'zzz' on device 'lamp-1'"}


async def test_a_failing_device_refuses_at_once_even_behind_a_write_in_progress(
    proc: CommandProcessor, lamp: FakeLamp, health: dict[str, DeviceHealth]
) -> None:
    lamp.gate = asyncio.Event()
    first = asyncio.create_task(proc.handle(cmd(id="slow", value=1)))
    await settle(lambda: lamp.active == 1)
    health["lamp-1"].state = "failing"
    health["lamp-1"].last_error = "timeout"
    async with asyncio.timeout(10):
        refused = await proc.handle(cmd(id="next", value=2))  # not queued behind the slow write
    assert refused == {"id": "next", "ok": False, "error": "device 'lamp-1' is failing: timeout"}
    assert not first.done()
    lamp.gate.set()
    await first


# -- _handle_doc: redeliveries, repeats, refusals of shape --------------------------------------------


async def test_a_redelivery_while_executing_is_audited_and_not_answered(
    proc: CommandProcessor, lamp: FakeLamp, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    lamp.gate = asyncio.Event()
    first = asyncio.create_task(proc.handle(cmd(id="r1", value=40)))
    await settle(lambda: lamp.active == 1)
    clock.ts = T0 + 5
    with caplog.at_level(logging.INFO, logger=commands_module.log.name):
        assert await proc.handle(cmd(id="r1", value=[1, 2]), source="local") is None
    entry = proc.recent(1)[0]
    assert {
        k: entry[k] for k in ("received_ts", "source", "id", "device", "point", "value", "outcome", "error")
    } == {
        "received_ts": T0 + 5,
        "source": "local",
        "id": "r1",
        "device": "lamp-1",
        "point": "dim",
        "value": "<an array>",
        "outcome": "duplicate",
        "error": "already executing: answered by the first attempt's result",
    }
    assert any(
        r.getMessage() == 'command "r1" from local: already executing; answered when it ends'
        for r in caplog.records
    )
    lamp.gate.set()
    await first
    assert lamp.writes == [("dim", 40)]


async def test_a_repeat_is_answered_before_any_validation_and_audited(
    proc: CommandProcessor, lamp: FakeLamp, clock: Clock
) -> None:
    first = await proc.handle(cmd(id="k1", value=60))
    clock.ts = T0 + 9
    # The same id, now malformed (no value): still the first result, never a refusal replacing it.
    again = await proc.handle(cmd(id="k1", value=...), source="local")
    assert again == first == {"id": "k1", "ok": True, "value": 60, "ts": T0}
    entry = proc.recent(1)[0]
    assert {
        k: entry[k]
        for k in (
            "received_ts",
            "source",
            "id",
            "device",
            "point",
            "value",
            "outcome",
            "error",
            "result_value",
        )
    } == {
        "received_ts": T0 + 9,
        "source": "local",
        "id": "k1",
        "device": "lamp-1",
        "point": "dim",
        "value": None,
        "outcome": "duplicate",
        "error": None,
        "result_value": 60,
    }
    refused = await proc.handle(cmd(id="k2", value=101))
    await proc.handle(cmd(id="k2", value=5))
    entry = proc.recent(1)[0]
    assert (entry["outcome"], entry["error"], entry["value"]) == ("duplicate", refused["error"], 5)  # type: ignore[index]
    assert lamp.writes == [("dim", 60)]


async def test_a_refusal_of_shape_is_remembered_and_audited(proc: CommandProcessor, lamp: FakeLamp) -> None:
    refused = await proc.handle(cmd(id="s1", point="", value={"x": 1}))
    assert refused == {
        "id": "s1",
        "ok": False,
        "error": "'point' must be a non-empty string, got the string ''",
    }
    entry = proc.recent(1)[0]
    assert {k: entry[k] for k in ("id", "device", "point", "value", "outcome", "error")} == {
        "id": "s1",
        "device": "lamp-1",
        "point": "",
        "value": "<an object>",
        "outcome": "refused",
        "error": refused["error"],
    }
    assert await proc.handle(cmd(id="s1", point="dim", value=3)) == refused  # remembered: a repeat gets it
    assert proc.recent(1)[0]["outcome"] == "duplicate"
    numeric = await proc.handle(cmd(id="s2", point=5))
    assert numeric is not None and numeric["error"] == "'point' must be a non-empty string, got the number 5"
    assert lamp.writes == []


async def test_a_value_json_cannot_carry_is_audited_by_its_kind(proc: CommandProcessor) -> None:
    await proc.execute("lamp-1", "on", b"\x01", source="local")
    assert proc.recent(1)[0]["value"] == "<bytes>"


async def test_a_closed_processor_says_so(proc: CommandProcessor) -> None:
    proc.close()
    with pytest.raises(RuntimeError, match="open\\(\\) was not called"):
        proc.recent()


# -- malformed messages, purge of old results, ids left executing --------------------------------------


async def test_malformed_messages_are_counted_and_audited_with_the_reason(
    proc: CommandProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    limit = commands_module.MAX_PAYLOAD
    at_limit = orjson.dumps({"id": "big", "device": "lamp-1", "point": "label", "value": ""})
    at_limit = at_limit[:-2] + b"x" * (limit - len(at_limit)) + b'"}'
    assert len(at_limit) == limit
    with caplog.at_level(logging.WARNING, logger=commands_module.log.name):
        assert (await proc.handle(at_limit))["ok"] is True  # type: ignore[index]  # the limit itself is fine
        assert await proc.handle(at_limit + b" ") is None
        assert await proc.handle(b"{nope") is None
        assert await proc.handle(b"[1]") is None
        assert await proc.handle(b'{"device": "lamp-1"}') is None
    assert proc.malformed == 4
    errors = [e["error"] for e in proc.recent(4)][::-1]
    assert errors[0] == f"payload of {limit + 1} bytes is larger than {limit}"
    assert errors[1].startswith("not JSON: ")
    assert errors[2:] == ["expected a JSON object, got an array", "no 'id' field, so no result can be sent"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[-1] == "command from mqtt ignored: no 'id' field, so no result can be sent"


async def test_an_id_of_the_longest_length_is_accepted(proc: CommandProcessor) -> None:
    longest = "i" * commands_module.MAX_ID_LENGTH
    assert (await proc.handle(cmd(id=longest)))["ok"] is True  # type: ignore[index]
    assert await proc.handle(cmd(id=longest + "i")) is None


async def test_an_unexpected_error_before_the_write_is_logged_with_the_command(
    proc: CommandProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    proc.close()
    with caplog.at_level(logging.ERROR, logger=commands_module.log.name):
        result = await proc.handle(cmd(id="x1"), source="local")
    assert result == {"id": "x1", "ok": False, "error": "internal error in the gateway (see its log)"}
    assert [r.getMessage() for r in caplog.records] == ["command 'x1' from local: unexpected error"]


async def test_old_results_are_purged_once_a_minute(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock, result_retention="1m")  # opened (and purged) at T0

    def ids() -> list[str]:
        return [row[0] for row in p._conn().execute("SELECT id FROM results ORDER BY id")]

    try:
        clock.ts = T0 - 2
        await p.handle(cmd(id="c0"))
        clock.ts = T0 + 59_999  # c0 is past retention, but the last purge is less than a minute old
        await p.handle(cmd(id="c1"))
        assert ids() == ['"c0"', '"c1"']
        clock.ts = T0 + 60_000  # a minute after the last purge: the expired result goes
        await p.handle(cmd(id="c2"))
        assert ids() == ['"c1"', '"c2"']
    finally:
        p.close()


def test_the_database_directory_is_created(tmp_path: Path, lamp: FakeLamp, clock: Clock) -> None:
    drivers: dict[str, Any] = {"lamp-1": lamp}
    p = CommandProcessor(
        tmp_path / "state" / "gw" / "commands.db",
        drivers.get,
        {}.get,
        commands_module.CommandsConfig(),
        clock,
    )
    with pytest.raises(RuntimeError, match="was not called"):
        p.recent()
    p.open()
    try:
        assert (tmp_path / "state" / "gw" / "commands.db").exists()
    finally:
        p.close()


def unknown_json(key: str) -> dict[str, Any]:
    return {"id": orjson.loads(key), "ok": False, "error": OUTCOME_UNKNOWN}


async def test_an_id_executing_in_another_process_is_answered_unknown_and_recorded(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    drivers: dict[str, Any] = {"lamp-1": lamp}
    daemon = make(tmp_path, lamp, health, clock)
    # What a second process (the `write` verb) sees of a command the daemon is executing, or an id left
    # executing when recovery is off: the row exists, its result is NULL, nothing runs here.
    daemon._store_executing('"e1"', T0, "lamp-1", "dim")
    verb = CommandProcessor(daemon.db_path, drivers.get, health.get, commands_module.CommandsConfig(), clock)
    verb.open(recover=False)
    try:
        lamp.values["dim"] = 21
        answer = await verb.handle(cmd(id="e1", value=90))
        assert answer == {"id": "e1", "ok": False, "error": OUTCOME_UNKNOWN, "value": 21, "ts": T0}
        assert lamp.writes == []
        (stored,) = verb._conn().execute("SELECT result FROM results WHERE id = ?", ('"e1"',)).fetchone()
        assert orjson.loads(stored) == unknown_json('"e1"')
    finally:
        verb.close()
        daemon.close()


async def test_a_restart_records_each_interrupted_command(
    tmp_path: Path,
    lamp: FakeLamp,
    health: dict[str, DeviceHealth],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = make(tmp_path, lamp, health, clock)
    first._store_executing("17", T0, "lamp-1", "setpoint")
    first.close()
    clock.ts = T0 + 3000
    with caplog.at_level(logging.WARNING, logger=commands_module.log.name):
        again = make(tmp_path, lamp, health, clock)
    try:
        entry = again.recent(1)[0]
        assert {
            k: entry[k]
            for k in ("received_ts", "source", "id", "device", "point", "value", "outcome", "error")
        } == {
            "received_ts": T0 + 3000,
            "source": "gateway",
            "id": 17,
            "device": "lamp-1",
            "point": "setpoint",
            "value": None,
            "outcome": "interrupted",
            "error": f"the gateway stopped during the write; {OUTCOME_UNKNOWN}",
        }
        (stored,) = again._conn().execute("SELECT result FROM results WHERE id = '17'").fetchone()
        assert orjson.loads(stored) == unknown_json("17")
        assert [r.getMessage() for r in caplog.records] == [
            "command 17 was interrupted by a stop of the gateway; it will not run again"
        ]
    finally:
        again.close()


async def test_a_duplicate_through_execute_is_audited_with_the_first_answer(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    lamp.fail_with = WriteRefused("locked")
    await proc.execute("lamp-1", "dim", 30, source="local", command_id="d1")
    lamp.fail_with = None
    await proc.execute("lamp-1", "dim", 31, source="local", command_id="d1")
    entry = proc.recent(1)[0]
    assert {k: entry[k] for k in ("device", "point", "value", "outcome", "error", "result_value")} == {
        "device": "lamp-1",
        "point": "dim",
        "value": 31,
        "outcome": "duplicate",
        "error": "locked",
        "result_value": None,
    }


async def test_a_failing_device_without_an_error_text_says_no_answer(
    proc: CommandProcessor, health: dict[str, DeviceHealth]
) -> None:
    health["lamp-1"].state = "failing"
    health["lamp-1"].last_error = None
    result = await proc.handle(cmd())
    assert result == {"id": "c1", "ok": False, "error": "device 'lamp-1' is failing: no answer"}
