"""Commands from the platform (SPEC §3/§4): validation, at-most-once execution per id, and the audit trail.

Every write goes through `CommandProcessor.execute()`: platform commands
(MQTT), the local API, the lamp schedules and the technician's `fieldgate
write` (source "cli", from its own process). So the same checks apply to all
of them, and every action on a device is one row of the audit trail.

At most once: before a command touches a device its id is committed to
`commands.db` as *pending*; the result replaces it once known. A repeated id
is answered from the database without touching the device. If the gateway
dies between the two (power cut during the write), the pending row survives
and the id is answered with "interrupted" rather than executed a second time,
because whether the first attempt reached the device is unknown.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.config_base import Model
from agent.driver import Driver, PointSpec
from agent.errors import DeviceError, WriteRefused
from agent.health import DeviceHealth
from agent.modelkit import Field
from agent.reading import Value, now_ms
from agent.units import Duration, duration_field, parse_duration

log = logging.getLogger(__name__)

SOURCES = ("mqtt", "schedule", "local", "cli")
PAYLOAD_FIELDS = ("id", "device", "point", "value", "expires_ts", "override")
MAX_PAYLOAD = 16 * 1024
MAX_ID_LENGTH = 200
INTEGER_TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64")
FLOAT_TYPES = ("float32", "float64")
BUSY_TIMEOUT_S = 5.0  # how long a statement waits for another process's transaction on commands.db


class CommandsConfig(Model):
    """The `commands:` section: how long ids are remembered and how much audit is kept."""

    result_retention: Duration = duration_field(
        86400.0,
        "1m",
        "30d",
        description="how long a command's result is remembered to answer a repeated id without executing",
    )
    audit_max_rows: int = Field(
        10000, ge=10, le=10_000_000, description="audit rows kept; the oldest go first"
    )
    write_timeout: Duration = duration_field(
        10.0,
        "10ms",
        "5m",
        description="longest a device write (with its read-back) may take before the command fails",
    )


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


class _Refused(Exception):
    """A command refused before execution; the message is the result's `error`."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,            -- the command id as JSON text, so "7" and 7 stay distinct
    ts INTEGER NOT NULL,            -- when received (ms); retention counts from here
    result TEXT                     -- the JSON result; NULL while the command is executing
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
    outcome TEXT NOT NULL,          -- executed | refused | failed | duplicate | interrupted
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
        self._db: sqlite3.Connection | None = None
        self._device_locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[CommandEvent], None]] = []
        self._local_ids = 0
        self._last_purge = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def open(self, *, recover: bool = True) -> None:
        """Open (create) the database; `recover=False` for a second process beside a running daemon.

        The `write` verb records its action here while the daemon may be running: WAL lets both write
        (each statement waits up to BUSY_TIMEOUT_S for the other's short transaction), and it must not
        recover pending ids, which would be the daemon's commands in flight, not interrupted ones.
        """
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # the `commands` verb reads while the daemon writes
            db.execute("PRAGMA synchronous=FULL")  # a pending id must survive a power cut
            db.executescript(_SCHEMA)
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

    def add_listener(self, listener: Callable[[CommandEvent], None]) -> None:
        """Called after every command that reached the driver (the schedule runner watches for overrides)."""
        self._listeners.append(listener)

    # -- entry points ----------------------------------------------------------------------------------

    async def handle(self, payload: bytes, source: str = "mqtt") -> dict[str, Any] | None:
        """One command message -> its result, or None when there is no id to answer to. Never raises."""
        received = self.clock()
        try:
            doc = self._parse(payload)
        except _Refused as exc:
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
        """
        received = self.clock()
        if command_id is None:
            self._local_ids += 1
            return await self._run(
                f"{source}-{received}-{self._local_ids}",
                None,
                device,
                point,
                value,
                source,
                expires_ts,
                override_s,
                received,
            )
        key = _id_key(command_id)
        known = self._known_result(key, received)
        if known is None and (waiting := self._inflight.get(key)) is not None:
            # the same id twice in flight: the second gets the first's result
            known = await asyncio.shield(waiting)
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
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._run(
                command_id, key, device, point, value, source, expires_ts, override_s, received
            )
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # the waiters (if any) re-raise it; mark it retrieved for the others
            raise
        finally:
            del self._inflight[key]

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest audit entries first."""
        return read_audit(self._conn(), limit)

    # -- internals -------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("CommandProcessor.open() was not called")
        return self._db

    def _parse(self, payload: bytes) -> dict[str, Any]:
        """JSON object with a usable id, or _Refused (nothing to answer to)."""
        if len(payload) > MAX_PAYLOAD:
            raise _Refused(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise _Refused(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _Refused(f"expected a JSON object, got {type(doc).__name__}")
        if "id" not in doc:
            raise _Refused("no 'id' field, so no result can be sent")
        problem = _id_problem(doc["id"])
        if problem:
            raise _Refused(problem)
        return doc

    async def _handle_doc(self, doc: dict[str, Any], source: str, received: int) -> dict[str, Any]:
        command_id = doc["id"]
        key = _id_key(command_id)
        known = self._known_result(key, received)
        if known is not None:  # before any validation: a repeated id gets the first result, whatever it was
            self._audit(
                received,
                source,
                key,
                _text(doc.get("device")),
                _text(doc.get("point")),
                doc.get("value"),
                "duplicate",
                known.get("error"),
                known.get("value"),
            )
            return known
        try:
            device, point, value, expires_ts, override_s = _shape(doc)
        except _Refused as exc:
            result = {"id": command_id, "ok": False, "error": str(exc)}
            self._store_result(key, received, result)
            self._audit(
                received,
                source,
                key,
                _text(doc.get("device")),
                _text(doc.get("point")),
                doc.get("value"),
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
            driver, spec, value = self._validate(device, point, value, expires_ts, received)
        except _Refused as exc:
            result = {"id": command_id, "ok": False, "error": str(exc)}
            if key is not None:
                self._store_result(key, received, result)
            self._audit(received, source, audit_id, device, point, value, "refused", str(exc), None)
            return result
        if key is not None:
            self._store_result(key, received, None)  # pending: committed before the device is touched
        lock = self._device_locks.setdefault(device, asyncio.Lock())
        async with lock:
            # Checked again under the lock: a command may have waited behind a slow one.
            error = self._late_refusal(device, expires_ts)
            if error is None:
                ok, result = await self._write(driver, spec, command_id, value)
            else:
                ok, result = False, {"id": command_id, "ok": False, "error": error}
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
                listener(event)
        return result

    def _validate(
        self, device: str, point: str, value: Any, expires_ts: int | None, now: int
    ) -> tuple[Driver[Any], PointSpec, Value]:
        if expires_ts is not None and now > expires_ts:
            raise _Refused(f"expired: expires_ts {expires_ts} is {now - expires_ts} ms in the past")
        driver = self.get_driver(device)
        if driver is None:
            raise _Refused(f"unknown device '{device}'")
        points = driver.points()
        spec = points.get(point)
        if spec is None:
            import difflib  # only for this message

            hint = difflib.get_close_matches(point, list(points), n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else ""
            raise _Refused(f"unknown point '{point}' on device '{device}'{more}")
        if not spec.writable:
            raise _Refused(f"point '{point}' of '{device}' is not writable")
        coerced = _coerce(spec, value)
        health = self.get_health(device)
        if health is not None and health.state == "failing":
            raise _Refused(f"device '{device}' is failing: {health.last_error or 'no answer'}")
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

    def _known_result(self, key: str, now: int) -> dict[str, Any] | None:
        self._purge()
        row = (
            self._conn()
            .execute("SELECT result FROM results WHERE id = ? AND ts >= ?", (key, now - self._retention_ms()))
            .fetchone()
        )
        if row is None or row[0] is None:
            return None
        result: dict[str, Any] = orjson.loads(row[0])
        return result

    def _store_result(self, key: str, received: int, result: dict[str, Any] | None) -> None:
        text = None if result is None else orjson.dumps(result).decode()
        self._conn().execute(
            "INSERT INTO results (id, ts, result) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET ts = excluded.ts, result = excluded.result",
            (key, received, text),
        )

    def _recover_interrupted(self) -> None:
        """Pending ids left by a crash: answer them with "interrupted" rather than ever executing them."""
        db = self._conn()
        for (key,) in db.execute("SELECT id FROM results WHERE result IS NULL").fetchall():
            result = {
                "id": orjson.loads(key),
                "ok": False,
                "error": "interrupted: the gateway stopped while executing this command; effect unknown",
            }
            db.execute("UPDATE results SET result = ? WHERE id = ?", (orjson.dumps(result).decode(), key))
            now = self.clock()
            self._audit(now, "gateway", key, None, None, None, "interrupted", result["error"], None)
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
        raise _Refused(f"unknown field '{unknown[0]}' (fields: {', '.join(PAYLOAD_FIELDS)})")
    missing = [k for k in ("device", "point", "value") if k not in doc]
    if missing:
        raise _Refused(f"missing field '{missing[0]}'")
    device, point, value = doc["device"], doc["point"], doc["value"]
    if not isinstance(device, str) or not device:
        raise _Refused(f"'device' must be a non-empty string, got {_kind(device)}")
    if not isinstance(point, str) or not point:
        raise _Refused(f"'point' must be a non-empty string, got {_kind(point)}")
    if value is None or isinstance(value, dict | list):
        raise _Refused(f"'value' must be a number, a boolean or a string, got {_kind(value)}")
    expires_ts = doc.get("expires_ts")
    if expires_ts is not None and (isinstance(expires_ts, bool) or not isinstance(expires_ts, int)):
        raise _Refused(f"'expires_ts' must be integer milliseconds since the epoch, got {_kind(expires_ts)}")
    override_s: float | None = None
    if doc.get("override") is not None:
        try:
            override_s = parse_duration(doc["override"])
        except ValueError as exc:
            raise _Refused(f"'override': {exc}") from None
    return device, point, value, expires_ts, override_s


def _coerce(spec: PointSpec, value: Any) -> Value:
    """The value in the point's type, within its min/max, or _Refused saying why."""
    where = f"point '{spec.name}'"
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise _Refused(f"{where} expects true or false, got {_kind(value)}")
        return value
    if spec.type == "string":
        if not isinstance(value, str):
            raise _Refused(f"{where} expects a string, got {_kind(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Refused(f"{where} expects a number, got {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused(f"{where} expects a finite number")
    number: int | float = value
    if spec.type in INTEGER_TYPES and isinstance(value, float):
        if not value.is_integer():
            raise _Refused(f"{where} expects an integer ({spec.type}), got {value}")
        number = int(value)
    unit = f" {spec.unit}" if spec.unit else ""
    if spec.min is not None and number < spec.min:
        raise _Refused(f"{where}: {number} is below the minimum {spec.min:g}{unit}")
    if spec.max is not None and number > spec.max:
        raise _Refused(f"{where}: {number} is above the maximum {spec.max:g}{unit}")
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


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return orjson.dumps(repr(value)).decode()
