"""Commands from the platform (SPEC §3/§4): validation, at-most-once execution per id, and the audit trail.

Every write goes through `CommandProcessor.execute()`: platform commands
(MQTT), the local API, the lamp schedules and the technician's `fieldgate
write` (source "cli", from its own process). So the same checks apply to all
of them, and every action on a device is one row of the audit trail.

At most once: before a command touches a device its id (with the device and
point) is committed to `commands.db` as *executing* (synchronous=FULL: fsynced
before the first byte goes to the device); the result replaces it once known.
A repeated id is answered from the database without touching the device. The
write runs in a task of its own, shielded from its caller: losing the MQTT
session (which cancels the message's handler) never cancels a write in
progress; it completes or times out, and its result is stored (the uplink
publishes it once the link is back). If the gateway dies between the two
(`kill -9`, power cut during the write), the executing row survives; a repeat
of that id is answered `"outcome unknown: not retried"` with the value read
back from the point now, and is never written a second time, because whether
the first attempt reached the device is unknown.

Database: a small SQLite file of its own (`commands.db` beside the buffer),
so that a burst of telemetry never delays a command and the audit survives a
buffer purge. Commands are rare (a handful a day per lamp), so the statements
run on the event loop; each is one short transaction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.config.control import CommandsConfig
from agent.config.units import parse_duration
from agent.driver import Driver, PointSpec
from agent.errors import DeviceError, FieldgateError, WriteRefused
from agent.pipeline import metrics
from agent.pipeline.health import DeviceHealth
from agent.pipeline.reading import Value, now_ms
from agent.safefiles import create_private

log = logging.getLogger(__name__)

SOURCES = ("mqtt", "schedule", "local", "cli")
PAYLOAD_FIELDS = ("id", "device", "point", "value", "expires_ts", "override")
MAX_PAYLOAD = 16 * 1024
MAX_ID_LENGTH = 200
INTEGER_TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64")
FLOAT_TYPES = ("float32", "float64")
BUSY_TIMEOUT_S = 5.0  # how long a statement waits for another process's transaction on commands.db
# The answer to a repeated id whose first attempt may or may not have reached the device (the gateway
# stopped during the write, or the write ended in an unexpected error): never executed again.
OUTCOME_UNKNOWN = "outcome unknown: not retried"
# The latest end of an `override` a schedule can hold (agent/control/lamp_schedule.py shows and compares it as a local
# datetime, and Python's datetime ends with the year 9999; one day less keeps every timezone inside it).
OVERRIDE_LIMIT_MS = 253_402_128_000_000  # 9999-12-30T00:00:00Z


def commands_db_path(storage_path: Path) -> Path:
    """Where the command database lives: beside the buffer, so one directory holds the gateway's state."""
    return storage_path.with_name("commands.db")


@dataclass(frozen=True, slots=True)
class CommandEvent:
    """What listeners (the schedule runner) learn of each executed command."""

    device: str
    point: str
    source: str
    ok: bool
    ts: int
    override_s: float | None  # the command's "override" extension, in seconds; None = until the next step


class CommandRefused(FieldgateError):
    """A command refused before execution; the message is the result's `error`."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,            -- the command id as JSON text, so "7" and 7 stay distinct
    ts INTEGER NOT NULL,            -- when received (ms); retention counts from here
    result TEXT,                    -- the JSON result; NULL while the command is executing
    device TEXT,                    -- what it writes (for the read-back of an outcome unknown)
    point TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ts INTEGER NOT NULL,
    done_ts INTEGER NOT NULL,
    source TEXT NOT NULL,
    command_id TEXT,
    device TEXT,
    point TEXT,
    value TEXT,                     -- requested value, JSON
    outcome TEXT NOT NULL,          -- executed | refused | failed | duplicate | interrupted | unknown
    error TEXT,
    result_value TEXT               -- value read back, JSON
);
"""


