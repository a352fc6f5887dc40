"""drivers/modbus/driver.py: the inline decode of plain one-register points gives the codec's values, decoders
are shared between points decoded alike, and points are due per poll interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.driver import DriverContext, SharedResources
from drivers.modbus import codec
from drivers.modbus.config import ModbusDeviceConfig, ModbusTcpBusConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.planner import ReadRequest


def make(points: dict[str, Any], **kw: Any) -> ModbusDriver:
    bus = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=1, timeout="300ms")
    context = DriverContext(SharedResources(), {"lan": bus}, Path("."))
    return ModbusDriver("dev", ModbusDeviceConfig(bus="lan", unit_id=1, points=points, **kw), context)


def decode_all(driver: ModbusDriver, registers: list[int]) -> dict[str, Any]:
    request = ReadRequest("holding", 0, len(registers), [driver._planned[n][0] for n in driver._points])
    return {r.point: r.value for r in driver._decode_request(request, registers, 1)}


def test_plain_points_decode_as_the_codec_does_over_every_16_bit_value() -> None:
    points = {
        "u": {"address": 0, "type": "uint16"},
        "s": {"address": 1, "type": "int16"},
        "u_cdab": {"address": 2, "type": "uint16", "order": "CDAB"},
        "s_badc": {"address": 3, "type": "int16", "order": "BADC"},  # byte swap: the codec's path
        "scaled": {"address": 4, "type": "int16", "scale": 0.1},  # scaled: the codec's path
    }
    driver = make(points)
    assert [driver._planned[n][1].plain for n in points] == [True, True, True, False, False]
    for raw in range(0, 0x10000, 7):
        got = decode_all(driver, [raw] * 5)
        for name, p in points.items():
            want = codec.decode([raw], p["type"], p.get("order", "ABCD"), scale=p.get("scale", 1.0))
            assert got[name] == want and type(got[name]) is type(want), (name, raw)


def test_a_register_beyond_16_bits_is_a_point_error_not_a_value() -> None:
    driver = make({"u": {"address": 0}})
    assert decode_all(driver, [0x10000]) == {}
    assert "not 16-bit" in driver.point_errors["u"]


def test_points_decoded_alike_share_one_decoder() -> None:
    a = make({f"r{i}": {"address": i} for i in range(50)})
    b = make({"x": {"address": 7}, "y": {"address": 8, "scale": 0.5}})
    decoders = {id(dec) for _, dec in a._planned.values()}
    assert len(decoders) == 1
    assert a._planned["r0"][1] is b._planned["x"][1]
    assert b._planned["y"][1] is not b._planned["x"][1]


def test_points_are_due_per_poll_interval() -> None:
    driver = make(
        {"fast": {"address": 0, "poll": "1s"}, "f2": {"address": 1, "poll": "1s"}, "slow": {"address": 9}},
        poll="1m",
    )
    assert driver.cycle_interval() == 1.0
    assert sorted(driver._groups) == [(1.0, ("fast", "f2")), (60.0, ("slow",))]
    assert driver._due(0.0) == [0, 1]  # never read: every group
    driver._last_read = [100.0, 100.0]
    assert driver._due(100.6) == [0]  # half a cycle of slack: the 1 s group is due again
    assert driver._due(100.4) == []
    assert driver._due(159.6) == [0, 1]
