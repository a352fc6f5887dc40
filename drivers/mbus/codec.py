"""Wired M-Bus codec: short/long frames (EN 13757-2) and CI 0x72 variable data records (EN 13757-3).

Pure functions, no I/O. Records are mapped to named points with units; a
record this codec does not understand (unknown VIF, manufacturer-specific
extension) is listed in `skipped` rather than published under a guessed name:
a missing point is better than a wrong one.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from agent.errors import DecodeError
from agent.reading import Value

ACK = 0xE5
SHORT_START, LONG_START, STOP = 0x10, 0x68, 0x16
C_SND_NKE, C_REQ_UD2, C_REQ_UD2_FCB, C_RSP_UD = 0x40, 0x5B, 0x7B, 0x08
CI_VARIABLE, CI_VARIABLE_NO_HEADER = 0x72, 0x78

MEDIUM = {
    0x00: "other", 0x01: "oil", 0x02: "electricity", 0x03: "gas", 0x04: "heat (outlet)", 0x05: "steam",
    0x06: "warm water", 0x07: "water", 0x08: "heat cost allocator", 0x09: "compressed air",
    0x0A: "cooling (outlet)", 0x0B: "cooling (inlet)", 0x0C: "heat (inlet)", 0x0D: "heat / cooling",
    0x0E: "bus / system", 0x0F: "unknown", 0x15: "hot water", 0x16: "cold water", 0x17: "dual water",
    0x18: "pressure", 0x19: "A/D converter",
}  # fmt: skip


def short_frame(control: int, address: int) -> bytes:
    """10 C A CS 16, CS = (C + A) & 0xFF."""
    if not 0 <= address <= 255:
        raise ValueError("M-Bus address is 0..255")
    return bytes([SHORT_START, control, address, (control + address) & 0xFF, STOP])


def snd_nke(address: int) -> bytes:
    """Link reset: the meter answers E5 and restarts its telegram sequence."""
    return short_frame(C_SND_NKE, address)


def req_ud2(address: int, fcb: bool = False) -> bytes:
    """Request class 2 data; the FCB bit toggles between successive telegrams of a multi-telegram readout."""
    return short_frame(C_REQ_UD2_FCB if fcb else C_REQ_UD2, address)


@dataclass(frozen=True, slots=True)
class LongFrame:
    control: int
    address: int
    ci: int
    data: bytes  # after CI, before CS


def parse_short_frame(frame: bytes) -> tuple[int, int]:
    """(C, A) of a short frame; DecodeError on length, delimiters or checksum."""
    if len(frame) != 5:
        raise DecodeError(f"bad length: {len(frame)} bytes, a short frame has 5")
    if frame[0] != SHORT_START or frame[4] != STOP:
        raise DecodeError("malformed short frame: must be 10 C A CS 16")
    if (frame[1] + frame[2]) & 0xFF != frame[3]:
        raise DecodeError(f"bad checksum: got {frame[3]:02X}, expected {(frame[1] + frame[2]) & 0xFF:02X}")
    return frame[1], frame[2]


def parse_long_frame(frame: bytes) -> LongFrame:
    """68 L L 68 C A CI data CS 16; DecodeError on length, delimiters or checksum."""
    if len(frame) < 9:
        raise DecodeError(f"bad length: {len(frame)} bytes, a long frame has at least 9")
    if frame[0] != LONG_START or frame[3] != LONG_START or frame[1] != frame[2]:
        raise DecodeError("malformed long frame: must start 68 L L 68")
    length = frame[1]
    if len(frame) != length + 6:
        raise DecodeError(f"bad length: L={length} announces {length + 6} bytes, got {len(frame)}")
    if frame[-1] != STOP:
        raise DecodeError("malformed long frame: no stop byte 16")
    body = frame[4 : 4 + length]
    if sum(body) & 0xFF != frame[-2]:
        raise DecodeError(f"bad checksum: got {frame[-2]:02X}, expected {sum(body) & 0xFF:02X}")
    if length < 3:
        raise DecodeError("bad length: a long frame carries C, A and CI")
    return LongFrame(body[0], body[1], body[2], bytes(body[3:]))


def frame_length(buf: bytes | bytearray) -> int | None:
    """How long the frame at the start of `buf` is, once enough is known; 0 if it cannot start a frame."""
    if not buf:
        return None
    if buf[0] == ACK:
        return 1
    if buf[0] == SHORT_START:
        return 5
    if buf[0] == LONG_START:
        if len(buf) < 4:
            return None
        if buf[1] != buf[2] or buf[3] != LONG_START:
            return 0
        return buf[1] + 6
    return 0


def manufacturer_code(raw: int) -> str:
    """Three letters packed 5 bits each (+64): 0x0477 -> 'ACW'."""
    return "".join(chr(((raw >> shift) & 0x1F) + 64) for shift in (10, 5, 0))


def _bcd_digits(data: bytes) -> str:
    return data[::-1].hex().upper()


@dataclass(slots=True)
class Record:
    """One decoded data record: a point name, its value and unit, and how it was coded."""

    name: str
    value: Value
    unit: str | None
    dif_vif: str


@dataclass(slots=True)
class Telegram:
    """A decoded RSP_UD: fixed header fields, records, and what was skipped (with why)."""

    address: int
    header: dict[str, Value] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # records that could not be decoded (DecodeError), why
    bugs: list[tuple[str, Exception]] = field(default_factory=list)  # unexpected exceptions: codec bugs
    more_follows: bool = False  # DIF 1F: the meter has another telegram

    def values(self) -> dict[str, tuple[Value, str | None]]:
        out: dict[str, tuple[Value, str | None]] = {k: (v, None) for k, v in self.header.items()}
        for r in self.records:
            out[r.name] = (r.value, r.unit)
        return out


# Primary VIF table: (mask, base) -> (name, unit, exponent offset). value = raw * 10^(n + offset).
_VIF_RANGES: tuple[tuple[int, int, str, str, int], ...] = (
    (0x78, 0x00, "energy", "Wh", -3),
    (0x78, 0x08, "energy", "J", 0),
    (0x78, 0x10, "volume", "m³", -6),
    (0x78, 0x18, "mass", "kg", -3),
    (0x78, 0x28, "power", "W", -3),
    (0x78, 0x30, "power", "J/h", 0),
    (0x78, 0x38, "volume_flow", "m³/h", -6),
    (0x78, 0x40, "volume_flow", "m³/min", -7),
    (0x78, 0x48, "volume_flow", "m³/s", -9),
    (0x78, 0x50, "mass_flow", "kg/h", -3),
    (0x7C, 0x58, "flow_temperature", "°C", -3),
    (0x7C, 0x5C, "return_temperature", "°C", -3),
    (0x7C, 0x60, "temperature_difference", "K", -3),
    (0x7C, 0x64, "external_temperature", "°C", -3),
    (0x7C, 0x68, "pressure", "bar", -3),
)  # fmt: skip
_DURATION_FACTOR = (1, 60, 3600, 86400)  # n = 0..3: seconds, minutes, hours, days
_DURATION_VIFS = {
    0x20: "on_time",
    0x24: "operating_time",
    0x70: "averaging_duration",
    0x74: "actuality_duration",
}
_FD_NAMES = {
    0x08: "access_number", 0x09: "medium_code", 0x0A: "manufacturer_code", 0x0B: "parameter_set",
    0x0C: "model_version", 0x0D: "hardware_version", 0x0E: "firmware_version", 0x0F: "software_version",
    0x10: "customer_location", 0x11: "customer", 0x12: "access_code_user", 0x13: "access_code_operator",
    0x14: "access_code_system_operator", 0x15: "access_code_developer", 0x16: "password",
    0x17: "error_flags", 0x18: "error_mask",
    0x1A: "digital_output", 0x1B: "digital_input", 0x1C: "baudrate", 0x1D: "response_delay",
    0x1E: "retry", 0x20: "first_storage_number", 0x21: "last_storage_number",
    0x22: "storage_block_size", 0x3A: "dimensionless", 0x60: "reset_counter", 0x61: "cumulation_counter",
    0x62: "control_signal", 0x63: "day_of_week", 0x64: "week_number", 0x65: "time_point_of_day_change",
    0x66: "parameter_activation_state", 0x67: "special_supplier_information",
    0x74: "battery_remaining_days",
}  # fmt: skip
_FD_UNITS = {0x1C: "Bd", 0x1D: "bit times", 0x74: "d"}
# FD durations: name, then (factor, unit) for codes base..base+3, EN 13757-3 Table 14. Months and
# years have no fixed length in seconds: their count is published as such.
_SECONDS = ((1, "s"), (60, "s"), (3600, "s"), (86400, "s"))
_CALENDAR = ((1, "month"), (1, "a"))
_FD_DURATIONS: dict[int, tuple[str, tuple[tuple[int, str], ...]]] = {
    0x24: ("storage_interval", _SECONDS),
    0x28: ("storage_interval", _CALENDAR),
    0x2C: ("duration_since_last_readout", _SECONDS),
    0x34: ("tariff_period", _SECONDS),
    0x38: ("tariff_period", _CALENDAR),
    0x68: ("duration_since_last_cumulation", ((3600, "s"), (86400, "s"), *_CALENDAR)),
    0x6C: ("battery_operating_time", ((3600, "s"), (86400, "s"), *_CALENDAR)),
}
# FB (first extension table, EN 13757-3 Table 14): (mask, base, name, unit, exponent of the code's n).
_FB_RANGES: tuple[tuple[int, int, str, str, int], ...] = (
    (0x7E, 0x00, "energy", "Wh", 5),  # 10^(n-1) MWh
    (0x7E, 0x08, "energy", "J", 8),  # 10^(n-1) GJ
    (0x7E, 0x10, "volume", "m³", 2),  # 10^(n+2) m³
    (0x7E, 0x18, "mass", "kg", 5),  # 10^(n+2) t
    (0x7E, 0x28, "power", "W", 5),  # 10^(n-1) MW
    (0x7E, 0x30, "power", "J/h", 8),  # 10^(n-1) GJ/h
    (0x7C, 0x58, "flow_temperature", "°F", -3),
    (0x7C, 0x5C, "return_temperature", "°F", -3),
    (0x7C, 0x60, "temperature_difference", "°F", -3),
    (0x7C, 0x64, "external_temperature", "°F", -3),
    (0x7C, 0x70, "temperature_limit", "°F", -3),
    (0x7C, 0x74, "temperature_limit", "°C", -3),
    (0x78, 0x78, "cumulative_max_power", "W", -3),
)  # fmt: skip
# VIFE qualifiers we know how to name (EN 13757-3 Table 15), with what they do to the unit: a rate
# ("per hour") divides the base unit by its time (m³ per hour is m³/h, not m³), a pulse weight by a
# pulse. 0x7F (manufacturer-specific VIFE) and any other VIFE make the record an error, never a guess.
_VIFE_SUFFIX = {0x20: "_per_second", 0x21: "_per_minute", 0x22: "_per_hour", 0x23: "_per_day",
                0x24: "_per_week", 0x25: "_per_month", 0x26: "_per_year",
                0x28: "_per_pulse_in0", 0x29: "_per_pulse_in1"}  # fmt: skip
_VIFE_UNIT = {0x20: "/s", 0x21: "/min", 0x22: "/h", 0x23: "/d", 0x24: "/week", 0x25: "/month",
              0x26: "/a", 0x28: "/pulse", 0x29: "/pulse"}  # fmt: skip
_DATA_LEN = {
    0x0: 0,
    0x1: 1,
    0x2: 2,
    0x3: 3,
    0x4: 4,
    0x5: 4,
    0x6: 6,
    0x7: 8,
    0x9: 1,
    0xA: 2,
    0xB: 3,
    0xC: 4,
    0xE: 6,
}
_FUNCTION_SUFFIX = ("", "_max", "_min", "_error")


def _scaled(raw: int, exponent: int) -> float | int:
    if exponent >= 0:
        return raw * int(10**exponent)
    return float(Decimal(raw).scaleb(exponent))


def _year(b0: int, b1: int) -> int:
    """Year of a type F/G/I date: 7 bits split over two bytes; 0-80 are 2000-2080, 81-99 are 1981-1999.

    EN 13757-3 Annex A: the century is not transmitted; for compatibility with older meters the
    values 81-99 mean 1981-1999 (libmbus and pyMeterBus read them so).
    """
    year = ((b0 & 0xE0) >> 5) | ((b1 & 0xF0) >> 1)
    return (1900 if year >= 81 else 2000) + year


def _date_g(b: bytes) -> str | None:
    day, month = b[0] & 0x1F, b[1] & 0x0F
    if not (1 <= day <= 31 and 1 <= month <= 12):
        return None  # 00-00: "no date" (e.g. a due date not yet set)
    return f"{_year(b[0], b[1]):04d}-{month:02d}-{day:02d}"


def _datetime_f(b: bytes) -> str | None:
    """Type F, 32 bits: minute (IV flag in bit 7), hour, then a type G date."""
    if b[0] & 0x80:  # IV bit: the meter flags its own time as invalid
        return None
    minute, hour = b[0] & 0x3F, b[1] & 0x1F
    date = _date_g(b[2:4])
    if date is None or minute > 59 or hour > 23:
        return None
    return f"{date}T{hour:02d}:{minute:02d}:00"


def _datetime_i(b: bytes) -> str | None:
    """Type I, 48 bits: second, minute (IV flag in bit 7), hour, then a type G date, then week data."""
    if b[1] & 0x80:
        return None
    second = b[0] & 0x3F
    minute = _datetime_f(b[1:5])
    if minute is None or second > 59:
        return None
    return f"{minute[:-2]}{second:02d}"


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "text"


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DecodeError(f"truncated record: {what} needs {n} byte(s) past the end of the frame")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def left(self) -> int:
        return len(self.data) - self.pos


def _decode_number(dtype: int, raw: bytes) -> int | None:
    """Integer value of fixed-length data; None for invalid BCD."""
    if dtype in (0x9, 0xA, 0xB, 0xC, 0xE):
        digits = _bcd_digits(raw)
        negative = digits.startswith("F")
        if negative:
            digits = digits[1:]
        if not digits.isdigit():
            return None
        return -int(digits) if negative else int(digits)
    return int.from_bytes(raw, "little", signed=True)


def _parse_records(data: bytes, telegram: Telegram) -> None:
    """Every record of `data` into `telegram`. One record's trouble never costs the others.

    A record whose data can be located but not read is an error for that record alone; one that
    cannot even be located (cut short, reserved coding) ends the parse, keeping the records before it.
    """
    cur = _Cursor(data)
    seen: dict[str, int] = {}
    while cur.left():
        start = cur.pos
        try:
            located = _locate_record(cur, data, telegram)
        except DecodeError as exc:
            telegram.errors.append(f"record at byte {start}: {exc}")
            return
        if located is None:
            if telegram.more_follows or cur.left() == 0:
                return
            continue
        dtype, function, coding = located.dif & 0x0F, (located.dif >> 4) & 0x03, located.coding
        try:
            record = _interpret(
                dtype, located.vif, located.vifes, located.text_vif, located.raw, located.lvar
            )
        except DecodeError as exc:
            telegram.errors.append(f"{coding}: {exc}")
            continue
        except Exception as exc:  # a codec bug: reported, and only this record is lost
            telegram.bugs.append((coding, exc))
            continue
        if isinstance(record, str):
            telegram.skipped.append(f"{coding}: {record}")
            continue
        name, value, unit = record
        name += _FUNCTION_SUFFIX[function] + located.suffix()
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        telegram.records.append(Record(name, value, unit, coding))


class _Located(NamedTuple):
    dif: int
    vif: int
    vifes: list[int]
    text_vif: str | None
    raw: bytes
    lvar: int
    coding: str  # DIF DIFE* VIF VIFE*, as hex
    storage: int
    tariff: int
    subunit: int

    def suffix(self) -> str:
        out = f"_s{self.storage}" if self.storage else ""
        if self.tariff:
            out += f"_t{self.tariff}"
        if self.subunit:
            out += f"_u{self.subunit}"
        return out


def _locate_record(cur: _Cursor, data: bytes, telegram: Telegram) -> _Located | None:
    """Read one record's DIB, VIB and data; None for fillers and the manufacturer-specific tail."""
    start = cur.pos
    dif = cur.take(1, "DIF")[0]
    if dif == 0x2F:  # idle filler
        return None
    if dif in (0x0F, 0x1F):
        rest = cur.take(cur.left(), "manufacturer data")
        telegram.more_follows = dif == 0x1F
        if rest:
            telegram.skipped.append(f"manufacturer-specific data ({len(rest)} bytes)")
        return None
    dtype = dif & 0x0F
    storage, tariff, subunit = (dif >> 6) & 0x01, 0, 0
    ext, n = dif, 0
    while ext & 0x80:
        ext = cur.take(1, "DIFE")[0]
        storage |= (ext & 0x0F) << (1 + 4 * n)
        tariff |= ((ext >> 4) & 0x03) << (2 * n)
        subunit |= ((ext >> 6) & 0x01) << n
        n += 1
        if n > 10:
            raise DecodeError("malformed record: more than 10 DIFEs")
    vif = cur.take(1, "VIF")[0]
    text_vif: str | None = None
    if vif & 0x7F == 0x7C:
        tlen = cur.take(1, "plain-text VIF length")[0]
        text_vif = cur.take(tlen, "plain-text VIF")[::-1].decode("latin-1")
    vifes: list[int] = []
    ext = vif
    while ext & 0x80:
        ext = cur.take(1, "VIFE")[0]
        vifes.append(ext)
        if len(vifes) > 10:
            raise DecodeError("malformed record: more than 10 VIFEs")
    if dtype == 0xD:
        lvar = cur.take(1, "LVAR")[0]
        raw = cur.take(_lvar_size(lvar), "variable-length data")
    elif dtype == 0x8 or dtype not in _DATA_LEN:
        raise DecodeError(f"unsupported DIF {dif:02X} (data type {dtype:X})")
    else:
        lvar = -1
        raw = cur.take(_DATA_LEN[dtype], "record data")
    coding = data[start : cur.pos - len(raw) - (1 if dtype == 0xD else 0)].hex(" ").upper()
    return _Located(dif, vif, vifes, text_vif, raw, lvar, coding, storage, tariff, subunit)


