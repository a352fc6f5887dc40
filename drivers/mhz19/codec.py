"""Winsen MH-Z19(B) codec: the read command, its 9-byte answer and a frame scanner (pure, no I/O).

Frames are 9 bytes, FF first; checksum = (0xFF - (sum(bytes 1..7) & 0xFF) + 1) & 0xFF.
Read CO2: FF 01 86 00 00 00 00 00 79; answer FF 86 HH LL .. .. .. .. CS, ppm = HH*256 + LL.
"""

from __future__ import annotations

from agent.errors import DecodeError
from agent.pipeline.reading import Value
from drivers._serial.counters import ScanStats, align

START, SENSOR, CMD_READ_CO2 = 0xFF, 0x01, 0x86
FRAME_LEN = 9
UNIT = "ppm"


def checksum(frame: bytes) -> int:
    return (0xFF - (sum(frame[1:8]) & 0xFF) + 1) & 0xFF


def build_command(command: int, data: bytes = b"") -> bytes:
    body = bytes([START, SENSOR, command]) + data.ljust(5, b"\x00")
    return body + bytes([checksum(body + b"\x00")])


def read_co2_command() -> bytes:
    return build_command(CMD_READ_CO2)


def check_frame(frame: bytes) -> None:
    if len(frame) != FRAME_LEN:
        raise DecodeError(f"bad length: {len(frame)} bytes, an MH-Z19 frame has {FRAME_LEN}")
    if frame[0] != START:
        raise DecodeError("malformed frame: must start with FF")
    if checksum(frame) != frame[8]:
        raise DecodeError(f"bad checksum: got {frame[8]:02X}, expected {checksum(frame):02X}")


def parse_co2(frame: bytes) -> int:
    """CO2 in ppm from the answer to the read command."""
    check_frame(frame)
    if frame[1] != CMD_READ_CO2:
        raise DecodeError(f"not a CO2 answer: command byte {frame[1]:02X}, expected 86")
    return int.from_bytes(frame[2:4], "big")


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode mhz19 HEX`: an answer (co2 ppm) or a command sent to the sensor."""
    check_frame(data)
    if data[1] == SENSOR:
        name = "read_co2" if data[2] == CMD_READ_CO2 else f"command_{data[2]:02X}"
        return {"command": name}
    return {"co2": parse_co2(data)}


def scan(buf: bytearray, stats: ScanStats) -> bytes | None:
    """Take the first valid CO2 answer out of `buf`; resynchronise byte by byte on noise."""
    while True:
        if not align(buf, START, (CMD_READ_CO2,), stats):
            return None
        if len(buf) < FRAME_LEN:
            return None
        frame = bytes(buf[:FRAME_LEN])
        if checksum(frame) != frame[8]:
            stats.bad_checksum += 1
            stats.last_problem = f"bad checksum: got {frame[8]:02X}, expected {checksum(frame):02X}"
            del buf[:1]
            continue
        del buf[:FRAME_LEN]
        return frame
