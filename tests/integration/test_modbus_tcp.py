"""Modbus driver against a real pymodbus server on 127.0.0.1: planning, types, splits, writes, scan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.driver import DriverContext, SharedResources
from agent.errors import DeviceProtocolError, DeviceUnreachable, PointError, WriteRefused
from drivers.modbus.config import ModbusDeviceConfig, ModbusRtuTcpBusConfig, ModbusTcpBusConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.profile import load_profile, merge_profile
from drivers.modbus.scan import scan_serial, scan_tcp
from drivers.modbus.simulator import step_behaviour
from tests.broker import free_port
from tests.daemon import fieldgate_cli
from tests.modbus_sim import ModbusSim, SimUnit, start_tcp_simulator
from tests.vectors import load_vectors

VECTORS = load_vectors("modbus_energy_meters.json")


def profiled(config: ModbusDeviceConfig) -> ModbusDeviceConfig:
    """What the config loader does with `profile:` (merge its points), for configs built in code."""
    assert config.profile is not None
    return merge_profile(config, load_profile(config.profile))


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    server = ModbusSim({uid: SimUnit() for uid in range(1, 11)})
    await server.start_tcp()
    yield server
    await server.aclose()


@pytest.fixture
async def ctx(sim: ModbusSim) -> AsyncIterator[DriverContext]:
    bus = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=sim.port, timeout="300ms")
    context = DriverContext(SharedResources(), {"lan": bus}, Path("."))
    yield context
    await context.shared.aclose()


def make(ctx: DriverContext, unit_id: int, points: dict[str, Any], **kw: Any) -> ModbusDriver:
    config = ModbusDeviceConfig(bus="lan", unit_id=unit_id, points=points, **kw)
    return ModbusDriver(f"dev{unit_id}", config, ctx)


def values(readings: list[Any]) -> dict[str, Any]:
    return {r.point: r.value for r in readings}


async def test_ten_devices_of_twenty_registers_cost_ten_requests_per_cycle(
    sim: ModbusSim, ctx: DriverContext
) -> None:
    drivers = []
    for uid in range(1, 11):
        sim.units[uid].set("holding", 100, [uid * 100 + i for i in range(20)])
        drivers.append(make(ctx, uid, {f"r{i}": {"address": 100 + i} for i in range(20)}))
    results = await asyncio.gather(*(d.read() for d in drivers))
    assert sim.count(function_code=3) == 10
    for uid, readings in zip(range(1, 11), results, strict=True):
        assert values(readings) == {f"r{i}": uid * 100 + i for i in range(20)}
    # not due again yet: no request at all
    assert await asyncio.gather(*(d.read() for d in drivers)) == [[]] * 10
    assert sim.count(function_code=3) == 10
    await asyncio.gather(*(d.read_points([]) for d in drivers))
    assert sim.count(function_code=3) == 20
    assert all(d.requests_last_cycle == 1 for d in drivers)
    # all devices share ONE bus object (one client, one lock)
    assert len({id(d.bus) for d in drivers}) == 1


async def test_every_type_and_order(sim: ModbusSim, ctx: DriverContext) -> None:
    unit = sim.units[1]
    points: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    address = 0
    for vector in VECTORS["word_order_vectors"]:
        type_ = {"f": "float32", "i": "int32", "I": "uint32"}[vector["type"]]
        for order, enc in vector["encodings"].items():
            name = f"{vector['id']}-{order}"
            unit.set("holding", address, [int(h, 16) for h in enc["registers_hex"]])
            points[name] = {"address": address, "type": type_, "order": order}
            expected[name] = vector["value"]
            address += 2
    raw64 = [0x0102, 0x0304, 0x0506, 0x0708]
    wires64 = {
        "ABCD": raw64,
        "CDAB": raw64[::-1],
        "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
        "DCBA": [0x0807, 0x0605, 0x0403, 0x0201],
    }
    for i, (order, wire) in enumerate(wires64.items()):
        unit.set("input", 10 + 4 * i, wire)
        points[f"u64-{order}"] = {"table": "input", "address": 10 + 4 * i, "type": "uint64", "order": order}
        expected[f"u64-{order}"] = 0x0102030405060708
    unit.set("input", 40, [0xFFFE, 0x4009, 0x21FB, 0x5444, 0x2D18, 0x5344, 0x4D31, 0x3230, 0x0000])
    points.update(
        i16={"table": "input", "address": 40, "type": "int16"},
        f64={"table": "input", "address": 41, "type": "float64"},
        model={"table": "input", "address": 45, "type": "string", "length": 4},
        flag={"table": "input", "address": 40, "bit": 1},
        scaled={"table": "input", "address": 40, "type": "uint16", "scale": 0.5, "offset": -1},
    )
    expected.update(i16=-2, f64=3.141592653589793, model="SDM120", flag=True, scaled=32766.0)
    unit.set("coil", 3, [True])
    unit.set("discrete", 7, [True])
    points.update(c3={"table": "coil", "address": 3}, d7={"table": "discrete", "address": 7})
    expected.update(c3=True, d7=True)
    driver = make(ctx, 1, points)
    got = values(await driver.read())
    assert driver.point_errors == {}
    for name, value in expected.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-6), name
        else:
            assert got[name] == value, name


async def test_sdm630_profile_reads_the_real_dump(sim: ModbusSim, ctx: DriverContext) -> None:
    for vector in VECTORS["sdm630_vectors"]:
        regs = [int(h, 16) for h in vector["registers_hex"]]
        sim.units[1].set("input", vector["register_address_0based"], regs)
    driver = ModbusDriver(
        "meter", profiled(ModbusDeviceConfig(bus="lan", unit_id=1, profile="eastron-sdm630")), ctx
    )
    readings = {r.point: r for r in await driver.read()}
    assert readings["voltage_l1"].value == pytest.approx(228.7, abs=1e-4)
    assert readings["voltage_l1"].unit == "V"
    assert readings["total_active_power"].value == pytest.approx(1260.81, abs=1e-3)
    assert readings["import_active_energy"].value == pytest.approx(0.097, abs=1e-6)
    assert readings["import_active_energy"].unit == "kWh"
    assert readings["frequency"].value == pytest.approx(49.95, abs=1e-4)
    # 35 float32 points, registers 0..0x159, limit 80 registers: a handful of requests, not 35
    assert driver.requests_last_cycle <= 6


async def test_illegal_address_split_is_learned_and_a_bad_point_is_isolated(
    sim: ModbusSim, ctx: DriverContext
) -> None:
    sim.units[2].holes = set(range(10, 20))
    points = {f"p{a}": {"address": a} for a in [*range(0, 10), *range(20, 30)]}
    sim.units[2].set("holding", 0, list(range(1000, 1030)))
    driver = make(ctx, 2, points)
    first = await driver.read_points([])
    assert len(first) == 20 and driver.point_errors == {}
    assert sim.count(2, 3) == 3  # merged request refused, then its two halves
    await driver.read_points([])
    assert sim.count(2, 3) == 5  # learned: two requests, no refusal any more
    # a point that is itself illegal goes to point_errors; the others are kept
    points["p15"] = {"address": 15}
    driver = make(ctx, 2, points)
    readings = values(await driver.read_points([]))
    assert len(readings) == 20 and readings["p29"] == 1029
    assert driver.point_errors == {"p15": "unit 2: function 3: exception 2: illegal data address"}
    before = sim.count(2, 3)
    await driver.read_points([])
    assert sim.count(2, 3) - before == 3  # p15 is read alone from now on: no more failed merges


async def test_all_points_refused_is_a_device_error(sim: ModbusSim, ctx: DriverContext) -> None:
    sim.units[3].illegal_from = 0
    driver = make(ctx, 3, {"a": {"address": 0}})
    with pytest.raises(DeviceProtocolError, match="exception 2: illegal data address"):
        await driver.read()


async def test_nan_goes_to_point_errors_never_a_value(sim: ModbusSim, ctx: DriverContext) -> None:
    sim.units[1].set("input", 0, [0x7FC0, 0x0000, 0x4364, 0xB333])
    driver = make(
        ctx,
        1,
        {
            "bad": {"table": "input", "address": 0, "type": "float32"},
            "good": {"table": "input", "address": 2, "type": "float32"},
        },
    )
    got = values(await driver.read())
    assert "bad" not in got and got["good"] == pytest.approx(228.7, abs=1e-4)
    assert "not a number" in driver.point_errors["bad"]


async def test_writes_read_back(sim: ModbusSim, ctx: DriverContext) -> None:
    unit = sim.units[4]
    unit.set("holding", 11, [0b1000_0001])
    driver = make(
        ctx,
        4,
        {
            "on": {"table": "coil", "address": 0, "writable": True},
            "dim": {"address": 10, "writable": True, "min": 0, "max": 100, "unit": "%"},
            "setpoint": {"address": 20, "type": "float32", "order": "CDAB", "writable": True},
            "tenths": {"address": 30, "type": "int16", "scale": 0.1, "writable": True, "min": -50, "max": 50},
            "force": {"address": 11, "bit": 4, "writable": True},
        },
    )
    assert await driver.write("on", True) is True
    assert unit.get("coil", 0) == [True] and sim.count(4, 5) == 1
    assert await driver.write("dim", 42) == 42
    assert unit.get("holding", 10) == [42] and sim.count(4, 6) == 1
    assert await driver.write("setpoint", 123.456) == pytest.approx(123.456, rel=1e-6)
    assert unit.get("holding", 20, 2) == [0xE979, 0x42F6] and sim.count(4, 16) == 1  # CDAB on the wire
    assert await driver.write("tenths", -12.34) == pytest.approx(-12.3)
    assert unit.get("holding", 30) == [(-123) & 0xFFFF]
    assert await driver.write("force", "on") is True
    assert unit.get("holding", 11) == [0b1001_0001]  # the other bits are kept
    assert await driver.write("force", False) is False
    assert unit.get("holding", 11) == [0b1000_0001]


@pytest.mark.parametrize(
    ("point", "value", "message"),
    [
        ("nope", 1, "unknown point"),
        ("ro", 1, "not writable"),
        ("dim", 101, "above the maximum 100"),
        ("dim", -1, "below the minimum 0"),
        ("dim", "bright", "expected a number"),
        ("dim", True, "boolean"),
        ("on", 5, "expected a boolean"),
        ("raw", 70000, "outside the uint16 range"),
    ],
)
async def test_write_refusals_touch_nothing(
    sim: ModbusSim, ctx: DriverContext, point: str, value: Any, message: str
) -> None:
    driver = make(
        ctx,
        5,
        {
            "on": {"table": "coil", "address": 0, "writable": True},
            "dim": {"address": 10, "writable": True, "min": 0, "max": 100},
            "raw": {"address": 12, "writable": True},
            "ro": {"table": "input", "address": 0},
        },
    )
    with pytest.raises(WriteRefused, match=message):
        await driver.write(point, value)
    assert sim.count(5) == 0


async def test_write_exception_is_reported_in_words(sim: ModbusSim, ctx: DriverContext) -> None:
    sim.units[6].illegal_from = 5
    driver = make(ctx, 6, {"x": {"address": 9, "writable": True, "min": 0, "max": 10}})
    with pytest.raises(DeviceProtocolError, match="exception 2: illegal data address"):
        await driver.write("x", 3)


async def test_read_points_unknown_name(ctx: DriverContext) -> None:
    driver = make(ctx, 1, {"a": {"address": 0}})
    with pytest.raises(PointError, match="unknown point"):
        await driver.read_points(["b"])


async def test_per_point_poll(sim: ModbusSim, ctx: DriverContext) -> None:
    driver = make(ctx, 1, {"fast": {"address": 0, "poll": "1s"}, "slow": {"address": 50}}, poll="1m")
    now = [1000.0]
    driver.clock = lambda: now[0]
    assert driver.cycle_interval() == 1.0
    assert set(values(await driver.read())) == {"fast", "slow"}
    now[0] += 0.2
    assert await driver.read() == []  # nothing due yet, and no request sent
    assert sim.count(1) == 2  # first cycle: "fast" (0) and "slow" (50) are too far apart to merge
    for _ in range(5):
        now[0] += 1.0
        assert set(values(await driver.read())) == {"fast"}  # slow is not due before a minute
    now[0] += 60.0
    assert set(values(await driver.read())) == {"fast", "slow"}
    assert sim.count(1) == 2 + 5 + 2


async def test_dead_unit_and_reconnect_after_connection_loss(sim: ModbusSim) -> None:
    sim.units[7].dead = True
    bus = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=sim.port, timeout="200ms")
    context = DriverContext(SharedResources(), {"lan": bus}, Path("."))
    dead = make(context, 7, {"a": {"address": 0}})
    alive = make(context, 8, {"a": {"address": 0}})
    with pytest.raises(DeviceUnreachable, match="no answer"):
        await dead.read()
    assert sim.count(7) == 1  # one request per cycle: pymodbus retries are off
    assert values(await alive.read_points([])) == {"a": 0}
    port = sim.port
    await sim.aclose()
    with pytest.raises(DeviceUnreachable):
        await alive.read_points([])
    again = ModbusSim({8: SimUnit()})
    again.units[8].set("holding", 0, [77])
    await again.start_tcp(port=port)
    try:
        assert values(await alive.read_points([])) == {"a": 77}
    finally:
        await context.shared.aclose()
        await again.aclose()


async def test_scan_tcp_finds_the_units(sim: ModbusSim) -> None:
    for uid in (2, 4, 6, 8, 9, 10):
        sim.units[uid].dead = True
    sim.units[5].illegal_from = 0
    seen: list[tuple[int, int]] = []
    hits = await scan_tcp("127.0.0.1", sim.port, range(1, 13), 0.2, progress=lambda d, t: seen.append((d, t)))
    assert [h.unit_id for h in hits] == [1, 3, 5, 7]
    assert hits[2].detail == "answers (exception 2: illegal data address)"
    assert seen[-1] == (12, 12) and len(seen) == 12


async def test_rtu_over_tcp() -> None:
    server = ModbusSim({1: SimUnit(), 3: SimUnit()})
    server.units[3].set("input", 0, [0x4364, 0xB333])
    port = await server.start_tcp(rtu_framing=True)
    bus = ModbusRtuTcpBusConfig(type="modbus-rtu-tcp", host="127.0.0.1", port=port, timeout="200ms")
    context = DriverContext(SharedResources(), {"lan": bus}, Path("."))
    try:
        driver = make(context, 3, {"v": {"table": "input", "address": 0, "type": "float32", "unit": "V"}})
        assert values(await driver.read())["v"] == pytest.approx(228.7, abs=1e-4)
        hits = await scan_tcp("127.0.0.1", port, [1, 2, 3], 0.2, rtu_framing=True)
        assert [h.unit_id for h in hits] == [1, 3]
    finally:
        await context.shared.aclose()
        await server.aclose()


async def test_demo_simulator_matches_the_bundled_profiles() -> None:
    handle = await start_tcp_simulator("127.0.0.1", 0, {1: "energy-meter", 2: "lamp-controller"})
    bus = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=handle.port, timeout="300ms")
    context = DriverContext(SharedResources(), {"lan": bus}, Path("."))
    try:
        meter = ModbusDriver(
            "meter", profiled(ModbusDeviceConfig(bus="lan", unit_id=1, profile="eastron-sdm630")), context
        )
        lamp = ModbusDriver(
            "lamp",
            profiled(ModbusDeviceConfig(bus="lan", unit_id=2, profile="streetlamp-controller")),
            context,
        )
        m = values(await meter.read())
        assert 220 < m["voltage_l1"] < 240 and m["import_active_energy"] >= 1234.5
        assert await lamp.write("dim", 50) == 50
        assert await lamp.write("on", True) is True
        step_behaviour(handle.sim.units[2], 3600.0)  # one simulated hour at 50 % of 100 W
        got = values(await lamp.read_points([]))
        assert got["power"] == pytest.approx(50, abs=1)
        assert got["energy"] >= 52_000 + 49 and got["lamp_failure"] is False
        await lamp.write("on", False)
        step_behaviour(handle.sim.units[2], 1.0)
        assert values(await lamp.read_points(["power"]))["power"] == 0
    finally:
        await context.shared.aclose()
        await handle.aclose()


async def test_a_busy_device_does_not_starve_another_on_the_bus(sim: ModbusSim, ctx: DriverContext) -> None:
    # 100 requests per cycle (one register per request) against one: the bus lock is taken per request, FIFO
    busy = make(ctx, 1, {f"r{i}": {"address": i} for i in range(100)}, max_registers_per_request=1)
    quiet = make(ctx, 2, {"a": {"address": 0}})
    busy_cycle = asyncio.create_task(busy.read_points([]))
    while sim.count(1) == 0:  # the busy device is on the bus
        await asyncio.sleep(0)
    queued_at = sim.count(1)
    assert queued_at < 90  # the busy cycle still has many requests to go
    assert len(await quiet.read_points([])) == 1
    assert len(await busy_cycle) == 100 and busy.requests_last_cycle == 100
    order = [unit for unit, _ in sim.sequence]
    # the quiet device waited for the request in flight (and at most one more), not the rest of the cycle
    assert order.index(2) <= queued_at + 2, order


async def test_scan_of_a_closed_port_is_an_error_in_words_not_an_empty_result(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    with pytest.raises(DeviceUnreachable, match=rf"cannot connect to 127\.0\.0\.1:{closed}"):
        await scan_tcp("127.0.0.1", closed, range(1, 248), 0.2)
    missing = tmp_path / "ttyUSB9"
    with pytest.raises(DeviceUnreachable, match="cannot open serial port"):
        await scan_serial(str(missing), range(1, 248), [9600, 19200], ["N"], 0.2)
    res = await fieldgate_cli("scan", "modbus", "--port", str(missing), "--units", "1-5", "--json")
    assert res.code == 1 and "cannot open serial port" in res.err and res.out == ""
