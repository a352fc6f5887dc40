"""Pure Modbus value codec: registers <-> typed values (SPEC §2 types, orders, scale/offset); no I/O."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from agent.errors import DecodeError, WriteRefused
from agent.pipeline.reading import Value

# Modbus exception codes in words (Modbus Application Protocol v1.1b3, §7).
EXCEPTION_CODES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge (request accepted, still processing)",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def exception_text(code: int) -> str:
    """'exception 2: illegal data address' for a Modbus exception code."""
    return f"exception {code}: {EXCEPTION_CODES.get(code, 'unknown exception code')}"


_STRUCT: dict[str, str] = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT_MAX: dict[str, float] = {"float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308}


def registers_to_bytes(registers: Sequence[int], order: str) -> bytes:
    """The big-endian bytes (A first) of a value stored on the wire in `order`.

    For N registers the four orders generalise as: ABCD = big-endian, high word first;
    CDAB = word (16-bit) order reversed, bytes in each word big-endian; BADC = bytes
    swapped inside each word, high word first; DCBA = fully little-endian. For one
    register, ABCD and CDAB are the same and BADC/DCBA swap its two bytes.
    """
    for r in registers:
        if not 0 <= r <= 0xFFFF:
            raise DecodeError(f"register value {r} is not 16-bit")
    words = list(registers)
    if order in ("CDAB", "DCBA"):
        words.reverse()
    little = order in ("BADC", "DCBA")
    return b"".join(w.to_bytes(2, "little" if little else "big") for w in words)


def bytes_to_registers(data: bytes, order: str) -> list[int]:
    """Inverse of `registers_to_bytes`: big-endian bytes -> registers in wire order."""
    if len(data) % 2:
        raise ValueError("an even number of bytes is needed")
    little = order in ("BADC", "DCBA")
    words = [int.from_bytes(data[i : i + 2], "little" if little else "big") for i in range(0, len(data), 2)]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    return words


def apply_scale(raw: int | float, scale: float, offset: float) -> int | float:
    """value = raw × scale + offset; integers stay integers when the scaling is the identity."""
    if scale == 1.0 and offset == 0.0:
        return raw
    return raw * scale + offset


def decode(
    registers: Sequence[int],
    type_: str,
    order: str = "ABCD",
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    bit: int | None = None,
    length: int | None = None,
) -> Value:
    """Decode the registers of one point into its engineering value; DecodeError says why not."""
    if bit is not None:
        if not registers:
            raise DecodeError("no register to take a bit from")
        return bool((registers[0] >> bit) & 1)
    if type_ == "bool":
        if not registers:
            raise DecodeError("no value")
        return bool(registers[0])
    if type_ == "string":
        n = length if length is not None else len(registers)
        if len(registers) < n:
            raise DecodeError(f"string needs {n} registers, got {len(registers)}")
        raw = registers_to_bytes(registers[:n], order)
        text = raw.replace(b"\x00", b" ").strip(b" ")
        if any(c < 0x20 or c > 0x7E for c in text):
            raise DecodeError(f"string is not printable ASCII: {raw.hex(' ')}")
        return text.decode("ascii")
    if type_ == "uint16" or type_ == "int16":
        # The commonest point by far: one register, decoded without a bytes round trip (hot path).
        if not registers:
            raise DecodeError(f"{type_} needs 1 registers, got 0")
        r = registers[0]
        if not 0 <= r <= 0xFFFF:
            raise DecodeError(f"register value {r} is not 16-bit")
        if order == "BADC" or order == "DCBA":
            r = ((r & 0xFF) << 8) | (r >> 8)
        if type_ == "int16" and r >= 0x8000:
            r -= 0x10000
        scaled = apply_scale(r, scale, offset)
        if isinstance(scaled, float) and not math.isfinite(scaled):
            raise DecodeError("value out of range after scale/offset")
        return scaled
    fmt = _STRUCT.get(type_)
    if fmt is None:
        raise DecodeError(f"unknown type '{type_}'")
    size = struct.calcsize(fmt)
    need = size // 2
    if len(registers) < need:
        raise DecodeError(f"{type_} needs {need} registers, got {len(registers)}")
    (raw_value,) = struct.unpack(">" + fmt, registers_to_bytes(registers[:need], order))
    if isinstance(raw_value, float):
        if math.isnan(raw_value):
            raise DecodeError("not a number (NaN): the device reports no valid value")
        if math.isinf(raw_value):
            raise DecodeError("infinite value: the device reports no valid value")
    value = apply_scale(raw_value, scale, offset)
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError("value out of range after scale/offset")
    return value


def register_count(type_: str, length: int | None = None) -> int:
    if type_ == "string":
        return length or 1
    if type_ == "bool":
        return 1
    return struct.calcsize(_STRUCT[type_]) // 2


def coerce_bool(value: Value) -> bool:
    """A bool from what a command or the CLI may send: true/false, 0/1, "on"/"off"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "on", "1", "false", "off", "0"):
        return value.strip().lower() in ("true", "on", "1")
    raise WriteRefused(f"expected a boolean (true/false, on/off, 0/1), got {value!r}")


