"""Test harness: the real `fieldgate run` as a subprocess, and an independent checker of what the broker delivered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

REPO = Path(__file__).resolve().parents[1]


def fieldgate_exe() -> list[str]:
    return [sys.executable, "-m", "agent.cli"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


async def fieldgate_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> CliResult:
    """Run one `fieldgate ...` command without blocking the event loop (in-process simulators keep answering)."""
    proc = await asyncio.create_subprocess_exec(
        *fieldgate_exe(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"fieldgate {' '.join(args)} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


class Daemon:
    """One `fieldgate run` process we own; killable with SIGTERM or SIGKILL."""

    def __init__(
        self, config: Path, log: Path, env: dict[str, str] | None = None, exe: list[str] | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.env = env or {}  # extra environment, e.g. NOTIFY_SOCKET for the watchdog tests
        self.exe = exe or fieldgate_exe()  # the command before `run` (a harness that injects a fault)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        env = dict(os.environ, PYTHONPATH=str(REPO), **self.env)
        self.proc = subprocess.Popen(
            [*self.exe, "run", "-c", str(self.config), "--log-level", "debug"],
            stdout=out,
            stderr=out,
            cwd=REPO,
            env=env,
        )
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self, timeout: float = 15) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = -9
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mapped_files(self) -> set[str]:
        """The file names mapped into the process (its shared libraries and extension modules)."""
        lines = Path(f"/proc/{self.pid}/maps").read_text().splitlines()
        return {Path(f.split(maxsplit=5)[5]).name for f in lines if len(f.split(maxsplit=5)) == 6}

    def loads_pydantic(self) -> bool:
        """Whether pydantic's core is mapped: the daemon validates in a child and must not (agent/validate.py)."""
        return any(name.startswith("_pydantic_core") for name in self.mapped_files())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def write_config(
    path: Path,
    *,
    gateway: str,
    broker_port: int,
    db: Path,
    buses: str,
    devices: str,
    extra: str = "",
    mqtt_extra: str = "",
    local: str = '""',
    url: str | None = None,
) -> Path:
    """`local` is local.listen (e.g. "127.0.0.1:8471"; disabled by default), plus any flow-mapping keys
    after it (`'127.0.0.1:8471, token_file: /path'`); `url` replaces the plain mqtt:// URL (mqtts://...)."""
    path.write_text(
        f"""gateway: {{id: {gateway}, clock: assume_synced}}   # tests inject the clock state
storage: {{path: {db}, max_size: 64MB}}
upstream:
  mqtt:
    url: {url or f"mqtt://127.0.0.1:{broker_port}"}
    batch_interval: 200ms
    keepalive: 5s
{mqtt_extra}
local: {{listen: {local}}}
buses:
{buses}
devices:
{devices}
{extra}
"""
    )
    return path


@dataclass
class Collected:
    readings: list[dict[str, Any]] = field(default_factory=list)
    backlog_flags: list[bool] = field(default_factory=list)
    status: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    other: list[tuple[str, bytes]] = field(default_factory=list)

    def backlog_once_live(self) -> bool:
        """Whether a reading came as backlog after the first live one. A reading stored in the few ms before
        the first connection is sent from the buffer, as backlog, by design: only later ones mean a replay."""
        flags = self.backlog_flags
        return False not in flags or any(flags[flags.index(False) :])

    def seqs(self) -> list[int]:
        return [r["seq"] for r in self.readings]

    def report(self) -> dict[str, Any]:
        """Lost (gaps), duplicated and out-of-order seqs: what a platform would see."""
        seqs = self.seqs()
        unique = sorted(set(seqs))
        lost: list[int] = []
        if unique:
            present = set(unique)
            lost = [s for s in range(unique[0], unique[-1] + 1) if s not in present]
        dup = len(seqs) - len(unique)
        live = [r["seq"] for r, b in zip(self.readings, self.backlog_flags, strict=True) if not b]
        out_of_order = sum(1 for a, b in itertools.pairwise(live) if b <= a)
        return {
            "received": len(seqs),
            "unique": len(unique),
            "first": unique[0] if unique else None,
            "last": unique[-1] if unique else None,
            "lost": lost,
            "duplicates": dup,
            "live_out_of_order": out_of_order,
        }


class Checker:
    """An independent platform: a persistent-session subscriber that records every message the broker delivers."""

    def __init__(self, port: int, gateway: str, prefix: str = "fieldgate") -> None:
        self.port = port
        self.base = f"{prefix}/{gateway}"
        self.data = Collected()
        self.connected = asyncio.Event()
        self.sessions = 0  # subscriptions made so far: a new one after a broker restart means resubscribed
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Checker:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=f"checker-{id(self)}",
                    clean_session=False,
                    keepalive=5,
                ) as client:
                    await client.subscribe(f"{self.base}/#", qos=1)
                    self.sessions += 1
                    self.connected.set()
                    async for msg in client.messages:
                        self._record(str(msg.topic), msg.payload if isinstance(msg.payload, bytes) else b"")
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def _record(self, topic: str, payload: bytes) -> None:
        doc = orjson.loads(payload) if payload else {}
        if topic.endswith("/telemetry"):
            for r in doc["readings"]:
                self.data.readings.append(r)
                self.data.backlog_flags.append(bool(doc.get("backlog")))
        elif topic.endswith("/status"):
            self.data.status.append(doc)
        elif topic.endswith("/health"):
            self.data.health.append(doc)
        elif topic.endswith("/commands/result"):
            self.data.results.append(doc)
        else:
            self.data.other.append((topic, payload))

    async def wait_for(self, predicate: Any, timeout: float = 20, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; report: {self.data.report()}")
            await asyncio.sleep(0.05)


def store_high(db: Path) -> int:
    """The store's high-water mark: the last seq the gateway's buffer handed out (read from its file, beside a
    running daemon or after it stopped; blocking: call through asyncio.to_thread from a test's loop).

    Read-only: a read-write connection closing last (the daemon killed) would merge and delete the -wal, which
    the next start cannot tell from a lost -wal (docs/STORE.md, the seq mark)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM readings").fetchone()[0]
    finally:
        conn.close()
    return max(row[0] if row else 0, top)


async def wait_all_received(checker: Checker, db: Path, *, first: int = 1, timeout: float = 30) -> int:
    """Wait until every seq from `first` to the store's high-water mark has reached the checker; return the mark.

    The claim "nothing lost" of the tests: holes between the lowest and highest seq *received* miss every
    reading stored after the highest one received (lost at the tail, or never sent), so the mark is the
    store's own, read from the buffer file. Call it while the daemon runs (readings stored but not yet
    acknowledged when a daemon stops stay in its buffer for the next start, by design). A seq still missing
    after `timeout` fails the test with the missing seqs listed.
    """
    high = await asyncio.to_thread(store_high, db)
    assert high >= first, f"the store handed out no seq from {first} on (high-water mark {high})"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = {r["seq"] for r in checker.data.readings}
        missing = [s for s in range(first, high + 1) if s not in got]
        if not missing:
            return high
        if loop.time() > deadline:
            raise AssertionError(
                f"{len(missing)} of seqs {first}..{high} (the store's high-water mark) never arrived: "
                f"{missing[:20]}; report: {checker.data.report()}"
            )
        await asyncio.sleep(0.05)