def _lvar_size(lvar: int) -> int:
    """Bytes of variable-length data: text (< C0), BCD (Cx, Dx), binary (Ex), floats (F0-F6)."""
    if lvar < 0xC0:
        return lvar
    if lvar < 0xF0:
        return lvar & 0x0F
    if lvar <= 0xF4:
        return 4 * (lvar - 0xEC)
    if lvar in (0xF5, 0xF6):
        return 48 if lvar == 0xF5 else 64
    raise DecodeError(f"malformed record: reserved LVAR {lvar:02X}")


def _interpret(
    dtype: int, vif: int, vifes: list[int], text_vif: str | None, raw: bytes, lvar: int
) -> tuple[str, Value, str | None] | str:
    """(name, value, unit) of one record, or the reason (in words) it is deliberately not published.

    A record this codec cannot read raises DecodeError (the caller counts it for that record alone).
    """
    if dtype == 0x0:
        return "no data"
    if dtype == 0xD:
        if lvar >= 0xC0:
            raise DecodeError(f"variable-length data of type LVAR {lvar:02X} not supported")
        text: str | None = raw[::-1].decode("latin-1")
        number: int | float | None = None
    elif dtype == 0x5:
        text, number = None, struct.unpack("<f", raw)[0]
    else:
        text, number = None, _decode_number(dtype, raw)
        if number is None:
            raise DecodeError("invalid BCD digits")
    if vif & 0x7F == 0x7F:  # its VIFEs, if any, are the manufacturer's too
        return f"manufacturer-specific VIF {vif:02X}: its meaning is the manufacturer's"
    suffix, unit_suffix = "", ""
    qualifiers = vifes if vif & 0x7F not in (0x7D, 0x7B) else vifes[1:]  # in FD/FB the first is the code
    for e in qualifiers:
        if e & 0x7F == 0x7F:
            return f"manufacturer-specific VIF extension {e:02X}: its meaning is the manufacturer's"
        if (e & 0x7F) not in _VIFE_SUFFIX:
            raise DecodeError(f"VIF extension {e:02X} not understood")
        suffix += _VIFE_SUFFIX[e & 0x7F]
        unit_suffix += _VIFE_UNIT[e & 0x7F]
    out = _name_value(dtype, vif, vifes, text_vif, number, text, raw, suffix)
    if isinstance(out, str) or not unit_suffix or out[2] is None:
        return out
    return out[0], out[1], out[2] + unit_suffix