def coerce_number(value: Value) -> int | float:
    """A number from a command value; booleans are refused (a lamp level is not true/false)."""
    if isinstance(value, bool):
        raise WriteRefused(f"expected a number, got the boolean {value!r}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise WriteRefused(f"expected a finite number, got {value!r}")
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise WriteRefused(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise WriteRefused(f"expected a finite number, got {value!r}")
        return number
    raise WriteRefused(f"expected a number, got {value!r}")


def round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero (2.5 -> 3, -2.5 -> -3), as a technician expects."""
    from decimal import ROUND_HALF_UP, Decimal  # writes only: the polling daemon need not load it

    return int(Decimal(repr(x)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def encode(
    value: Value,
    type_: str,
    order: str = "ABCD",
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    length: int | None = None,
) -> list[int]:
    """Registers to write for an engineering value: inverse scale/offset, rounding, range check.

    raw = (value - offset) / scale; integer types round half away from zero; a raw
    value outside the type's range is refused (WriteRefused), never wrapped.
    """
    if type_ == "bool":
        return [1 if coerce_bool(value) else 0]
    if type_ == "string":
        if not isinstance(value, str):
            raise WriteRefused(f"expected a string, got {value!r}")
        n = length or 1
        try:
            data = value.encode("ascii")
        except UnicodeEncodeError:
            raise WriteRefused("only ASCII text can be written to a string point") from None
        if len(data) > 2 * n:
            raise WriteRefused(f"text of {len(data)} characters does not fit in {n} registers ({2 * n} max)")
        return bytes_to_registers(data.ljust(2 * n, b"\x00"), order)
    fmt = _STRUCT.get(type_)
    if fmt is None:
        raise WriteRefused(f"unknown type '{type_}'")
    number = coerce_number(value)
    raw: int | float
    if scale == 1.0 and offset == 0.0:
        raw = number
    else:
        if scale == 0.0:
            raise WriteRefused("a point with scale 0 cannot be written")
        raw = (number - offset) / scale
    packed: bytes
    if type_ in _INT_RANGE:
        raw_int = raw if isinstance(raw, int) else round_half_away(raw)
        lo, hi = _INT_RANGE[type_]
        if not lo <= raw_int <= hi:
            raise WriteRefused(f"{value!r} gives raw {raw_int}, outside the {type_} range {lo}..{hi}")
        packed = struct.pack(">" + fmt, raw_int)
    else:
        raw_float = float(raw)
        if not math.isfinite(raw_float) or abs(raw_float) > _FLOAT_MAX[type_]:
            raise WriteRefused(f"{value!r} does not fit in a {type_}")
        packed = struct.pack(">" + fmt, raw_float)
    return bytes_to_registers(packed, order)


def set_bit(register: int, bit: int, on: bool) -> int:
    """The register with one bit set or cleared (read-modify-write of a `bit` point)."""
    return (register | (1 << bit)) if on else (register & ~(1 << bit) & 0xFFFF)
