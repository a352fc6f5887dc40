"""CommandProcessor: every refusal, at-most-once per id, failing devices, retention, audit, serialisation."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.control.commands import OUTCOME_UNKNOWN, CommandEvent, CommandProcessor, CommandsConfig, read_audit
from agent.driver import Driver, DriverContext, PointSpec, SharedResources
from agent.errors import DeviceUnreachable
from agent.pipeline.health import DeviceHealth
from agent.pipeline.reading import Reading, Value

T0 = 1_780_000_000_000  # a fixed instant (2026-05-28), so expiry and retention are exact


class FakeLamp(Driver[None]):
    """A lamp controller behind our Driver interface: records writes, reads back what it holds."""

    name = "fake"

    def __init__(self, device: str = "lamp-1") -> None:
        super().__init__(device, None, DriverContext(SharedResources(), {}, Path(".")))
        self.values: dict[str, Value] = {"on": False, "dim": 0, "setpoint": 0.0, "label": "", "power_w": 0.0}
        self.writes: list[tuple[str, Value]] = []
        self.fail_with: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.max_active = 0

    def points(self) -> dict[str, PointSpec]:
        return {
            "on": PointSpec("on", "bool", writable=True),
            "dim": PointSpec("dim", "uint16", unit="%", writable=True, min=0, max=100),
            "setpoint": PointSpec("setpoint", "float32", writable=True, min=-10.5, max=10.5),
            "label": PointSpec("label", "string", writable=True),
            "power_w": PointSpec("power_w", "float32", unit="W"),
        }

    async def read(self) -> list[Reading]:
        return [Reading(self.device, name, T0, value) for name, value in self.values.items()]

    async def write(self, point: str, value: Value) -> Value:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
            self.writes.append((point, value))
            self.values[point] = value
            return self.values[point]
        finally:
            self.active -= 1


class Clock:
    def __init__(self, ts: int = T0) -> None:
        self.ts = ts

    def __call__(self) -> int:
        return self.ts


@pytest.fixture
def lamp() -> FakeLamp:
    return FakeLamp()


@pytest.fixture
def health() -> dict[str, DeviceHealth]:
    return {"lamp-1": DeviceHealth(driver="fake", state="ok")}


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock, **config: Any
) -> CommandProcessor:
    drivers: dict[str, Driver[Any]] = {"lamp-1": lamp}
    proc = CommandProcessor(
        tmp_path / "commands.db", drivers.get, health.get, CommandsConfig.model_validate(config), clock=clock
    )
    proc.open()
    return proc


@pytest.fixture
def proc(tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock) -> Any:
    p = make(tmp_path, lamp, health, clock)
    yield p
    p.close()


def cmd(**fields: Any) -> bytes:
    doc = {"id": "c1", "device": "lamp-1", "point": "dim", "value": 50}
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


async def test_dim_command_executes_and_reports_the_value_read_back(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    result = await proc.handle(cmd(value=42))
    assert result == {"id": "c1", "ok": True, "value": 42, "ts": T0}
    assert lamp.writes == [("dim", 42)]
    entry = proc.recent(1)[0]
    assert (entry["source"], entry["outcome"], entry["id"], entry["value"], entry["result_value"]) == (
        "mqtt",
        "executed",
        "c1",
        42,
        42,
    )


async def test_integral_float_is_accepted_for_an_integer_point(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    result = await proc.handle(cmd(value=30.0))
    assert result is not None and result["ok"] is True
    assert lamp.writes == [("dim", 30)] and isinstance(lamp.writes[0][1], int)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"value": 101}, "point 'dim': 101 is above the maximum 100 %"),
        ({"value": -1}, "point 'dim': -1 is below the minimum 0 %"),
        ({"point": "setpoint", "value": 10.6}, "point 'setpoint': 10.6 is above the maximum 10.5"),
        ({"device": "lamp-9"}, "unknown device 'lamp-9'"),
        ({"point": "dimm"}, "unknown point 'dimm' on device 'lamp-1'; did you mean 'dim'?"),
        ({"point": "power_w", "value": 3.0}, "point 'power_w' of 'lamp-1' is not writable"),
        ({"value": "50"}, "point 'dim' expects a number, got the string '50'"),
        ({"value": True}, "point 'dim' expects a number, got a boolean"),
        ({"value": 12.5}, "point 'dim' expects an integer (uint16), got 12.5"),
        ({"point": "on", "value": 1}, "point 'on' expects true or false, got the number 1"),
        ({"point": "label", "value": 3}, "point 'label' expects a string, got the number 3"),
        ({"value": None}, "'value' must be a number, a boolean or a string, got null"),
        ({"value": [1]}, "'value' must be a number, a boolean or a string, got an array"),
        ({"expires_ts": T0 - 1}, "expired: expires_ts 1779999999999 is 1 ms in the past"),
        (
            {"expires_ts": "soon"},
            "'expires_ts' must be integer milliseconds since the epoch, got the string 'soon'",
        ),
        ({"device": ...}, "missing field 'device'"),
        ({"point": ...}, "missing field 'point'"),
        ({"value": ...}, "missing field 'value'"),
        ({"device": 7}, "'device' must be a non-empty string, got the number 7"),
        (
            {"expire_ts": T0 + 1000},
            "unknown field 'expire_ts' (fields: id, device, point, value, expires_ts, override)",
        ),
        (
            {"override": "forever"},
            "'override': 'forever' is not a duration; write it like 500ms, 10s, 5m or 1h",
        ),
    ],
)
async def test_refusals_write_nothing_and_say_why(
    proc: CommandProcessor, lamp: FakeLamp, fields: dict[str, Any], error: str
) -> None:
    result = await proc.handle(cmd(**fields))
    assert result == {"id": "c1", "ok": False, "error": error}
    assert lamp.writes == []
    assert proc.recent(1)[0]["outcome"] == "refused"


async def test_not_yet_expired_command_runs(proc: CommandProcessor, lamp: FakeLamp) -> None:
    result = await proc.handle(cmd(expires_ts=T0))
    assert result is not None and result["ok"] is True
    assert lamp.writes == [("dim", 50)]


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[1, 2]",
        b'"id"',
        b'{"device": "lamp-1", "point": "dim", "value": 5}',
        b'{"id": null}',
        b'{"id": true, "device": "lamp-1"}',
        b'{"id": ""}',
        b"\xff\xfe",
        b"x" * 20000,
    ],
)
async def test_payloads_without_a_usable_id_get_a_log_line_and_no_result(
    proc: CommandProcessor, lamp: FakeLamp, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert await proc.handle(payload) is None
    assert lamp.writes == []
    assert "command from mqtt ignored" in caplog.text
    assert proc.recent(1)[0]["outcome"] == "refused"


async def test_integer_ids_are_echoed_and_distinct_from_strings(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    first = await proc.handle(cmd(id=7, value=10))
    second = await proc.handle(cmd(id="7", value=20))
    assert first is not None and first["id"] == 7 and first["value"] == 10
    assert second is not None and second["id"] == "7" and second["value"] == 20
    assert lamp.writes == [("dim", 10), ("dim", 20)]


async def test_duplicate_id_writes_once_and_gets_the_first_result(
    proc: CommandProcessor, lamp: FakeLamp, clock: Clock
) -> None:
    first = await proc.handle(cmd(value=60))
    clock.ts += 5000
    again = await proc.handle(cmd(value=60))
    changed = await proc.handle(cmd(value=70))  # same id, other value: still the first result
    assert first == again == changed == {"id": "c1", "ok": True, "value": 60, "ts": T0}
    assert lamp.writes == [("dim", 60)]
    assert [e["outcome"] for e in proc.recent(3)] == ["duplicate", "duplicate", "executed"]


async def test_duplicate_of_a_refused_command_gets_the_same_refusal(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    first = await proc.handle(cmd(value=500))
    again = await proc.handle(cmd(value=50))
    assert first == again and first is not None and first["ok"] is False
    assert lamp.writes == []


async def test_the_same_id_in_flight_twice_executes_once(proc: CommandProcessor, lamp: FakeLamp) -> None:
    lamp.gate = asyncio.Event()
    a = asyncio.create_task(proc.handle(cmd(value=33)))
    await asyncio.sleep(0.01)
    # The repeat while the first still runs: not executed, not answered separately (the first's result
    # answers both, once).
    assert await proc.handle(cmd(value=33)) is None
    lamp.gate.set()
    assert await a == {"id": "c1", "ok": True, "value": 33, "ts": T0}
    assert lamp.writes == [("dim", 33)]
    assert [(e["outcome"], e["error"]) for e in proc.recent(2)] == [
        ("executed", None),
        ("duplicate", "already executing: answered by the first attempt's result"),
    ]
    # Once done, a repeat gets the stored result again.
    assert await proc.handle(cmd(value=33)) == {"id": "c1", "ok": True, "value": 33, "ts": T0}
    assert lamp.writes == [("dim", 33)]


async def test_cancelling_the_caller_never_cancels_the_write(proc: CommandProcessor, lamp: FakeLamp) -> None:
    """What a lost MQTT session does to its message's handler: the write goes on, its result is kept."""
    lamp.gate = asyncio.Event()
    first = asyncio.create_task(proc.handle(cmd(value=61)))
    await asyncio.sleep(0.01)
    assert lamp.active == 1
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert lamp.active == 1  # still writing
    assert await proc.handle(cmd(value=61)) is None  # the platform's retry meanwhile: not a second write
    lamp.gate.set()
    await proc.drain()
    assert lamp.writes == [("dim", 61)]
    assert await proc.handle(cmd(value=61)) == {"id": "c1", "ok": True, "value": 61, "ts": T0}
    assert lamp.writes == [("dim", 61)]


