"""RuuviTag data format 5 (RAWv2) manufacturer data (company 0x0499); "not available" fields are omitted."""

from __future__ import annotations

from agent.errors import DecodeError
from agent.pipeline.reading import Value
from drivers.ble.advert import Measurement, Measurements, mac_from_bytes, scaled

DF5_LENGTH = 24


def decode(data: bytes) -> Measurements:
    """Decode manufacturer data from its format byte (the company id already removed)."""
    if len(data) < 1:
        raise DecodeError("empty Ruuvi manufacturer data")
    if data[0] != 5:
        raise DecodeError(f"Ruuvi data format {data[0]} is not supported (only format 5, RAWv2)")
    if len(data) != DF5_LENGTH:
        raise DecodeError(f"Ruuvi data format 5 is {DF5_LENGTH} bytes, got {len(data)}")

    def u16(at: int) -> int:
        return int.from_bytes(data[at : at + 2], "big")

    def s16(at: int) -> int:
        return int.from_bytes(data[at : at + 2], "big", signed=True)

    values: Measurements = {}
    if (t := s16(1)) != -0x8000:
        values["temperature"] = Measurement(scaled(t, 0.005, 3), "°C")
    if (h := u16(3)) != 0xFFFF:
        values["humidity"] = Measurement(scaled(h, 0.0025, 4), "%")
    if (p := u16(5)) != 0xFFFF:
        values["pressure"] = Measurement(p + 50000, "Pa")
    for axis, at in (("x", 7), ("y", 9), ("z", 11)):
        if (a := s16(at)) != -0x8000:
            values[f"acceleration_{axis}"] = Measurement(a, "mG")
    power = u16(13)
    if (battery := power >> 5) != 2047:
        values["battery_voltage"] = Measurement(battery + 1600, "mV")
    if (tx := power & 0x1F) != 31:
        values["tx_power"] = Measurement(tx * 2 - 40, "dBm")
    if (movement := data[15]) != 255:
        values["movement_counter"] = Measurement(movement)
    if (sequence := u16(16)) != 0xFFFF:
        values["measurement_sequence"] = Measurement(sequence)
    if data[18:24] != b"\xff" * 6:
        values["mac"] = Measurement(mac_from_bytes(data[18:24]))
    return values


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode ruuvi HEX`: manufacturer data from its format byte."""
    return {name: m.value for name, m in decode(data).items()}