def _name_value(
    dtype: int,
    vif: int,
    vifes: list[int],
    text_vif: str | None,
    number: int | float | None,
    text: str | None,
    raw: bytes,
    suffix: str,
) -> tuple[str, Value, str | None] | str:
    v = vif & 0x7F
    if text_vif is not None:
        value: Value = text if text is not None else number if number is not None else ""
        return _sanitize(text_vif) + suffix, value, None
    if v == 0x7D:
        return _fd(vifes[0] & 0x7F if vifes else -1, number, text, suffix)
    if v == 0x7B:
        return _fb(vifes[0] & 0x7F if vifes else -1, number, text, suffix)
    if v == 0x7F:
        return f"manufacturer-specific VIF {vif:02X}: its meaning is the manufacturer's"
    if v == 0x7E:
        return f"VIF {vif:02X} (any VIF, for readout selection) carries no quantity"
    if v in (0x6C, 0x6D):
        return _date_record(dtype, v, raw, suffix)
    if v == 0x6E and number is not None and text is None:
        return "hca_units" + suffix, number, None  # heat cost allocator: dimensionless units
    if v == 0x78:
        if number is None:
            raise DecodeError("fabrication number with unexpected data type")
        return "fabrication_number" + suffix, str(int(number)), None
    if v == 0x79:
        return "enhanced_identification" + suffix, str(number if text is None else text), None
    if v == 0x7A:
        return "bus_address" + suffix, _num(number), None
    if text is not None or number is None:
        raise DecodeError(f"VIF {vif:02X} with text data not mapped")
    for base, name in _DURATION_VIFS.items():
        if base <= v <= base + 3:
            return name + suffix, _scaled_num(number, 0) * _DURATION_FACTOR[v - base], "s"
    for mask, base, name, unit, offset in _VIF_RANGES:
        if v & mask == base:
            return name + suffix, _scaled_num(number, (v & ~mask & 0x7F) + offset), unit
    raise DecodeError(f"VIF {vif:02X} not mapped")