async def test_results_survive_a_restart(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock)
    first = await p.handle(cmd(value=80))
    p.close()
    p = make(tmp_path, lamp, health, clock)
    try:
        assert await p.handle(cmd(value=80)) == first
    finally:
        p.close()
    assert lamp.writes == [("dim", 80)]


async def test_an_executing_id_in_a_commands_db_of_the_old_schema_is_never_executed(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    # A commands.db written before the device/point columns, with an id left executing (the crash itself
    # is tested with a real kill -9 in tests/integration/test_commands_crash.py).
    db = sqlite3.connect(tmp_path / "commands.db")
    db.executescript("CREATE TABLE results (id TEXT PRIMARY KEY, ts INTEGER NOT NULL, result TEXT);")
    db.execute("INSERT INTO results VALUES (?, ?, NULL)", ('"c1"', T0 - 1000))
    db.commit()
    db.close()
    lamp.values["dim"] = 12
    p = make(tmp_path, lamp, health, clock)
    try:
        result = await p.handle(cmd(value=90))
        assert result == {"id": "c1", "ok": False, "error": OUTCOME_UNKNOWN, "value": 12, "ts": T0}
        assert lamp.writes == []
        assert [e["outcome"] for e in p.recent(2)] == ["duplicate", "interrupted"]
    finally:
        p.close()


async def test_after_retention_an_id_is_forgotten(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock, result_retention="1h")
    try:
        await p.handle(cmd(value=10))
        clock.ts += 3600_000  # exactly at retention: still remembered
        assert (await p.handle(cmd(value=20)) or {}).get("value") == 10
        clock.ts += 61_000  # past retention (and past the purge interval)
        result = await p.handle(cmd(value=20))
        assert result == {"id": "c1", "ok": True, "value": 20, "ts": clock.ts}
        assert lamp.writes == [("dim", 10), ("dim", 20)]
        count = (
            sqlite3.connect(tmp_path / "commands.db").execute("SELECT COUNT(*) FROM results").fetchone()[0]
        )
        assert count == 1  # the expired row was purged, not kept forever
    finally:
        p.close()


async def test_failing_device_fails_fast_without_a_write(
    proc: CommandProcessor, lamp: FakeLamp, health: dict[str, DeviceHealth]
) -> None:
    health["lamp-1"].state = "failing"
    health["lamp-1"].last_error = "no answer from 192.168.10.20:502 within 1s"
    lamp.gate = asyncio.Event()  # a write would hang: the test would time out rather than pass
    result = await proc.handle(cmd())
    assert result == {
        "id": "c1",
        "ok": False,
        "error": "device 'lamp-1' is failing: no answer from 192.168.10.20:502 within 1s",
    }
    assert lamp.active == 0 and lamp.writes == []


async def test_device_error_during_the_write_is_reported(proc: CommandProcessor, lamp: FakeLamp) -> None:
    lamp.fail_with = DeviceUnreachable("lamp-1: connection refused")
    result = await proc.handle(cmd())
    assert result == {"id": "c1", "ok": False, "error": "device error: lamp-1: connection refused"}
    assert proc.recent(1)[0]["outcome"] == "failed"


async def test_write_timeout_is_reported(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock, write_timeout="50ms")
    lamp.gate = asyncio.Event()
    try:
        result = await p.handle(cmd())
        assert result is not None and result["error"] == (
            "no answer within 0.05s; the write may or may not have reached the device"
        )
    finally:
        p.close()


async def test_unexpected_driver_exception_never_escapes_handle(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    lamp.fail_with = ZeroDivisionError("bug in a driver")
    result = await proc.handle(cmd())
    assert result == {
        "id": "c1",
        "ok": False,
        "error": f"internal error in the gateway (see its log); {OUTCOME_UNKNOWN}",
    }
    # Whether the device took it is unknown: a repeat reads the point back, never writes again.
    lamp.fail_with = None
    lamp.values["dim"] = 7
    again = await proc.handle(cmd())
    assert again == {"id": "c1", "ok": False, "error": OUTCOME_UNKNOWN, "value": 7, "ts": T0}
    assert lamp.writes == []


async def test_audit_is_bounded(
    tmp_path: Path, lamp: FakeLamp, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    p = make(tmp_path, lamp, health, clock, audit_max_rows=10)
    try:
        for i in range(25):
            await p.handle(cmd(id=f"c{i}", value=i))
        rows = p.recent(100)
        assert len(rows) == 10
        assert [r["id"] for r in rows] == [f"c{i}" for i in range(24, 14, -1)]
    finally:
        p.close()


async def test_commands_to_one_device_are_serialised(
    tmp_path: Path, health: dict[str, DeviceHealth], clock: Clock
) -> None:
    lamp, other = FakeLamp(), FakeLamp("lamp-2")
    health["lamp-2"] = DeviceHealth(driver="fake", state="ok")
    drivers: dict[str, Driver[Any]] = {"lamp-1": lamp, "lamp-2": other}
    p = CommandProcessor(tmp_path / "c.db", drivers.get, health.get, CommandsConfig(), clock=clock)
    p.open()
    try:
        lamp.gate, other.gate = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(p.handle(cmd(id=f"a{i}", value=i))) for i in range(3)]
        tasks.append(asyncio.create_task(p.handle(cmd(id="b", device="lamp-2"))))
        await asyncio.sleep(0.01)
        assert (lamp.active, other.active) == (1, 1)  # one at a time per device; devices in parallel
        lamp.gate.set()
        other.gate.set()
        results = await asyncio.gather(*tasks)
        assert all(r is not None and r["ok"] for r in results)
        assert lamp.max_active == 1 and len(lamp.writes) == 3
    finally:
        p.close()


async def test_execute_without_id_is_audited_with_its_source(proc: CommandProcessor, lamp: FakeLamp) -> None:
    events: list[CommandEvent] = []
    proc.add_listener(events.append)
    result = await proc.execute("lamp-1", "on", True, source="schedule")
    assert result["ok"] is True and str(result["id"]).startswith("schedule-")
    again = await proc.execute("lamp-1", "on", True, source="schedule")
    assert again["ok"] is True and again["id"] != result["id"]  # no id: never deduplicated
    assert lamp.writes == [("on", True), ("on", True)]
    assert [(e.source, e.ok, e.point) for e in events] == [("schedule", True, "on")] * 2
    assert proc.recent(1)[0]["source"] == "schedule"


async def test_override_extension_reaches_listeners(proc: CommandProcessor) -> None:
    events: list[CommandEvent] = []
    proc.add_listener(events.append)
    await proc.handle(cmd(override="2h"), source="local")
    assert [(e.source, e.override_s) for e in events] == [("local", 7200.0)]


async def test_read_audit_works_on_a_second_connection(proc: CommandProcessor, tmp_path: Path) -> None:
    await proc.handle(cmd())
    reader = sqlite3.connect(f"file:{tmp_path / 'commands.db'}?mode=ro", uri=True)
    try:
        rows = read_audit(reader, 5)
    finally:
        reader.close()
    assert rows[0]["outcome"] == "executed" and rows[0]["device"] == "lamp-1"


async def test_commands_verb_lists_the_audit(
    tmp_path: Path,
    lamp: FakeLamp,
    health: dict[str, DeviceHealth],
    clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent.cli import main

    config = tmp_path / "fieldgate.yaml"
    config.write_text(
        f"gateway: {{id: gw-test}}\nstorage: {{path: {tmp_path / 'buffer.db'}}}\n"
        "upstream: {mqtt: {url: 'mqtt://127.0.0.1:1883'}}\n"
    )
    assert main(["commands", "-c", str(config)]) == 0
    assert "no commands recorded yet" in capsys.readouterr().out
    p = make(tmp_path, lamp, health, clock)
    try:
        await p.handle(cmd(value=25))
        await p.handle(cmd(id="c2", value=250), source="local")
    finally:
        p.close()
    assert main(["commands", "-c", str(config), "--json", "--limit", "1"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert [(e["id"], e["source"], e["outcome"]) for e in doc["commands"]] == [("c2", "local", "refused")]
    assert main(["commands", "-c", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "refused" in lines[0] and "lamp-1.dim = 250" in lines[0] and "above the maximum 100 %" in lines[0]
    assert "executed" in lines[1] and "read back 25" in lines[1]
    assert main(["commands", "-c", str(tmp_path / "missing.yaml")]) == 1


async def test_expiry_is_checked_again_when_a_queued_command_gets_its_turn(
    proc: CommandProcessor, lamp: FakeLamp, clock: Clock
) -> None:
    """docs/COMMANDS.md "checked again just before the write": valid on arrival, expired once its turn
    comes behind a slow write to the same device: refused, never written."""
    lamp.gate = asyncio.Event()
    slow = asyncio.create_task(proc.handle(cmd(id="slow", value=10)))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(proc.handle(cmd(id="late", value=20, expires_ts=T0 + 500)))
    await asyncio.sleep(0.01)
    assert lamp.active == 1 and not late.done()  # accepted on arrival, waiting for the device
    clock.ts = T0 + 2000  # the slow write took 2 s
    lamp.gate.set()
    assert (await slow or {}).get("ok") is True
    assert await late == {
        "id": "late",
        "ok": False,
        "error": f"expired while waiting for the device: expires_ts {T0 + 500} is 1500 ms in the past",
    }
    assert lamp.writes == [("dim", 10)]
    assert (proc.recent(1)[0]["id"], proc.recent(1)[0]["outcome"]) == ("late", "refused")


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,
        b"[" * 16_000,
        b"[" * 1000 + b"]" * 1000,
        b'{"id": "d", "device": "lamp-1", "point": "dim", "value": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"id": "d", "device": ' + b"[" * 1000 + b"]" * 1000 + b', "point": "dim", "value": 1}',
        b'{"id": "d", "override": ' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}",
    ],
    ids=["100000-deep", "16000-deep", "1000-deep-array", "deep-value", "deep-device", "deep-override"],
)
async def test_deeply_nested_json_is_refused_without_an_exception(
    proc: CommandProcessor, lamp: FakeLamp, payload: bytes
) -> None:
    result = await proc.handle(payload)
    assert result is None or (result["ok"] is False and "internal error" not in result["error"]), result
    assert lamp.writes == []
    entry = proc.recent(1)[0]
    assert entry["outcome"] == "refused" and entry["error"], entry


async def test_a_repeat_of_an_unknown_outcome_whose_read_back_fails_still_is_not_written(
    proc: CommandProcessor, lamp: FakeLamp
) -> None:
    lamp.fail_with = ZeroDivisionError("bug in a driver")
    await proc.handle(cmd(value=30))

    async def broken_read() -> list[Reading]:
        raise DeviceUnreachable("lamp-1: no answer")

    lamp.read = broken_read  # type: ignore[method-assign]
    lamp.fail_with = None
    assert await proc.handle(cmd(value=30)) == {"id": "c1", "ok": False, "error": OUTCOME_UNKNOWN}
    assert lamp.writes == []


async def test_the_executing_state_is_committed_with_fsync_before_the_device_is_touched(
    proc: CommandProcessor, lamp: FakeLamp, tmp_path: Path
) -> None:
    assert proc._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: every commit fsynced
    assert proc._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    lamp.gate = asyncio.Event()
    task = asyncio.create_task(proc.handle(cmd(value=44)))
    await asyncio.sleep(0.01)
    assert lamp.active == 1  # the write is in progress ...
    other = sqlite3.connect(tmp_path / "commands.db")  # ... and its id is already committed as executing
    try:
        row = other.execute("SELECT result, device, point FROM results WHERE id = ?", ('"c1"',)).fetchone()
        assert row == (None, "lamp-1", "dim")
    finally:
        other.close()
    lamp.gate.set()
    assert (await task or {}).get("ok") is True