class CommandProcessor:
    """Validates and executes commands; remembers results per id; keeps the audit trail."""

    def __init__(
        self,
        db_path: Path,
        get_driver: Callable[[str], Driver[Any] | None],
        get_health: Callable[[str], DeviceHealth | None],
        config: CommandsConfig,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.db_path = db_path
        self.get_driver = get_driver
        self.get_health = get_health
        self.config = config
        self.clock = clock
        self.malformed = 0  # messages refused before any id could be read (not JSON, too deep, no id, ...)
        self._db: sqlite3.Connection | None = None
        self._device_locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str, asyncio.Task[dict[str, Any]]] = {}  # executing, by id
        self._running: set[asyncio.Task[dict[str, Any]]] = set()  # every write in progress
        self._listeners: list[Callable[[CommandEvent], None]] = []
        self._local_ids = 0
        self._last_purge = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def open(self, *, recover: bool = True) -> None:
        """Open (create) the database; `recover=False` for a second process beside a running daemon.

        The `write` verb records its action here while the daemon may be running: WAL lets both write
        (each statement waits up to BUSY_TIMEOUT_S for the other's short transaction), and it must not
        recover executing ids, which would be the daemon's commands in flight, not interrupted ones.
        """
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        create_private(self.db_path)  # 0600 whatever the umask; its -wal/-shm take its mode
        db = sqlite3.connect(self.db_path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # the `commands` verb reads while the daemon writes
            db.execute("PRAGMA synchronous=FULL")  # an executing id must survive a power cut
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
            for column in ("device", "point"):
                if column not in columns:  # a commands.db made before these columns existed
                    db.execute(f"ALTER TABLE results ADD COLUMN {column} TEXT")
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        if recover:
            self._recover_interrupted()
        self._purge(force=True)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def drain(self) -> None:
        """At a stop: let the writes in progress end (at most `write_timeout` + 1 s), then cancel the rest.

        A write cancelled here keeps its id executing in commands.db: after the restart a repeat of it is
        answered "outcome unknown: not retried", as after a crash.
        """
        tasks = list(self._running)
        if not tasks:
            return
        log.info("stopping: waiting for %d command(s) in progress", len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=self.config.write_timeout + 1)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def add_listener(self, listener: Callable[[CommandEvent], None]) -> None:
        """Called after every command that reached the driver (the schedule runner watches for overrides)."""
        self._listeners.append(listener)

    # -- entry points ----------------------------------------------------------------------------------

    async def handle(self, payload: bytes, source: str = "mqtt") -> dict[str, Any] | None:
        """One command message -> its result, or None when there is nothing to answer. Never raises.

        None also for a repeat of an id whose first attempt is still executing: that attempt's result
        answers both, once (the uplink publishes it even if the session it came on is gone by then).
        """
        received = self.clock()
        try:
            doc = self._parse(payload)
        except CommandRefused as exc:
            self.malformed += 1
            log.warning("command from %s ignored: %s", source, exc)
            self._audit(received, source, None, None, None, None, "refused", str(exc), None)
            return None
        command_id = doc["id"]
        try:
            return await self._handle_doc(doc, source, received)
        except Exception:  # the uplink must never lose its subscription over one command
            log.exception("command %r from %s: unexpected error", command_id, source)
            return {"id": command_id, "ok": False, "error": "internal error in the gateway (see its log)"}

    async def execute(
        self,
        device: str,
        point: str,
        value: Any,
        *,
        source: str,
        command_id: Any = None,
        expires_ts: int | None = None,
        override_s: float | None = None,
    ) -> dict[str, Any]:
        """Validate and execute one write; the result as SPEC §3 `commands/result`.

        With a `command_id`, the result is remembered: a repeated id gets it
        again without touching the device. Without one (schedules), an id is
        made up for the result and the audit (`schedule-<ts>-<n>`).

        The write runs in a task of its own: cancelling the caller (a lost MQTT session) does not
        cancel it; it ends on its own (result or `write_timeout`) and its result is stored.
        """
        received = self.clock()
        if command_id is None:
            self._local_ids += 1
            made_up = f"{source}-{received}-{self._local_ids}"
            run = self._run(made_up, None, device, point, value, source, expires_ts, override_s, received)
            return await self._start(run, None, made_up)
        key = _id_key(command_id)
        running = self._inflight.get(key)
        if running is not None:
            known: dict[str, Any] | None = await asyncio.shield(running)  # the same id in flight: its result
        else:
            known = await self._answer_known(key, device, point, received)
        if known is not None:
            self._audit(
                received,
                source,
                key,
                device,
                point,
                value,
                "duplicate",
                known.get("error"),
                known.get("value"),
            )
            return known
        run = self._run(command_id, key, device, point, value, source, expires_ts, override_s, received)
        return await self._start(run, key, command_id)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest audit entries first."""
        return read_audit(self._conn(), limit)

    # -- internals -------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("CommandProcessor.open() was not called")
        return self._db

    def _parse(self, payload: bytes) -> dict[str, Any]:
        """JSON object with a usable id, or CommandRefused (nothing to answer to)."""
        if len(payload) > MAX_PAYLOAD:
            raise CommandRefused(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
        try:
            doc = orjson.loads(payload)
        except (orjson.JSONDecodeError, RecursionError) as exc:
            raise CommandRefused(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise CommandRefused(f"expected a JSON object, got {_kind(doc)}")
        if "id" not in doc:
            raise CommandRefused("no 'id' field, so no result can be sent")
        problem = _id_problem(doc["id"])
        if problem:
            raise CommandRefused(problem)
        return doc

    async def _handle_doc(self, doc: dict[str, Any], source: str, received: int) -> dict[str, Any] | None:
        command_id = doc["id"]
        key = _id_key(command_id)
        device, point = _text(doc.get("device")), _text(doc.get("point"))
        running = self._inflight.get(key)
        if running is not None and not running.done():
            # A redelivery, or the platform's retry after a reconnect, while the first attempt still runs:
            # not executed, not answered separately (the first attempt's result is published once known).
            log.info("command %s from %s: already executing; answered when it ends", key, source)
            self._audit(
                received,
                source,
                key,
                device,
                point,
                _bounded(doc.get("value")),
                "duplicate",
                "already executing: answered by the first attempt's result",
                None,
            )
            return None
        known = await self._answer_known(key, device, point, received)
        if known is not None:  # before any validation: a repeated id gets the first result, whatever it was
            self._audit(
                received,
                source,
                key,
                device,
                point,
                _bounded(doc.get("value")),
                "duplicate",
                known.get("error"),
                known.get("value"),
            )
            return known
        try:
            device, point, value, expires_ts, override_s = _shape(doc)
        except CommandRefused as exc:
            result = {"id": command_id, "ok": False, "error": str(exc)}
            self._store_result(key, received, result)
            self._audit(
                received,
                source,
                key,
                device,
                point,
                _bounded(doc.get("value")),
                "refused",
                str(exc),
                None,
            )
            return result
        return await self.execute(
            device,
            point,
            value,
            source=source,
            command_id=command_id,
            expires_ts=expires_ts,
            override_s=override_s,
        )

    async def _start(
        self, run: Coroutine[Any, Any, dict[str, Any]], key: str | None, command_id: Any
    ) -> dict[str, Any]:
        """Run a command (`_run`) in its own task, shielded from the caller's cancellation, and wait for its
        result; while it runs, its id's `key` points at it so that a repeat waits for the same result."""
        task = asyncio.get_running_loop().create_task(run, name=f"command {key or command_id}")
        self._running.add(task)
        task.add_done_callback(self._finished)
        if key is not None:
            self._inflight[key] = task
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._running.discard(task)
        for key, running in list(self._inflight.items()):
            if running is task:
                del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:  # also marks it retrieved
            log.error("command task failed", exc_info=task.exception())

    async def _run(
        self,
        command_id: Any,
        key: str | None,
        device: str,
        point: str,
        value: Any,
        source: str,
        expires_ts: int | None,
        override_s: float | None,
        received: int,
    ) -> dict[str, Any]:
        audit_id = key if key is not None else str(command_id)
        try:
            driver, spec, value = self._validate(device, point, value, expires_ts, override_s, received)
        except CommandRefused as exc:
            result = {"id": command_id, "ok": False, "error": str(exc)}
            if key is not None:
                self._store_result(key, received, result)
            self._audit(received, source, audit_id, device, point, value, "refused", str(exc), None)
            return result
        if key is not None:
            # Executing: committed (and fsynced) before the device is touched.
            self._store_executing(key, received, device, point)
        lock = self._device_locks.setdefault(device, asyncio.Lock())
        try:
            async with lock:
                # Checked again under the lock: a command may have waited behind a slow one.
                error = self._late_refusal(device, expires_ts)
                if error is None:
                    ok, result = await self._write(driver, spec, command_id, value)
                else:
                    ok, result = False, {"id": command_id, "ok": False, "error": error}
        except Exception:
            # A bug on the way to the device (or in the driver): whether it was written is unknown.
            log.exception("command %s on %s.%s: unexpected error during the write", audit_id, device, point)
            if key is not None:
                self._store_result(key, received, {"id": command_id, "ok": False, "error": OUTCOME_UNKNOWN})
            self._audit(received, source, audit_id, device, point, value, "unknown", OUTCOME_UNKNOWN, None)
            return {
                "id": command_id,
                "ok": False,
                "error": f"internal error in the gateway (see its log); {OUTCOME_UNKNOWN}",
            }
        if key is not None:
            self._store_result(key, received, result)
        outcome = "executed" if ok else ("refused" if error is not None else "failed")
        self._audit(
            received,
            source,
            audit_id,
            device,
            point,
            value,
            outcome,
            result.get("error"),
            result.get("value"),
        )
        if error is None:
            event = CommandEvent(device, point, source, ok, self.clock(), override_s)
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:  # the write is done and recorded: its result stands
                    log.exception("command %s: a listener failed", audit_id)
        return result

    def _validate(
        self,
        device: str,
        point: str,
        value: Any,
        expires_ts: int | None,
        override_s: float | None,
        now: int,
    ) -> tuple[Driver[Any], PointSpec, Value]:
        if expires_ts is not None and now > expires_ts:
            raise CommandRefused(f"expired: expires_ts {expires_ts} is {now - expires_ts} ms in the past")
        if override_s is not None and now + override_s * 1000 > OVERRIDE_LIMIT_MS:
            longest = (OVERRIDE_LIMIT_MS - now) // 86_400_000
            raise CommandRefused(
                f"'override' is longer than a schedule can hold: it must end before 9999-12-30"
                f" (at most {longest}d from now)"
            )
        driver = self.get_driver(device)
        if driver is None:
            raise CommandRefused(f"unknown device '{device}'")
        points = driver.points()
        spec = points.get(point)
        if spec is None:
            import difflib  # only for this message

            hint = difflib.get_close_matches(point, list(points), n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            raise CommandRefused(f"unknown point '{point}' on device '{device}'{more}")
        if not spec.writable:
            raise CommandRefused(f"point '{point}' of '{device}' is not writable")
        coerced = _coerce(spec, value)
        health = self.get_health(device)
        if health is not None and health.state == "failing":
            raise CommandRefused(f"device '{device}' is failing: {health.last_error or 'no answer'}")
        return driver, spec, coerced

    def _late_refusal(self, device: str, expires_ts: int | None) -> str | None:
        now = self.clock()
        if expires_ts is not None and now > expires_ts:
            late = now - expires_ts
            return f"expired while waiting for the device: expires_ts {expires_ts} is {late} ms in the past"
        health = self.get_health(device)
        if health is not None and health.state == "failing":
            return f"device '{device}' is failing: {health.last_error or 'no answer'}"
        return None

    async def _write(
        self, driver: Driver[Any], spec: PointSpec, command_id: Any, value: Value
    ) -> tuple[bool, dict[str, Any]]:
        timeout = self.config.write_timeout
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (daemon shutdown)
            # that arrives just as the write completes.
            async with asyncio.timeout(timeout):
                read_back = await driver.write(spec.name, value)
        except WriteRefused as exc:
            return False, {"id": command_id, "ok": False, "error": str(exc)}
        except DeviceError as exc:
            return False, {"id": command_id, "ok": False, "error": f"device error: {exc}"}
        except TimeoutError:
            return False, {
                "id": command_id,
                "ok": False,
                "error": f"no answer within {timeout:g}s; the write may or may not have reached the device",
            }
        return True, {"id": command_id, "ok": True, "value": read_back, "ts": self.clock()}

    async def _answer_known(
        self, key: str, device: str | None, point: str | None, now: int
    ) -> dict[str, Any] | None:
        """The stored answer for a repeated id, or None for a new one (never suspends then).

        An id left executing by a stop of the gateway (or by an unexpected error) is answered
        OUTCOME_UNKNOWN, with the point's value read back now: never written again.
        """
        self._purge()
        row = (
            self._conn()
            .execute(
                "SELECT result, device, point FROM results WHERE id = ? AND ts >= ?",
                (key, now - self._retention_ms()),
            )
            .fetchone()
        )
        if row is None:
            return None
        text, stored_device, stored_point = row
        if text is None:
            # Executing, but not in this process (the running ones are in _inflight): a stop mid-write.
            text = orjson.dumps({"id": orjson.loads(key), "ok": False, "error": OUTCOME_UNKNOWN}).decode()
            self._conn().execute("UPDATE results SET result = ? WHERE id = ?", (text, key))
        result: dict[str, Any] = orjson.loads(text)
        if result.get("error") == OUTCOME_UNKNOWN:
            return await self._read_back(result["id"], stored_device or device, stored_point or point)
        return result

    async def _read_back(self, command_id: Any, device: str | None, point: str | None) -> dict[str, Any]:
        """OUTCOME_UNKNOWN with the point's current value (omitted if it cannot be read now)."""
        answer: dict[str, Any] = {"id": command_id, "ok": False, "error": OUTCOME_UNKNOWN}
        driver = self.get_driver(device) if device is not None else None
        if driver is None or device is None or point is None or point not in driver.points():
            return answer
        try:
            async with self._device_locks.setdefault(device, asyncio.Lock()):
                async with asyncio.timeout(self.config.write_timeout):
                    readings = await driver.read_points([point])
        except Exception as exc:  # a read-back is a courtesy; the answer stands without it
            log.warning("command %s: read-back of %s.%s failed: %s", command_id, device, point, exc)
            return answer
        for reading in readings:
            if reading.point == point:
                answer.update(value=reading.value, ts=self.clock())
                break
        return answer

    def _store_result(self, key: str, received: int, result: dict[str, Any]) -> None:
        self._conn().execute(
            "INSERT INTO results (id, ts, result) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET ts = excluded.ts, result = excluded.result",
            (key, received, orjson.dumps(result).decode()),
        )

    def _store_executing(self, key: str, received: int, device: str, point: str) -> None:
        """One autocommit statement: with synchronous=FULL it is on disk when this returns."""
        self._conn().execute(
            "INSERT INTO results (id, ts, result, device, point) VALUES (?, ?, NULL, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET ts = excluded.ts, result = NULL, device = excluded.device,"
            " point = excluded.point",
            (key, received, device, point),
        )

    def _recover_interrupted(self) -> None:
        """Ids left executing by a crash: outcome unknown, never executed again."""
        db = self._conn()
        rows = db.execute("SELECT id, device, point FROM results WHERE result IS NULL").fetchall()
        for key, device, point in rows:
            result = {"id": orjson.loads(key), "ok": False, "error": OUTCOME_UNKNOWN}
            db.execute("UPDATE results SET result = ? WHERE id = ?", (orjson.dumps(result).decode(), key))
            now = self.clock()
            error = f"the gateway stopped during the write; {OUTCOME_UNKNOWN}"
            self._audit(now, "gateway", key, device, point, None, "interrupted", error, None)
            log.warning("command %s was interrupted by a stop of the gateway; it will not run again", key)

    def _retention_ms(self) -> int:
        return int(self.config.result_retention * 1000)

    def _purge(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_purge < 60_000:
            return
        self._last_purge = now
        self._conn().execute(
            "DELETE FROM results WHERE ts < ? AND result IS NOT NULL", (now - self._retention_ms(),)
        )

    def _audit(
        self,
        received: int,
        source: str,
        command_id: str | None,
        device: str | None,
        point: str | None,
        value: Any,
        outcome: str,
        error: str | None,
        result_value: Any,
    ) -> None:
        metrics.command_outcome(outcome)
        db = self._conn()
        db.execute(
            "INSERT INTO audit (received_ts, done_ts, source, command_id, device, point, value, outcome,"
            " error, result_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                received,
                self.clock(),
                source,
                command_id,
                device,
                point,
                _json_or_none(value),
                outcome,
                error,
                _json_or_none(result_value),
            ),
        )
        # Bounded: one indexed delete per row keeps the table at audit_max_rows whatever the traffic.
        db.execute(
            "DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?", (self.config.audit_max_rows,)
        )


def read_audit(db: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Audit rows, newest first, as dicts (shared by the processor and the `commands` verb)."""
    rows = db.execute(
        "SELECT seq, received_ts, done_ts, source, command_id, device, point, value, outcome, error,"
        " result_value FROM audit ORDER BY seq DESC LIMIT ?",
        (limit,),
    ).fetchall()
    out = []
    for seq, received, done, source, cid, device, point, value, outcome, error, result_value in rows:
        out.append(
            {
                "seq": seq,
                "received_ts": received,
                "done_ts": done,
                "source": source,
                "id": None if cid is None else _loads_lenient(cid),
                "device": device,
                "point": point,
                "value": None if value is None else orjson.loads(value),
                "outcome": outcome,
                "error": error,
                "result_value": None if result_value is None else orjson.loads(result_value),
            }
        )
    return out


def _loads_lenient(text: str) -> Any:
    """Ids are stored as JSON text for MQTT commands, as plain text for made-up ones."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _id_key(command_id: Any) -> str:
    return orjson.dumps(command_id).decode()


def _id_problem(command_id: Any) -> str | None:
    if isinstance(command_id, bool) or not isinstance(command_id, str | int):
        return f"'id' must be a string or an integer, got {_kind(command_id)}"
    if isinstance(command_id, str) and not 0 < len(command_id) <= MAX_ID_LENGTH:
        return f"'id' must be 1 to {MAX_ID_LENGTH} characters"
    return None


def _shape(doc: dict[str, Any]) -> tuple[str, str, Any, int | None, float | None]:
    """The command's fields, checked for presence and JSON type (not yet against the device)."""
    unknown = [k for k in doc if k not in PAYLOAD_FIELDS]
    if unknown:
        # Refused rather than ignored: a misspelt "expires_ts" must not let a stale command run.
        raise CommandRefused(f"unknown field '{unknown[0]}' (fields: {', '.join(PAYLOAD_FIELDS)})")
    missing = [k for k in ("device", "point", "value") if k not in doc]
    if missing:
        raise CommandRefused(f"missing field '{missing[0]}'")
    device, point, value = doc["device"], doc["point"], doc["value"]
    if not isinstance(device, str) or not device:
        raise CommandRefused(f"'device' must be a non-empty string, got {_kind(device)}")
    if not isinstance(point, str) or not point:
        raise CommandRefused(f"'point' must be a non-empty string, got {_kind(point)}")
    if value is None or isinstance(value, dict | list):
        raise CommandRefused(f"'value' must be a number, a boolean or a string, got {_kind(value)}")
    expires_ts = doc.get("expires_ts")
    if expires_ts is not None and (isinstance(expires_ts, bool) or not isinstance(expires_ts, int)):
        raise CommandRefused(
            f"'expires_ts' must be integer milliseconds since the epoch, got {_kind(expires_ts)}"
        )
    override_s: float | None = None
    if doc.get("override") is not None:
        try:
            override_s = parse_duration(doc["override"])
        except ValueError as exc:
            raise CommandRefused(f"'override': {exc}") from None
    return device, point, value, expires_ts, override_s


def _coerce(spec: PointSpec, value: Any) -> Value:
    """The value in the point's type, within its min/max, or CommandRefused saying why."""
    where = f"point '{spec.name}'"
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise CommandRefused(f"{where} expects true or false, got {_kind(value)}")
        return value
    if spec.type == "string":
        if not isinstance(value, str):
            raise CommandRefused(f"{where} expects a string, got {_kind(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRefused(f"{where} expects a number, got {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CommandRefused(f"{where} expects a finite number")
    number: int | float = value
    if spec.type in INTEGER_TYPES and isinstance(value, float):
        if not value.is_integer():
            raise CommandRefused(f"{where} expects an integer ({spec.type}), got {value}")
        number = int(value)
    unit = f" {spec.unit}" if spec.unit else ""
    if spec.min is not None and number < spec.min:
        raise CommandRefused(f"{where}: {number} is below the minimum {spec.min:g}{unit}")
    if spec.max is not None and number > spec.max:
        raise CommandRefused(f"{where}: {number} is above the maximum {spec.max:g}{unit}")
    return number


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"[:80]
    return {"dict": "an object", "list": "an array"}.get(type(value).__name__, type(value).__name__)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _bounded(value: Any) -> Any:
    """A requested value as the audit keeps it: scalars as they are, a structure only by its kind.

    A hostile message may nest arrays a thousand deep (orjson parses up to 1024 levels); only its kind
    is kept, so nothing later (JSON encoding, repr, logging) recurses through it.
    """
    return f"<{_kind(value)}>" if isinstance(value, dict | list) else value


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return orjson.dumps(f"<{_kind(value)}>").decode()