def _date_record(dtype: int, v: int, raw: bytes, suffix: str) -> tuple[str, Value, str | None] | str:
    """VIF 6C (type G date, 16 bits) and 6D (type F date-time, 32 bits; type I with seconds, 48 bits)."""
    if v == 0x6C:
        if dtype != 0x2:
            raise DecodeError(f"date (VIF 6C) in data type {dtype:X}: only type G (16 bits, DIF x2)")
        date = _date_g(raw)
        return ("date" + suffix, date, None) if date else "no date (00-00)"
    if dtype == 0x4:
        dt = _datetime_f(raw)
    elif dtype == 0x6:
        dt = _datetime_i(raw)
    else:
        raise DecodeError(
            f"date-time (VIF 6D) in data type {dtype:X}: only type F (32 bits, DIF x4) or I (48 bits, DIF x6)"
        )
    return ("datetime" + suffix, dt, None) if dt else "invalid date-time (flagged or out of range)"


def _fd(
    code: int, number: int | float | None, text: str | None, suffix: str
) -> tuple[str, Value, str | None] | str:
    """Second extension table (VIF FD), EN 13757-3 Table 14."""
    if code in _FD_NAMES:
        return _FD_NAMES[code] + suffix, text if text is not None else _num(number), _FD_UNITS.get(code)
    if code == 0x71 and number is not None and text is None:
        return "rssi" + suffix, int(number) * 2 - 130, "dBm"
    if number is None or text is not None:
        raise DecodeError(f"extended VIF FD {code:02X} with text data not mapped")
    if 0x00 <= code <= 0x07:
        name = "credit" if code < 0x04 else "debit"
        return name + suffix, _scaled_num(number, (code & 0x03) - 3), "currency units"
    if 0x40 <= code <= 0x4F:
        return "voltage" + suffix, _scaled_num(number, (code & 0x0F) - 9), "V"
    if 0x50 <= code <= 0x5F:
        return "current" + suffix, _scaled_num(number, (code & 0x0F) - 12), "A"
    for base, (name, units) in _FD_DURATIONS.items():
        if base <= code < base + len(units):
            factor, unit = units[code - base]
            return name + suffix, _scaled_num(number, 0) * factor, unit
    raise DecodeError(f"extended VIF FD {code:02X} not understood")


