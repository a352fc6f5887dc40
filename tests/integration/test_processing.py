"""Edge processing through the real daemon: Modbus simulator -> `fieldgate run` -> Mosquitto -> checker."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Checker, Daemon, store_high, wait_all_received, write_config

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({3: SimUnit(), 4: SimUnit(dead=True)})
    await s.start_tcp("127.0.0.1", 0)
    s.units[3].set("holding", 0, [100, 50, 7])
    s.units[4].set("holding", 0, [1])
    try:
        yield s
    finally:
        await s.aclose()


def config(tmp: Path, broker: Broker, sim: ModbusSim, devices: str, mqtt_extra: str = "") -> Path:
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-edge",
        broker_port=broker.port,
        db=tmp / "buffer.db",
        mqtt_extra=mqtt_extra,
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=devices,
    )


def of(readings: list[dict[str, Any]], device: str, point: str) -> list[dict[str, Any]]:
    return [r for r in readings if r["device"] == device and r["point"] == point]


async def test_deadband_heartbeat_and_device_events(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config(
        tmp_path,
        pbroker,
        sim,
        """  regs:
    bus: lan
    unit_id: 3
    poll: 200ms
    report: on_change
    heartbeat: 2s
    points:
      r0: {table: holding, address: 0}
      r1: {table: holding, address: 1, type: int16, deadband: 5, heartbeat: 1h}
      r2: {table: holding, address: 2, report: always}
  dead:
    bus: lan
    unit_id: 4
    poll: 200ms
    points:
      x: {table: holding, address: 0}
""",
    )
    unit = sim.units[3]
    async with Checker(pbroker.port, "gw-edge") as checker:
        data = checker.data
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: of(data.readings, "regs", "r1"), what="first r1")
            await checker.wait_for(lambda: of(data.readings, "dead", "_error"), what="the dead unit's events")
            unit.set("holding", 1, [53])  # within the deadband of 50: not sent
            await checker.wait_for(lambda: len(of(data.readings, "regs", "r2")) >= 10, what="polls at 53")
            unit.set("holding", 0, [101])
            unit.set("holding", 1, [56])  # beyond it
            await checker.wait_for(lambda: len(of(data.readings, "regs", "r0")) >= 4, what="r0 heartbeats")
            sim.units[4].dead = False  # the dead unit recovers
            await checker.wait_for(lambda: of(data.readings, "dead", "x"), what="the recovered unit's value")
            # Unsent values are never stored: seq stays gap-free up to the store's high-water mark.
            await wait_all_received(checker, tmp_path / "buffer.db")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    readings = data.readings
    assert [r["value"] for r in of(readings, "regs", "r1")] == [50, 56]
    r0 = of(readings, "regs", "r0")
    values = [r["value"] for r in r0]
    assert values == sorted(values) and set(values) == {100, 101}, values  # one change, sent when it happened
    changed = values.index(101)
    assert abs(r0[changed]["ts"] - of(readings, "regs", "r1")[1]["ts"]) < 1000
    gaps = [b["ts"] - a["ts"] for a, b in pairwise(r0) if a["value"] == b["value"]]
    # An unchanged value is confirmed every heartbeat (2 s), not every poll (200 ms). Measured on the readings'
    # own ts (the poll times), so a slow test machine does not move it: the heartbeat goes with the first
    # poll at least 2 s after the last value sent, i.e. within a poll tick of it; the upper bound allows a
    # few ticks lost behind the dead neighbour's 300 ms timeouts on the same bus. Catches a heartbeat sent
    # per poll, never sent, or counted from the wrong moment (a whole heartbeat late).
    assert gaps and all(2000 <= g <= 3000 for g in gaps), gaps
    assert len(of(readings, "regs", "r2")) > len(r0) + 5  # report: always on the same device
    dead = [(r["point"], r["value"]) for r in readings if r["device"] == "dead"]
    assert dead[:2] == [("_state", "failing"), ("_error", dead[1][1])] and "no answer" in str(dead[1][1])
    assert dead[2:4] == [("_state", "ok"), ("x", 1)]
    assert all("quality" not in r for r in readings)  # the test config assumes a synchronised clock
    assert data.report()["first"] == 1


async def test_windows_closed_during_an_outage_are_delivered(
    tmp_path: Path, pbroker: Broker, sim: ModbusSim
) -> None:
    cfg = config(
        tmp_path,
        pbroker,
        sim,
        """  regs:
    bus: lan
    unit_id: 3
    poll: 100ms
    aggregate: {window: 1s, functions: [count, last]}
    points:
      r0: {table: holding, address: 0}
""",
    )
    async with Checker(pbroker.port, "gw-edge") as checker:
        data = checker.data
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(
                lambda: len(of(data.readings, "regs", "r0.count")) >= 2, what="two windows"
            )
            await asyncio.to_thread(pbroker.stop)
            db = tmp_path / "buffer.db"
            offline_from = await asyncio.to_thread(store_high, db)
            # three windows close while the upstream is away (2 readings each: count and last)
            while await asyncio.to_thread(store_high, db) < offline_from + 6:
                assert daemon.alive(), daemon.log_text()[-3000:]
                await asyncio.sleep(0.1)
            await asyncio.to_thread(pbroker.start)
            await checker.wait_for(lambda: any(data.backlog_flags), what="backlog replay")
            # nothing lost across the outage: every seq up to the store's high-water mark arrived
            await wait_all_received(checker, db)
            ends_now = len({r["ts"] for r in of(data.readings, "regs", "r0.count")})
            await checker.wait_for(
                lambda: len({r["ts"] for r in of(data.readings, "regs", "r0.count")}) > ends_now,
                what="a window closed live after the outage",
            )
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    counts = of(data.readings, "regs", "r0.count")
    ends = sorted({r["ts"] for r in counts})
    assert all(t % 1000 == 0 for t in ends)  # aligned on the clock, stamped with the window's end
    assert ends == list(range(ends[0], ends[-1] + 1000, 1000)), ends  # no window missing across the outage
    assert len(ends) >= 6
    backlog = {
        r["ts"]
        for r, b in zip(data.readings, data.backlog_flags, strict=True)
        if b and r["point"] == "r0.count"
    }
    assert len(backlog) >= 2  # windows closed while offline came back through the buffer
    assert all(1 <= r["value"] <= 12 for r in counts[1:])  # ~10 polls a window (the first may be partial)
    assert {r["value"] for r in of(data.readings, "regs", "r0.last")} == {100}
    assert not of(data.readings, "regs", "r0")  # the raw values are not sent


async def test_gzip_telemetry_goes_to_its_own_topic(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config(
        tmp_path,
        pbroker,
        sim,
        """  regs:
    bus: lan
    unit_id: 3
    poll: 200ms
    points:
      r0: {table: holding, address: 0}
""",
        mqtt_extra="    compression: gzip",
    )
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client("127.0.0.1", pbroker.port, identifier="gz-platform") as client:
        await client.subscribe("fieldgate/gw-edge/telemetry/#", qos=1)
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            async with asyncio.timeout(20):
                async for msg in client.messages:
                    assert isinstance(msg.payload, bytes)
                    received.append((str(msg.topic), msg.payload))
                    if len(received) >= 3:
                        break
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert {t for t, _ in received} == {"fieldgate/gw-edge/telemetry/gz"}  # nothing on the plain topic
    docs = [orjson.loads(gzip.decompress(p)) for _, p in received]
    readings = [r for d in docs for r in d["readings"]]
    assert docs[0]["gateway"] == "gw-edge" and readings[0]["value"] == 100 and readings[0]["seq"] == 1
