"""Modbus RTU over a linked pty pair: real frames, a shared line with a dead unit, scan by baud rate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.driver import DriverContext, SharedResources
from agent.errors import DeviceUnreachable
from drivers.modbus.config import ModbusDeviceConfig, ModbusRtuBusConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.profile import load_profile, merge_profile
from drivers.modbus.scan import scan_serial
from tests.modbus_sim import ModbusSim, SimUnit
from tests.ptybridge import PtyBridge
from tests.vectors import load_vectors

VECTORS = load_vectors("modbus_energy_meters.json")


@pytest.fixture
def bridge() -> Iterator[PtyBridge]:
    with PtyBridge() as b:
        yield b


@pytest.fixture
async def line(bridge: PtyBridge) -> AsyncIterator[tuple[ModbusSim, DriverContext]]:
    sim = ModbusSim({1: SimUnit(), 2: SimUnit(), 3: SimUnit()})
    await sim.start_rtu(bridge.path_b, baudrate=9600)
    bus = ModbusRtuBusConfig(type="modbus-rtu", port=bridge.path_a, baudrate=9600, timeout="200ms")
    context = DriverContext(SharedResources(), {"rs485": bus}, Path("."))
    yield sim, context
    await context.shared.aclose()
    await sim.aclose()


def make(ctx: DriverContext, unit_id: int, **kw: Any) -> ModbusDriver:
    config = ModbusDeviceConfig(bus="rs485", unit_id=unit_id, **kw)
    if config.profile is not None:  # what the config loader does with `profile:`
        config = merge_profile(config, load_profile(config.profile))
    return ModbusDriver(f"dev{unit_id}", config, ctx)


async def test_sdm120_profile_over_rtu(line: tuple[ModbusSim, DriverContext]) -> None:
    sim, ctx = line
    for vector in VECTORS["sdm120_vectors"]:
        sim.units[1].set(
            "input", vector["register_address_0based"], [int(h, 16) for h in vector["registers_hex"]]
        )
    driver = make(ctx, 1, profile="eastron-sdm120")
    got = {r.point: r.value for r in await driver.read()}
    assert got["voltage"] == pytest.approx(228.7, abs=1e-4)
    assert got["current"] == pytest.approx(8.01, abs=1e-4)
    assert got["active_power"] == pytest.approx(-1832.8, abs=1e-3)
    assert got["power_factor"] == pytest.approx(-0.9999511, abs=1e-7)
    assert got["import_active_energy"] == pytest.approx(0.097, abs=1e-6)
    assert driver.point_errors == {}


async def test_frames_on_the_wire_match_the_vectors(
    bridge: PtyBridge, line: tuple[ModbusSim, DriverContext]
) -> None:
    sim, ctx = line
    sim.units[1].set("input", 0, [0x4364, 0xB333])
    driver = make(ctx, 1, points={"v": {"table": "input", "address": 0, "type": "float32"}})
    bridge.record = True
    await driver.read()
    bridge.record = False
    sent = b"".join(d for direction, d in bridge.tap if direction == "a->b")
    answered = b"".join(d for direction, d in bridge.tap if direction == "b->a")
    frames = {v["id"]: bytes.fromhex(v["input_hex"]) for v in VECTORS["rtu_frame_vectors"]}
    assert sent == frames["rtu-sdm-read-voltage-request"]
    assert answered == frames["rtu-sdm-read-voltage-response"]


async def test_a_dead_unit_does_not_stop_the_others(line: tuple[ModbusSim, DriverContext]) -> None:
    sim, ctx = line
    sim.units[2].dead = True
    for uid in (1, 3):
        sim.units[uid].set("holding", 0, [uid, uid + 10])
    drivers = [make(ctx, uid, points={"a": {"address": 0}, "b": {"address": 1}}) for uid in (1, 2, 3)]
    cycles = 4
    for _ in range(cycles):
        results = await asyncio.gather(*(d.read_points([]) for d in drivers), return_exceptions=True)
        assert [r.value for r in results[0]] == [1, 11]  # type: ignore[union-attr]
        assert isinstance(results[1], DeviceUnreachable)
        assert [r.value for r in results[2]] == [3, 13]  # type: ignore[union-attr]
    # one request per device per cycle: the dead unit costs one timeout, not three (no pymodbus retries)
    assert sim.count(1) == sim.count(2) == sim.count(3) == cycles


async def test_write_and_bit_over_rtu(line: tuple[ModbusSim, DriverContext]) -> None:
    sim, ctx = line
    driver = make(
        ctx,
        3,
        points={
            "on": {"table": "coil", "address": 4, "writable": True},
            "level": {"address": 8, "type": "float32", "order": "CDAB", "writable": True},
            "alarm_ack": {"address": 9, "bit": 15, "writable": True},
        },
    )
    assert await driver.write("on", 1) is True
    assert await driver.write("level", 50.5) == pytest.approx(50.5)
    assert sim.units[3].get("holding", 8, 2) == [0x0000, 0x424A]
    assert await driver.write("alarm_ack", True) is True
    assert sim.units[3].get("holding", 9) == [0x424A | 0x8000]  # low word of the float kept


async def test_a_silent_line_is_unreachable_then_recovers(
    bridge: PtyBridge, line: tuple[ModbusSim, DriverContext]
) -> None:
    _, ctx = line
    driver = make(ctx, 1, points={"a": {"address": 0}})
    bridge.silence()
    with pytest.raises(DeviceUnreachable, match="no answer"):
        await driver.read_points([])
    bridge.resume()
    assert [r.value for r in await driver.read_points([])] == [0]


async def test_scan_serial_finds_units_and_the_right_baud_rate(bridge: PtyBridge) -> None:
    sim = ModbusSim({4: SimUnit(), 17: SimUnit(illegal_from=0)})
    # Parity stays N: Linux ptys refuse a second tcsetattr once parity is set (EINVAL), which pymodbus does.
    await sim.start_rtu(bridge.path_b, baudrate=19200)
    progress: list[tuple[int, int]] = []
    try:
        hits = await scan_serial(
            bridge.path_a,
            range(1, 21),
            [9600, 19200],
            ["N"],
            0.1,
            progress=lambda d, t: progress.append((d, t)),
        )
    finally:
        await sim.aclose()
    assert [(h.unit_id, h.baudrate, h.parity) for h in hits] == [(4, 19200, "N"), (17, 19200, "N")]
    assert hits[1].detail == "answers (exception 2: illegal data address)"
    assert progress[-1] == (40, 40)


async def test_the_master_keeps_the_inter_frame_silence(bridge: PtyBridge) -> None:
    # 1200 baud: 3.5 characters of 10 bits = 29 ms, far above the master's own turnaround without the wait
    sim = ModbusSim({1: SimUnit(), 2: SimUnit()})
    await sim.start_rtu(bridge.path_b, baudrate=1200)
    bus = ModbusRtuBusConfig(type="modbus-rtu", port=bridge.path_a, baudrate=1200, timeout="500ms")
    ctx = DriverContext(SharedResources(), {"rs485": bus}, Path("."))
    try:
        points = {"h": {"address": 0}, "i": {"table": "input", "address": 0}}  # two requests per cycle
        drivers = [make(ctx, uid, points=points) for uid in (1, 2)]
        bridge.record = True
        for _ in range(2):
            await asyncio.gather(*(d.read_points([]) for d in drivers))
        bridge.record = False
    finally:
        await ctx.shared.aclose()
        await sim.aclose()
    # The gap from the bridge relaying an answer to it seeing the next request is a lower bound of the
    # line's silence (the master received the answer after the relay): causal, not a timing guess.
    gaps = [
        t - t_prev
        for (d_prev, _), t_prev, (d, _), t in zip(
            bridge.tap, bridge.tap_times, bridge.tap[1:], bridge.tap_times[1:], strict=False
        )
        if d_prev == "b->a" and d == "a->b"
    ]
    assert len(gaps) == 7 and sim.count() == 8
    assert min(gaps) >= 3.5 * 10 / 1200, gaps
