"""Fault-injection fixtures: counting Modbus units, a daemon with its own env, a timing checker, the audit."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from drivers.modbus import codec
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import free_port
from tests.daemon import Checker, Daemon

GATEWAY = "gw-faults"


@dataclass
class CounterUnit(SimUnit):
    """A unit whose holding registers 0-1 (uint32 ABCD) count the reads that cover them.

    Each value of the `count` point therefore names one read of the device: a value seen under two seqs
    means a reading stored twice, and along seq order the values must grow (readings kept in order).
    Registers 2.. hold constants, for volume.
    """

    reads: int = 0

    def get(self, table: str, address: int, count: int = 1) -> list[Any]:
        if table == "holding" and address <= 0 < address + count:
            self.reads += 1
            self.set("holding", 0, codec.encode(self.reads, "uint32", "ABCD"))
        return super().get(table, address, count)


class TimedChecker(Checker):
    """The tests' platform, also noting when each reading arrived (wall clock, ms) for latency figures."""

    def __init__(self, port: int, gateway: str = GATEWAY) -> None:
        super().__init__(port, gateway)
        self.arrivals: list[int] = []
        self._seqs: set[int] = set()

    def _record(self, topic: str, payload: bytes) -> None:
        before = len(self.data.readings)
        super()._record(topic, payload)
        now = time.time_ns() // 1_000_000
        self.arrivals.extend([now] * (len(self.data.readings) - before))
        self._seqs.update(r["seq"] for r in self.data.readings[before:])

    async def wait_for(self, predicate: Any, timeout: float = 20, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                rep = self.data.report()
                lost = rep.pop("lost")
                span = f"{lost[0]}..{lost[-1]}" if lost else "none"
                raise AssertionError(f"timed out waiting for {what}; {rep}, {len(lost)} lost ({span})")
            await asyncio.sleep(0.05)

    def seq_set(self) -> set[int]:
        return self._seqs

    async def wait_for_seqs(self, high: int, timeout: float = 60, low: int = 1, missing_ok: int = 0) -> None:
        """Wait until every seq in [low, high] has arrived (but `missing_ok` of them, e.g. evicted ones)."""
        need = high - low + 1 - missing_ok

        def done() -> bool:
            seqs = self._seqs
            if len(seqs) < need:
                return False
            return sum(1 for s in range(low, high + 1) if s in seqs) >= need

        await self.wait_for(done, timeout, what=f"seqs {low}..{high} (missing_ok={missing_ok})")


@dataclass
class Audit:
    """What a platform deduplicating on (gateway, seq) would find in the checker's record."""

    received: int
    high: int
    gaps: list[int]
    duplicates: int
    conflicting: list[int]  # seqs received with two different readings: a reused seq
    counter_reused: list[tuple[str, int]]  # one device read delivered under two seqs
    counter_disorder: int  # along seq order, a device's read count went backwards
    backlog: int
    extra: dict[str, Any] = field(default_factory=dict)


def audit(checker: Checker, high: int, low: int = 1) -> Audit:
    """Check the record against seqs [low, high] (the gateway's own high-water mark)."""
    bodies: dict[int, dict[str, Any]] = {}
    conflicting: list[int] = []
    dup = 0
    for r in checker.data.readings:
        s = r["seq"]
        if s in bodies:
            dup += 1
            if bodies[s] != r:
                conflicting.append(s)
        else:
            bodies[s] = r
    gaps = [s for s in range(low, high + 1) if s not in bodies]
    seen: dict[tuple[str, int], int] = {}
    reused: list[tuple[str, int]] = []
    last: dict[str, int] = defaultdict(int)
    disorder = 0
    for s in sorted(bodies):
        r = bodies[s]
        if r["point"] != "count":
            continue
        key = (r["device"], int(r["value"]))
        if key in seen and seen[key] != s:
            reused.append(key)
        seen[key] = s
        if key[1] <= last[r["device"]]:
            disorder += 1
        last[r["device"]] = key[1]
    return Audit(
        received=len(checker.data.readings),
        high=high,
        gaps=gaps,
        duplicates=dup,
        conflicting=conflicting,
        counter_reused=reused,
        counter_disorder=disorder,
        backlog=sum(checker.data.backlog_flags),
    )


def figures(a: Audit) -> None:
    """One line per scenario for docs/RELIABILITY.md (shown with `pytest -s`)."""
    name = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(
        f"\nFIGURES {name}: {a.high} stored, {a.received} received, {a.duplicates} duplicates, "
        f"{len(a.gaps)} gaps, {a.backlog} via backlog"
    )


def store_high(db: Path) -> int:
    """The gateway's own high-water mark: the last seq its buffer assigned (read beside the daemon).

    Read-only: a read-write connection closing last (the daemon killed) would merge and delete the -wal, which
    the next start cannot tell from a lost -wal (docs/STORE.md, the seq mark)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM readings").fetchone()[0]
    finally:
        conn.close()
    return max(row[0] if row else 0, top)


def fetch_status(port: int) -> dict[str, Any]:
    """GET /api/status of the daemon's local API (blocking: call through asyncio.to_thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


async def status(port: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(fetch_status, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def wait_status(port: int, predicate: Any, timeout: float = 30, what: str = "status") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while True:
        try:
            doc = await asyncio.to_thread(fetch_status, port)
            if predicate(doc):
                return doc
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last status: {orjson.dumps(doc).decode()}")
        await asyncio.sleep(0.2)


def counter_devices(
    sim_port: int, units: list[int], poll: str = "200ms", registers: int = 8, timeout: str = "2s"
) -> tuple[str, str]:
    """YAML (buses, devices) for `ctr-N` devices: the read counter plus `registers` constant registers."""
    buses = f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim_port}, timeout: {timeout}}}"
    lines: list[str] = []
    for u in units:
        lines += [f"  ctr-{u}:", "    bus: lan", f"    unit_id: {u}", f"    poll: {poll}", "    points:"]
        lines.append("      count: {table: holding, address: 0, type: uint32}")
        lines += [f"      r{a}: {{table: holding, address: {a}}}" for a in range(2, 2 + registers)]
    return buses, "\n".join(lines)


def fault_config(
    tmp: Path,
    mqtt_port: int,
    sim_port: int,
    *,
    db: Path | None = None,
    units: tuple[int, ...] = (1, 2),
    poll: str = "200ms",
    registers: int = 8,
    max_size: str = "64MB",
    keepalive: str = "5s",
    batch_max: int = 500,
    max_inflight: int = 16,
    local_port: int | None = None,
) -> Path:
    """A config for the counting units, written to tmp/fieldgate.yaml."""
    buses, devices = counter_devices(sim_port, list(units), poll, registers)
    listen = f"127.0.0.1:{local_port}" if local_port else ""
    path = tmp / "fieldgate.yaml"
    path.write_text(
        f"""gateway: {{id: {GATEWAY}}}
storage: {{path: {db or tmp / "buffer.db"}, max_size: {max_size}}}
upstream:
  mqtt:
    url: mqtt://127.0.0.1:{mqtt_port}
    batch_interval: 200ms
    batch_max: {batch_max}
    max_inflight: {max_inflight}
    keepalive: {keepalive}
    health_interval: 1s
local: {{listen: "{listen}"}}
buses:
{buses}
devices:
{devices}
"""
    )
    return path


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({u: CounterUnit() for u in (1, 2, 3, 4)})
    for unit in s.units.values():
        unit.set("holding", 2, list(range(1000, 1100)))
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
def local_port() -> int:
    return free_port()


def tail(daemon: Daemon, n: int = 4000) -> str:
    return daemon.log_text()[-n:]
