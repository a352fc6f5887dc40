"""Commands through the real ModbusDriver against a pymodbus simulator on 127.0.0.1: writes, refusals, ids."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
import yaml

from agent.config.models import MqttConfig
from agent.control.commands import CommandProcessor, CommandsConfig
from agent.driver import Driver, DriverContext, SharedResources
from agent.pipeline.health import DeviceHealth
from agent.pipeline.store import AsyncStore, Store
from agent.upstream.mqtt import Uplink
from drivers.modbus.config import ModbusDeviceConfig, ModbusTcpBusConfig
from drivers.modbus.driver import ModbusDriver
from tests.broker import Broker
from tests.modbus_sim import ModbusSim, SimUnit

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE = REPO_ROOT / "drivers" / "modbus" / "profiles" / "streetlamp-controller.yaml"
UNIT = 3
WRITE_CODES = (5, 6, 15, 16, 22, 23)  # every Modbus function code that changes a coil or a register


def writes(sim: ModbusSim) -> int:
    return sum(sim.count(UNIT, fc) for fc in WRITE_CODES)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    server = ModbusSim({UNIT: SimUnit()})
    await server.start_tcp()
    yield server
    await server.aclose()


@pytest.fixture
async def proc(sim: ModbusSim, tmp_path: Path) -> AsyncIterator[CommandProcessor]:
    bus = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=sim.port, timeout="300ms")
    context = DriverContext(SharedResources(), {"lan": bus}, tmp_path)
    points = yaml.safe_load(PROFILE.read_text())["points"]  # the profile's own register map
    config = ModbusDeviceConfig(bus="lan", unit_id=UNIT, points=points)
    lamp = ModbusDriver("lamp-1", config, context)
    await lamp.open()
    drivers: dict[str, Driver[Any]] = {"lamp-1": lamp}
    health = {"lamp-1": DeviceHealth(driver="modbus", state="ok")}
    processor = CommandProcessor(tmp_path / "commands.db", drivers.get, health.get, CommandsConfig())
    processor.open()
    yield processor
    processor.close()
    await lamp.close()
    await context.shared.aclose()


def command(**fields: Any) -> bytes:
    return orjson.dumps({"id": "dim-1", "device": "lamp-1", "point": "dim", "value": 40, **fields})


async def test_dim_command_changes_the_register_and_reports_the_read_back(
    proc: CommandProcessor, sim: ModbusSim
) -> None:
    result = await proc.handle(command(value=40))
    assert result is not None and result["ok"] is True and result["value"] == 40
    assert sim.units[UNIT].get("holding", 0) == [40]
    assert writes(sim) == 1


async def test_coil_command_switches_the_lamp(proc: CommandProcessor, sim: ModbusSim) -> None:
    result = await proc.handle(command(id="on-1", point="on", value=True))
    assert result is not None and result["ok"] is True and result["value"] is True
    assert sim.units[UNIT].get("coil", 0) == [True]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"value": 101}, "point 'dim': 101 is above the maximum 100 %"),
        ({"point": "power", "value": 5}, "point 'power' of 'lamp-1' is not writable"),
        ({"point": "nope"}, "unknown point 'nope' on device 'lamp-1'"),
        ({"device": "lamp-2"}, "unknown device 'lamp-2'"),
        ({"value": "40"}, "point 'dim' expects a number, got the string '40'"),
        ({"expires_ts": 1}, None),
    ],
)
async def test_refusals_write_nothing(
    proc: CommandProcessor, sim: ModbusSim, fields: dict[str, Any], error: str | None
) -> None:
    sim.units[UNIT].set("holding", 0, [77])
    result = await proc.handle(command(**fields))
    assert result is not None and result["ok"] is False
    if error is not None:
        assert result["error"] == error
    else:
        assert result["error"].startswith("expired: expires_ts 1 is ")
    assert writes(sim) == 0
    assert sim.units[UNIT].get("holding", 0) == [77]


async def test_the_same_id_twice_writes_once(proc: CommandProcessor, sim: ModbusSim) -> None:
    first = await proc.handle(command(value=55))
    sim.units[UNIT].set("holding", 0, [10])  # someone changed it locally since
    again = await proc.handle(command(value=55))
    assert first == again and first is not None and first["value"] == 55
    assert writes(sim) == 1
    assert sim.units[UNIT].get("holding", 0) == [10]  # the repeat did not touch the device


async def test_a_dead_device_gives_a_device_error_result(proc: CommandProcessor, sim: ModbusSim) -> None:
    sim.units[UNIT].dead = True
    result = await proc.handle(command(value=20))
    assert result is not None and result["ok"] is False
    assert result["error"].startswith("device error: ")
    assert proc.recent(1)[0]["outcome"] == "failed"


async def test_mqtt_command_round_trip_through_mosquitto(
    proc: CommandProcessor, sim: ModbusSim, broker: Broker, tmp_path: Path
) -> None:
    """Platform -> Mosquitto -> Uplink -> CommandProcessor -> Modbus, result back; a repeat writes once."""
    store = AsyncStore(Store(tmp_path / "buffer.db", 16 * 1024 * 1024))
    await store.open()
    uplink = Uplink(MqttConfig(url=broker.url), "gw-test", store, "test", on_command=proc.handle)
    run = asyncio.create_task(uplink.run())
    topic = "fieldgate/gw-test/commands"
    try:
        async with aiomqtt.Client(broker.host, broker.port, identifier="platform") as platform:
            await platform.subscribe(f"{topic}/result", qos=1)
            # Probe until the gateway answers (it subscribes once connected); refused probes write nothing.
            async with asyncio.timeout(10):
                probe = 0
                while True:
                    probe += 1
                    await platform.publish(topic, command(id=f"probe-{probe}", device="nowhere"), qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            async for message in platform.messages:
                                if orjson.loads(bytes(message.payload))["id"] == f"probe-{probe}":  # type: ignore[arg-type]
                                    break
                            break
            payload = command(id="mqtt-1", value=65)
            results = []
            for _ in range(2):  # the second as a redelivery after the result would come
                await platform.publish(topic, payload, qos=1)
                async with asyncio.timeout(10):
                    async for message in platform.messages:
                        doc = orjson.loads(bytes(message.payload))  # type: ignore[arg-type]
                        if doc["id"] == "mqtt-1":
                            results.append(doc)
                            break
    finally:
        await uplink.stop()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await store.close()
    assert results[0] == results[1]
    assert results[0]["id"] == "mqtt-1" and results[0]["ok"] is True and results[0]["value"] == 65
    assert sim.units[UNIT].get("holding", 0) == [65]
    assert writes(sim) == 1
