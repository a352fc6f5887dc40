"""The whole pipeline against real peers: pymodbus simulator -> `fieldgate run` -> Mosquitto -> checker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Checker, Daemon, write_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(kind="energy-meter"), 2: SimUnit(kind="lamp-controller"), 3: SimUnit()})
    s.port = await s.start_tcp("127.0.0.1", 0)  # type: ignore[attr-defined]
    s.units[3].set("holding", 0, list(range(100, 120)))
    try:
        yield s
    finally:
        await s.aclose()


def config_for(tmp: Path, broker: Broker, sim: ModbusSim, poll: str = "500ms") -> Path:
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-test",
        broker_port=broker.port,
        db=tmp / "buffer.db",
        mqtt_extra="    health_interval: 1s",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",  # type: ignore[attr-defined]
        devices=f"""  meter:
    bus: lan
    unit_id: 1
    poll: {poll}
    points:
      voltage: {{table: input, address: 0, type: float32, unit: V}}
      energy: {{table: input, address: 0x48, type: float32, unit: kWh}}
  lamp:
    bus: lan
    unit_id: 2
    poll: {poll}
    points:
      on: {{table: coil, address: 0, writable: true}}
      dim: {{table: holding, address: 0, writable: true, min: 0, max: 100, unit: "%"}}
  regs:
    bus: lan
    unit_id: 3
    poll: {poll}
    points:
      r0: {{table: holding, address: 0}}
      r1: {{table: holding, address: 1, type: int16, scale: 0.5, unit: A}}
""",
    )


async def test_readings_arrive_with_the_spec_payload(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config_for(tmp_path, pbroker, sim)
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 30, what="30 readings")
            await checker.wait_for(lambda: checker.data.health, what="a health message")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
        await checker.wait_for(
            lambda: checker.data.status and checker.data.status[-1]["state"] == "offline",
            what="offline status",
        )
    data = checker.data
    assert data.status[0]["state"] == "online" and data.status[0]["version"]
    by_point = {(r["device"], r["point"]): r for r in data.readings}
    volt = by_point[("meter", "voltage")]
    assert set(volt) == {"seq", "device", "point", "ts", "value", "unit"}
    assert volt["unit"] == "V" and 220 < volt["value"] < 240
    assert by_point[("lamp", "on")]["value"] is True and "unit" not in by_point[("lamp", "on")]
    assert by_point[("regs", "r0")]["value"] == 100
    assert by_point[("regs", "r1")]["value"] == 50.5  # 101 x 0.5
    report = data.report()
    assert report["first"] == 1 and report["lost"] == [] and report["duplicates"] == 0
    health = data.health[0]
    assert set(health) >= {"ts", "uptime_s", "version", "buffer", "upstream", "devices"}
    assert set(health["buffer"]) == {"pending", "oldest_ts", "evicted", "bytes"}
    assert set(health["devices"]) == {"meter", "lamp", "regs"}


async def test_broker_outage_loses_nothing(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config_for(tmp_path, pbroker, sim)
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 10, what="first readings")
            pbroker.stop()
            await asyncio.sleep(4)  # ~ 4 s x 3 devices x 2 polls/s buffered on the gateway
            pbroker.start()
            before = len(checker.data.readings)
            await checker.wait_for(lambda: any(checker.data.backlog_flags), what="backlog replay")
            await asyncio.sleep(2)
        finally:
            assert daemon.stop() == 0
        await asyncio.sleep(0.5)
    report = checker.data.report()
    assert report["lost"] == [], report
    assert report["first"] == 1
    assert len(checker.data.readings) > before
    assert sum(checker.data.backlog_flags) >= 20  # what the outage buffered came back as backlog


async def test_kill9_during_outage_loses_nothing(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config_for(tmp_path, pbroker, sim)
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        await checker.wait_for(lambda: len(checker.data.readings) >= 5, what="first readings")
        pbroker.stop()
        await asyncio.sleep(3)
        daemon.kill9()
        daemon = Daemon(cfg, tmp_path / "daemon2.log").start()
        await asyncio.sleep(2)
        pbroker.start()
        try:
            await checker.wait_for(lambda: any(checker.data.backlog_flags), what="backlog replay")
            await asyncio.sleep(2)
        finally:
            assert daemon.stop() == 0
        await asyncio.sleep(0.5)
    report = checker.data.report()
    assert report["lost"] == [], report
    assert report["first"] == 1
    assert report["unique"] > 30


async def test_dead_device_does_not_slow_the_others(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config_for(tmp_path, pbroker, sim, poll="500ms")
    sim.units[3].dead = True
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 4, what="first readings")
            start = len([r for r in checker.data.readings if r["device"] == "meter"])
            await asyncio.sleep(5)
            meter = len([r for r in checker.data.readings if r["device"] == "meter"]) - start
            lamp = len([r for r in checker.data.readings if r["device"] == "lamp"])
            regs = [r for r in checker.data.readings if r["device"] == "regs"]
            # A failing device sends no values, only its state events (point "_state", "_error").
            assert regs and all(r["point"].startswith("_") for r in regs), regs
            assert {"point": "_state", "value": "failing"}.items() <= regs[0].items()
            # 2 points at 2 polls/s over 5 s = 20; a dead neighbour on the same bus may cost a few cycles.
            assert meter >= 14, meter
            assert lamp >= 14, lamp
            await checker.wait_for(
                lambda: any(h["devices"]["regs"]["state"] == "failing" for h in checker.data.health),
                what="health saying the dead device is failing",
            )
            failing = next(h for h in checker.data.health if h["devices"]["regs"]["state"] == "failing")
            assert failing["devices"]["regs"]["errors"] >= 1
            assert "no answer" in failing["devices"]["regs"]["last_error"]
            assert failing["devices"]["meter"]["state"] == "ok"
            sim.units[3].dead = False
            await checker.wait_for(
                lambda: any(r["device"] == "regs" and r["point"] == "r0" for r in checker.data.readings),
                timeout=30,
                what="the dead device to recover",
            )
        finally:
            assert daemon.stop() == 0
    states = [r["value"] for r in checker.data.readings if r["device"] == "regs" and r["point"] == "_state"]
    assert states[0] == "failing" and states[-1] == "ok", states