def _fb(
    code: int, number: int | float | None, text: str | None, suffix: str
) -> tuple[str, Value, str | None] | str:
    """First extension table (VIF FB), EN 13757-3 Table 14: large units and °F temperatures."""
    if number is None or text is not None:
        raise DecodeError(f"extended VIF FB {code:02X} with text data not mapped")
    for mask, base, name, unit, offset in _FB_RANGES:
        if code & mask == base:
            return name + suffix, _scaled_num(number, (code & ~mask & 0x7F) + offset), unit
    raise DecodeError(f"extended VIF FB {code:02X} not understood")


def _num(number: int | float | None) -> Value:
    return 0 if number is None else number


def _scaled_num(number: int | float, exponent: int) -> float | int:
    if isinstance(number, float):
        if exponent == 0:
            return number
        return number * 10.0**exponent
    return _scaled(number, exponent)


def decode_long_frame(frame: bytes) -> Telegram:
    """An RSP_UD long frame with variable data (CI 72 or 78) -> header fields and named records."""
    lf = parse_long_frame(frame)
    if lf.control & 0x4F != C_RSP_UD:
        raise DecodeError(f"not a data response: C field {lf.control:02X} (RSP_UD is 08/18/28/38)")
    telegram = Telegram(address=lf.address)
    data = lf.data
    if lf.ci == CI_VARIABLE:
        if len(data) < 12:
            raise DecodeError(f"bad length: the variable data header needs 12 bytes, got {len(data)}")
        ident = _bcd_digits(data[0:4])
        if not ident.isdigit():
            raise DecodeError(f"malformed header: identification {ident} is not BCD")
        medium = data[7]
        telegram.header = {
            "meter_id": ident,
            "manufacturer": manufacturer_code(int.from_bytes(data[4:6], "little")),
            "version": data[6],
            "medium": MEDIUM.get(medium, f"0x{medium:02X}"),
            "access_number": data[8],
            "status": data[9],
        }
        data = data[12:]
    elif lf.ci != CI_VARIABLE_NO_HEADER:
        raise DecodeError(f"unsupported CI field {lf.ci:02X} (supported: 72, 78 variable data)")
    _parse_records(data, telegram)
    return telegram


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode mbus HEX`: a long frame's header and records by point name; also short frames, E5."""
    if data == bytes([ACK]):
        return {"ack": True}
    if data[:1] == bytes([SHORT_START]):
        control, address = parse_short_frame(data)
        names = {C_SND_NKE: "SND_NKE", C_REQ_UD2: "REQ_UD2", C_REQ_UD2_FCB: "REQ_UD2"}
        return {"frame": names.get(control, f"C={control:02X}"), "address": address}
    telegram = decode_long_frame(data)
    out: dict[str, Value] = {"address": telegram.address}
    out.update({k: v for k, (v, _unit) in telegram.values().items()})
    if telegram.errors:
        out["record_errors"] = "; ".join(telegram.errors)
    if telegram.bugs:
        out["codec_bugs"] = "; ".join(f"{c}: {type(e).__name__}: {e}" for c, e in telegram.bugs)
    return out
