"""Xiaomi LYWSD03MMC custom firmware advertisements (service data 0x181A): ATC1441 and pvvx formats."""

from __future__ import annotations

from agent.errors import DecodeError
from agent.pipeline.reading import Value
from drivers.ble.advert import Measurement, Measurements, mac_from_bytes, scaled

ATC1441_LENGTH = 13
PVVX_LENGTH = 15


def decode_atc(data: bytes) -> Measurements:
    """ATC1441: 13 bytes, big-endian, from the MAC (normal order)."""
    if len(data) != ATC1441_LENGTH:
        raise DecodeError(f"ATC1441 service data is {ATC1441_LENGTH} bytes, got {len(data)}")
    return {
        "mac": Measurement(mac_from_bytes(data[0:6])),
        "temperature": Measurement(scaled(int.from_bytes(data[6:8], "big", signed=True), 0.1, 1), "°C"),
        "humidity": Measurement(data[8], "%"),
        "battery": Measurement(data[9], "%"),
        "battery_voltage": Measurement(int.from_bytes(data[10:12], "big"), "mV"),
        "frame_counter": Measurement(data[12]),
    }


def decode_pvvx(data: bytes) -> Measurements:
    """pvvx custom: 15 bytes, little-endian, from the MAC (reversed)."""
    if len(data) != PVVX_LENGTH:
        raise DecodeError(
            f"pvvx custom service data is {PVVX_LENGTH} bytes, got {len(data)}"
            + (" (encrypted pvvx format is not supported)" if len(data) in (11, 12, 8) else "")
        )
    return {
        "mac": Measurement(mac_from_bytes(data[0:6], reversed_order=True)),
        "temperature": Measurement(scaled(int.from_bytes(data[6:8], "little", signed=True), 0.01, 2), "°C"),
        "humidity": Measurement(scaled(int.from_bytes(data[8:10], "little"), 0.01, 2), "%"),
        "battery_voltage": Measurement(int.from_bytes(data[10:12], "little"), "mV"),
        "battery": Measurement(data[12], "%"),
        "frame_counter": Measurement(data[13]),
        "flags": Measurement(data[14]),
    }


def decode_cli_atc(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode atc HEX`: service data from the MAC."""
    return {name: m.value for name, m in decode_atc(data).items()}


def decode_cli_pvvx(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode pvvx HEX`: service data from the MAC."""
    return {name: m.value for name, m in decode_pvvx(data).items()}


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """Either format, told apart by length (13 bytes ATC1441, 15 bytes pvvx)."""
    if len(data) == PVVX_LENGTH:
        return decode_cli_pvvx(data, options)
    return decode_cli_atc(data, options)
