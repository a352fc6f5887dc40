"""GATT characteristic value formats: bytes read from a characteristic -> a point value (pure)."""

from __future__ import annotations

import math
import struct

from agent.errors import DecodeError
from agent.reading import Value

_INTS: dict[str, tuple[int, str, bool]] = {
    "uint8": (1, "little", False),
    "int8": (1, "little", True),
    "uint16le": (2, "little", False),
    "int16le": (2, "little", True),
    "uint16be": (2, "big", False),
    "int16be": (2, "big", True),
    "uint24le": (3, "little", False),
    "int24le": (3, "little", True),
    "uint32le": (4, "little", False),
    "int32le": (4, "little", True),
    "uint32be": (4, "big", False),
    "int32be": (4, "big", True),
}


def decode_value(fmt: str, data: bytes, scale: float = 1.0, offset: float = 0.0) -> Value:
    """Decode the leading bytes of `data` as `fmt` and apply raw × scale + offset."""
    if fmt == "utf8":
        try:
            return data.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("characteristic value is not valid UTF-8") from None
    if fmt == "bool":
        if len(data) < 1:
            raise DecodeError("characteristic value is empty")
        return data[0] != 0
    raw: float
    if fmt in ("float32le", "float32be"):
        if len(data) < 4:
            raise DecodeError(f"{fmt} needs 4 bytes, got {len(data)}")
        raw = struct.unpack("<f" if fmt == "float32le" else ">f", data[:4])[0]
        if not math.isfinite(raw):
            raise DecodeError(f"{fmt} value is not a finite number")
    else:
        size, order, signed = _INTS[fmt]
        if len(data) < size:
            raise DecodeError(f"{fmt} needs {size} bytes, got {len(data)}")
        raw = int.from_bytes(data[:size], order, signed=signed)  # type: ignore[arg-type]
    if scale == 1.0 and offset == 0.0:
        return raw
    value = raw * scale + offset
    if not math.isfinite(value):
        raise DecodeError(f"{fmt} value {raw} × {scale:g} + {offset:g} is out of range")
    return round(value, 9)
