"""Plantower PMS5003 codec: 32-byte data frames, 7-byte commands, and a frame scanner (pure, no I/O).

Frame: 42 4D, length (BE, 28 for data), 13 BE words, checksum (BE) = 16-bit sum of the 30 bytes before.
Words: PM1/PM2.5/PM10 "CF=1", PM1/PM2.5/PM10 atmospheric (µg/m³), particle counts
>0.3/0.5/1/2.5/5/10 µm per 0.1 L, reserved (version, error code).
"""

from __future__ import annotations

from agent.errors import DecodeError
from agent.pipeline.reading import Value
from drivers._serial.counters import ScanStats, align

HEADER = b"BM"  # 42 4D
DATA_LENGTH = 28
FRAME_LEN = 4 + DATA_LENGTH
MAX_LENGTH = 64  # any declared length past this is noise

FIELDS: tuple[tuple[str, str], ...] = (
    ("pm1_0_cf1", "µg/m³"), ("pm2_5_cf1", "µg/m³"), ("pm10_cf1", "µg/m³"),
    ("pm1_0", "µg/m³"), ("pm2_5", "µg/m³"), ("pm10", "µg/m³"),
    ("n0_3", "/0.1L"), ("n0_5", "/0.1L"), ("n1_0", "/0.1L"),
    ("n2_5", "/0.1L"), ("n5_0", "/0.1L"), ("n10", "/0.1L"),
)  # fmt: skip
UNITS = dict(FIELDS)

CMD_MODE, CMD_READ, CMD_SLEEP = 0xE1, 0xE2, 0xE4


def _sum16(data: bytes) -> int:
    return sum(data) & 0xFFFF


def parse_frame(frame: bytes) -> dict[str, int]:
    """The 12 values and the reserved word of a data frame, checksum checked. No plausibility check."""
    if len(frame) != FRAME_LEN:
        raise DecodeError(f"bad length: {len(frame)} bytes, a PMS5003 data frame has {FRAME_LEN}")
    if frame[:2] != HEADER:
        raise DecodeError("malformed frame: must start with 42 4D")
    length = int.from_bytes(frame[2:4], "big")
    if length != DATA_LENGTH:
        raise DecodeError(f"bad length field: {length}, a data frame declares {DATA_LENGTH}")
    got, expected = int.from_bytes(frame[30:32], "big"), _sum16(frame[:30])
    if got != expected:
        raise DecodeError(f"bad checksum: got {got:04X}, expected {expected:04X}")
    words = [int.from_bytes(frame[i : i + 2], "big") for i in range(4, 30, 2)]
    out = {name: words[i] for i, (name, _unit) in enumerate(FIELDS)}
    out["reserved"] = words[12]
    return out


def check_plausible(values: dict[str, int]) -> None:
    """Reject frames the sensor sends while warming up or when its counter glitched.

    An all-zero frame is the fan spinning up; mass concentrations with zero
    particle counts are physically inconsistent (the masses are derived from
    the counts). Either would publish a wrong value.
    """
    measured = [values[name] for name, _ in FIELDS]
    if not any(measured) and values["reserved"] == 0:
        raise DecodeError("sensor warming up: every value is zero")
    counts = [values[n] for n in ("n0_3", "n0_5", "n1_0", "n2_5", "n5_0", "n10")]
    masses = [values[n] for n in ("pm1_0_cf1", "pm2_5_cf1", "pm10_cf1", "pm1_0", "pm2_5", "pm10")]
    if any(masses) and not any(counts):
        raise DecodeError(f"inconsistent frame: PM10={values['pm10']} µg/m³ but every particle count is 0")


def decode(frame: bytes) -> dict[str, int]:
    """A data frame's 12 values, checked and plausible."""
    values = parse_frame(frame)
    check_plausible(values)
    return {name: values[name] for name, _ in FIELDS}


def build_command(command: int, data: int = 0) -> bytes:
    body = HEADER + bytes([command]) + data.to_bytes(2, "big")
    return body + _sum16(body).to_bytes(2, "big")


def passive_mode_command(passive: bool = True) -> bytes:
    return build_command(CMD_MODE, 0 if passive else 1)


def read_command() -> bytes:
    return build_command(CMD_READ)


def sleep_command(sleep: bool) -> bytes:
    """Sleep (fan and laser off) or wake; a woken sensor needs ~30 s before its values are stable."""
    return build_command(CMD_SLEEP, 0 if sleep else 1)


_COMMAND_NAMES = {
    (CMD_MODE, 0): "passive_mode", (CMD_MODE, 1): "active_mode", (CMD_READ, 0): "passive_read",
    (CMD_SLEEP, 0): "sleep", (CMD_SLEEP, 1): "wake",
}  # fmt: skip


def parse_command(frame: bytes) -> dict[str, Value]:
    if len(frame) != 7 or frame[:2] != HEADER:
        raise DecodeError("malformed command: 7 bytes starting 42 4D")
    got, expected = int.from_bytes(frame[5:7], "big"), _sum16(frame[:5])
    if got != expected:
        raise DecodeError(f"bad checksum: got {got:04X}, expected {expected:04X}")
    data = int.from_bytes(frame[3:5], "big")
    return {"command": _COMMAND_NAMES.get((frame[2], data), f"command_{frame[2]:02X}"), "data": data}


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode pms5003 HEX`: a 32-byte data frame (checked for plausibility too), or a command."""
    if len(data) == 7:
        return parse_command(data)
    return dict(decode(data))


def scan(buf: bytearray, stats: ScanStats) -> bytes | None:
    """Take the first checksum-valid data frame out of `buf`; skip command answers, count noise."""
    while True:
        if not align(buf, HEADER[0], (HEADER[1],), stats):
            return None
        if len(buf) < 4:
            return None
        length = int.from_bytes(buf[2:4], "big")
        if length < 4 or length > MAX_LENGTH:
            stats.garbage_bytes += 1
            del buf[:1]
            continue
        total = 4 + length
        if len(buf) < total:
            return None
        frame = bytes(buf[:total])
        if int.from_bytes(frame[-2:], "big") != _sum16(frame[:-2]):
            stats.bad_checksum += 1
            stats.last_problem = f"bad checksum in a {total}-byte frame"
            del buf[:1]
            continue
        del buf[:total]
        if length == DATA_LENGTH:
            return frame
        # A command answer (length 4): valid, nothing to publish.
