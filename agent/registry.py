"""The explicit registry of drivers and bus types: one line each, imported lazily by dotted path.

No discovery: a driver exists for fieldgate when it has a line here (a test
checks each line imports and that its config's `driver` tag matches).
A gateway with only Modbus devices never imports bleak or pyserial, because
driver modules are imported only when a configured device needs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DriverEntry:
    name: str
    config: str  # "package.module:Class" of the pydantic config model (no I/O imports)
    driver: str  # "package.module:Class" of the Driver subclass (imports the protocol library)
    summary: str
    profiles: str | None = None  # "package.module:function" merging a `profile:` into a device's mapping


DRIVERS: dict[str, DriverEntry] = {
    e.name: e
    for e in [
        DriverEntry(
            "modbus",
            "drivers.modbus.config:ModbusDeviceConfig",
            "drivers.modbus.driver:ModbusDriver",
            "Modbus TCP / RTU / RTU-over-TCP device on a bus",
            profiles="drivers.modbus.profile:merge",
        ),
        DriverEntry(
            "ble",
            "drivers.ble.config:BleDeviceConfig",
            "drivers.ble.driver:BleDriver",
            "BLE sensor: BTHome v2 / Ruuvi / ATC / pvvx advertisements, or GATT polling",
        ),
        DriverEntry(
            "linky-tic",
            "drivers.tic.config:TicDeviceConfig",
            "drivers.tic.driver:TicDriver",
            "Enedis Linky TIC meter output (historic / standard mode)",
        ),
        DriverEntry(
            "sds011",
            "drivers.sds011.config:Sds011DeviceConfig",
            "drivers.sds011.driver:Sds011Driver",
            "Nova SDS011 PM2.5/PM10 sensor (serial)",
        ),
        DriverEntry(
            "pms5003",
            "drivers.pms5003.config:Pms5003DeviceConfig",
            "drivers.pms5003.driver:Pms5003Driver",
            "Plantower PMS5003 PM1/PM2.5/PM10 sensor (serial)",
        ),
        DriverEntry(
            "mhz19",
            "drivers.mhz19.config:Mhz19DeviceConfig",
            "drivers.mhz19.driver:Mhz19Driver",
            "Winsen MH-Z19 CO2 sensor (serial)",
        ),
        DriverEntry(
            "mbus",
            "drivers.mbus.config:MbusDeviceConfig",
            "drivers.mbus.driver:MbusDriver",
            "wired M-Bus meter (water, heat) through a level converter",
        ),
    ]
}

BUSES: dict[str, str] = {
    "modbus-tcp": "drivers.modbus.config:ModbusTcpBusConfig",
    "modbus-rtu": "drivers.modbus.config:ModbusRtuBusConfig",
    "modbus-rtu-tcp": "drivers.modbus.config:ModbusRtuTcpBusConfig",
}


DEFAULT_DRIVER = "modbus"  # the driver of a device that names none (SPEC §2)


def device_driver(device: Any) -> str:
    """The driver a device's config selects: its `driver` (a mapping as read, or a model), else Modbus. The
    config's device union dispatches on it (agent/config/models.py)."""
    if isinstance(device, dict):
        return str(device.get("driver", DEFAULT_DRIVER))
    return str(getattr(device, "driver", DEFAULT_DRIVER))


def drivers_named(devices: Any) -> set[str] | None:
    """The registered drivers the devices of a config as read select, for a device union of those only; None
    when one selects a driver not registered, or `devices` is not a mapping (the whole union then gives the
    same messages as ever: the list of every driver, where a mapping was expected)."""
    if not isinstance(devices, dict):
        return None
    names = {device_driver(d) for d in devices.values()}
    return names if names <= DRIVERS.keys() else None


def bus_resource(bus: str) -> tuple[str, str]:
    """The key of a configured bus in the drivers' SharedResources: every device on the bus shares what its
    driver made under it (one connection, one lock); a reload that changes the bus discards it."""
    return ("bus", bus)


def load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_class(name: str) -> Any:
    return load(DRIVERS[name].config)


def driver_class(name: str) -> Any:
    return load(DRIVERS[name].driver)


def profile_merge(name: str) -> Any:
    """The function that applies a profile to a device of driver `name` (its mapping as read), or None."""
    entry = DRIVERS.get(name)
    return load(entry.profiles) if entry is not None and entry.profiles else None
