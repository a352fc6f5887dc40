"""Failure isolation end to end: `fieldgate run` on a shared RTU line (pty pair) with a unit that never answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Checker, Daemon, write_config
from tests.ptybridge import PtyBridge

pytestmark = pytest.mark.timeout(120)

POLL = 0.5  # seconds, every device
HOLE = 7  # unit 1 answers exception 2 for this register only


@pytest.fixture
def bridge() -> Iterator[PtyBridge]:
    with PtyBridge() as b:
        yield b


@pytest.fixture
async def sim(bridge: PtyBridge) -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(holes={HOLE}), 2: SimUnit(dead=True), 3: SimUnit()})
    for uid in (1, 2, 3):
        s.units[uid].set("holding", 0, [uid * 100, uid * 100 + 1])
    await s.start_rtu(bridge.path_b, baudrate=9600)
    try:
        yield s
    finally:
        await s.aclose()


async def api_status(port: int) -> dict[str, Any]:
    """GET /api/status of the daemon's local API (it answers with Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    doc: dict[str, Any] = json.loads(body)
    return doc


async def wait_api(port: int, predicate: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = await api_status(port)
        except OSError:
            last = {}  # not listening yet
        if last and predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(last)[:2000]}")


def ts_of(checker: Checker, device: str) -> list[int]:
    """The poll times of a device: the ts of its r0 readings, in arrival (= seq) order."""
    return [r["ts"] for r in checker.data.readings if r["device"] == device and r["point"] == "r0"]


def values_of(checker: Checker, device: str, point: str) -> list[Any]:
    return [r["value"] for r in checker.data.readings if r["device"] == device and r["point"] == point]


async def test_a_dead_unit_on_a_shared_rtu_line_isolated_end_to_end(
    tmp_path: Path, broker: Broker, bridge: PtyBridge, sim: ModbusSim
) -> None:
    api = free_port()
    points = f"""    points:
      r0: {{table: holding, address: 0}}
      r1: {{table: holding, address: 1}}
      bad: {{table: holding, address: {HOLE}}}
"""
    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-rtu",
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        mqtt_extra="    health_interval: 1s",
        local=f"127.0.0.1:{api}",
        buses=f"  rs485: {{type: modbus-rtu, port: {bridge.path_a}, baudrate: 9600, timeout: 200ms}}",
        devices="".join(
            f"  dev{u}:\n    bus: rs485\n    unit_id: {u}\n    poll: {POLL}s\n{points}" for u in (1, 2, 3)
        ),
    )
    async with Checker(broker.port, "gw-rtu") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(
                lambda: values_of(checker, "dev1", "r0") and values_of(checker, "dev3", "r0"),
                what="first readings of the live units",
            )
            # Steady state: the next 9 polls of each live unit, counted on the readings' own ts (the daemon's
            # poll times, not the test's clock): 8 poll intervals took at most twice their 4 s, i.e. at least
            # half the cycles were used although a unit on the same line never answers. Catches the dead unit
            # holding the line (its timeouts not backed off) and starving the others.
            start = {d: len(ts_of(checker, d)) for d in ("dev1", "dev3")}
            dead_requests_before = sim.count(2)
            live_requests_before = sim.count(3)
            await checker.wait_for(
                lambda: all(len(ts_of(checker, d)) >= n + 9 for d, n in start.items()),
                timeout=60,
                what="9 more polls of each live unit",
            )
            for device, n in start.items():
                ts = ts_of(checker, device)[n : n + 9]
                assert ts[-1] - ts[0] <= 2 * 8 * POLL * 1000, f"{device}: polls at {ts}"
            # the dead unit is backed off: its requests leave the line to the others
            assert sim.count(2) - dead_requests_before < sim.count(3) - live_requests_before
            assert values_of(checker, "dev2", "r0") == []
            await checker.wait_for(
                lambda: any(
                    h["devices"]["dev2"]["state"] == "failing" and h["devices"]["dev1"]["state"] == "ok"
                    for h in checker.data.health
                ),
                what="a health message with dev2 failing and dev1 ok",
            )
            health = next(h for h in checker.data.health if h["devices"]["dev2"]["state"] == "failing")
            assert "no answer" in health["devices"]["dev2"]["last_error"]
            assert health["devices"]["dev3"]["state"] == "ok"
            assert "failing" in values_of(checker, "dev2", "_state")
            # One point refused with an exception code: that point fails, the others of the device are kept.
            status = await wait_api(api, lambda d: "bad" in d["devices"]["dev1"]["point_errors"], "dev1.bad")
            assert "exception 2: illegal data address" in status["devices"]["dev1"]["point_errors"]["bad"]
            assert status["devices"]["dev1"]["state"] == "ok"
            assert values_of(checker, "dev1", "bad") == [] and set(values_of(checker, "dev3", "bad")) == {0}
            assert set(values_of(checker, "dev1", "r1")) == {101}

            # The unit comes back: the backoff's next probe finds it, readings and health follow.
            sim.units[2].dead = False
            await checker.wait_for(lambda: values_of(checker, "dev2", "r0"), timeout=45, what="dev2 back")
            assert set(values_of(checker, "dev2", "r0")) == {200}
            assert values_of(checker, "dev2", "_state")[-1] == "ok"
            await checker.wait_for(
                lambda: checker.data.health[-1]["devices"]["dev2"]["state"] == "ok",
                what="dev2 ok in health",
            )
        finally:
            code = daemon.stop()
        assert code == 0, daemon.log_text()[-3000:]
