"""The whole pipeline against real peers: pymodbus simulator -> `fieldgate run` -> Mosquitto -> checker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Checker, Daemon, store_high, wait_all_received, write_config

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
            await wait_all_received(checker, tmp_path / "buffer.db")
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


async def wait_stored(db: Path, more: int, daemon: Daemon, timeout: float = 30) -> None:
    """Wait until the daemon's store has handed out `more` seqs beyond its current high-water mark."""
    start = await asyncio.to_thread(store_high, db)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(store_high, db) < start + more:
        assert daemon.alive() and loop.time() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)


async def test_broker_outage_loses_nothing(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    """Catches: readings stored during an outage never sent (the backlog lane), or deleted before their
    PUBACK; checked against the store's high-water mark, not the highest seq received."""
    cfg = config_for(tmp_path, pbroker, sim)
    db = tmp_path / "buffer.db"
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 10, what="first readings")
            await asyncio.to_thread(pbroker.stop)
            await wait_stored(db, 24, daemon)  # ~ 2 s x 3 devices x 2 polls/s x 2 points buffered offline
            await asyncio.to_thread(pbroker.start)
            await checker.wait_for(lambda: any(checker.data.backlog_flags), what="backlog replay")
            await wait_all_received(checker, db)
        finally:
            assert daemon.stop() == 0
    report = checker.data.report()
    assert report["first"] == 1
    assert sum(checker.data.backlog_flags) >= 20  # what the outage buffered came back as backlog


async def test_kill9_during_outage_loses_nothing(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    """Catches: readings committed before a kill -9 lost (not durable), or not replayed by the next start."""
    cfg = config_for(tmp_path, pbroker, sim)
    db = tmp_path / "buffer.db"
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        await checker.wait_for(lambda: len(checker.data.readings) >= 5, what="first readings")
        await asyncio.to_thread(pbroker.stop)
        await wait_stored(db, 24, daemon)
        daemon.kill9()
        killed_high = await asyncio.to_thread(store_high, db)
        daemon = Daemon(cfg, tmp_path / "daemon2.log").start()
        try:
            await wait_stored(db, 6, daemon)  # the second daemon polls (offline) before the broker returns
            await asyncio.to_thread(pbroker.start)
            await checker.wait_for(lambda: any(checker.data.backlog_flags), what="backlog replay")
            high = await wait_all_received(checker, db)
        finally:
            assert daemon.stop() == 0
    report = checker.data.report()
    assert report["first"] == 1
    assert high > killed_high  # the second daemon stored more, after the killed one's readings


async def test_dead_device_does_not_slow_the_others(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    cfg = config_for(tmp_path, pbroker, sim, poll="500ms")
    sim.units[3].dead = True
    async with Checker(pbroker.port, "gw-test") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(
                lambda: any(r["device"] == "regs" for r in checker.data.readings),
                what="the dead unit's state",
            )
            failed_at = next(r["ts"] for r in checker.data.readings if r["device"] == "regs")

            def polls(device: str, point: str) -> list[int]:
                """The poll times (the readings' own ts) of a live device since the dead one failed."""
                return sorted(
                    {
                        r["ts"]
                        for r in checker.data.readings
                        if r["device"] == device and r["point"] == point and r["ts"] > failed_at
                    }
                )

            await checker.wait_for(
                lambda: len(polls("meter", "voltage")) >= 11 and len(polls("lamp", "on")) >= 11,
                what="11 polls of each live device after the dead one failed",
            )
            regs = [r for r in checker.data.readings if r["device"] == "regs"]
            # A failing device sends no values, only its state events (point "_state", "_error").
            assert regs and all(r["point"].startswith("_") for r in regs), regs
            assert {"point": "_state", "value": "failing"}.items() <= regs[0].items()
            # Counted on the daemon's own timestamps (not the test's wall clock): 10 poll intervals of 500 ms
            # took at most 7 s, i.e. at least 70 % of the ticks were used. Catches a dead neighbour holding the
            # shared bus (timeouts not backed off, retries under the bus lock) and starving the live devices.
            for device, point in (("meter", "voltage"), ("lamp", "on")):
                ts = polls(device, point)[:11]
                assert ts[-1] - ts[0] <= 7000, (device, [b - a for a, b in pairwise(ts)])
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
