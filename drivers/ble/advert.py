"""What an advertisement carries, independent of bleak: the parsed AD fields and decoded measurements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from agent.pipeline.reading import Value

# 16-bit service data UUIDs and company ids our decoders recognise.
BTHOME_UUID16 = 0xFCD2
ENVIRONMENTAL_SENSING_UUID16 = 0x181A  # ATC1441 and pvvx custom firmware
RUUVI_COMPANY_ID = 0x0499

# The Bluetooth base UUID, into which 16-bit UUIDs are placed (as bleak reports service data keys).
_BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"


class Measurement(NamedTuple):
    """One decoded value with its unit (None when it has none)."""

    value: Value
    unit: str | None = None


Measurements = dict[str, Measurement]


@dataclass(slots=True)
class Advertisement:
    """One received advertisement, as the scanner hands it to the devices."""

    address: str  # upper-case "AA:BB:CC:DD:EE:FF"
    rssi: int | None
    name: str | None = None
    service_data: dict[int, bytes] = field(default_factory=dict)  # 16-bit UUID -> bytes after the UUID
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)  # company id -> bytes after the id


def uuid16_of(uuid: str) -> int | None:
    """The 16-bit UUID inside a 128-bit one written as bleak does, or None for a vendor UUID."""
    uuid = uuid.lower()
    if len(uuid) == 36 and uuid.startswith("0000") and uuid.endswith(_BASE_UUID_SUFFIX):
        try:
            return int(uuid[4:8], 16)
        except ValueError:
            return None
    if len(uuid) == 4:
        try:
            return int(uuid, 16)
        except ValueError:
            return None
    return None


def uuid128_of(uuid16: int) -> str:
    return f"0000{uuid16:04x}{_BASE_UUID_SUFFIX}"


def normalize_address(address: str) -> str:
    return address.strip().upper()


def mac_from_bytes(data: bytes, *, reversed_order: bool = False) -> str:
    """A MAC written as printed ("A4:C1:38:..."), from 6 bytes in air order or reversed."""
    raw = data[::-1] if reversed_order else data
    return ":".join(f"{b:02X}" for b in raw)


def parse_ad_structures(data: bytes) -> tuple[dict[int, bytes], dict[int, bytes], str | None]:
    """Service data (16-bit UUIDs), manufacturer data and local name from raw AD structures.

    Malformed trailing structures are ignored: a radio payload is untrusted,
    and what was well formed before them is still usable.
    """
    service: dict[int, bytes] = {}
    manufacturer: dict[int, bytes] = {}
    name: str | None = None
    i = 0
    while i < len(data):
        length = data[i]
        if length == 0 or i + 1 + length > len(data):
            break
        ad_type, body = data[i + 1], data[i + 2 : i + 1 + length]
        if ad_type == 0x16 and len(body) >= 2:
            service[int.from_bytes(body[:2], "little")] = bytes(body[2:])
        elif ad_type == 0xFF and len(body) >= 2:
            manufacturer[int.from_bytes(body[:2], "little")] = bytes(body[2:])
        elif ad_type in (0x08, 0x09):
            name = body.decode("utf-8", errors="replace")
        i += 1 + length
    return service, manufacturer, name


def scaled(raw: int, factor: float, decimals: int) -> float:
    """raw × factor, rounded to the factor's resolution so that 2506 × 0.01 prints as 25.06."""
    return round(raw * factor, decimals)
