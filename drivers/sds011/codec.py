"""Nova SDS011 codec: data and reply frames, command frames, and a frame scanner (pure, no I/O).

Data frame (10 bytes): AA C0 PM25L PM25H PM10L PM10H ID1 ID2 CS AB, CS = sum(bytes 2..7) & 0xFF.
Command (19 bytes): AA B4 d1..d15 CS AB, d14 d15 = device id (FF FF = any), CS = sum(d1..d15) & 0xFF.
Command replies are 10-byte frames starting AA C5 with the same checksum rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import DecodeError
from agent.pipeline.reading import Value
from drivers._serial.counters import ScanStats, align

HEAD, TAIL, DATA, REPLY, COMMAND = 0xAA, 0xAB, 0xC0, 0xC5, 0xB4
FRAME_LEN, COMMAND_LEN = 10, 19
ANY_DEVICE = b"\xff\xff"

CMD_REPORTING_MODE, CMD_QUERY, CMD_SLEEP_WORK = 0x02, 0x04, 0x06
UNIT = "µg/m³"


@dataclass(frozen=True, slots=True)
class SdsMeasurement:
    pm2_5: float  # µg/m³
    pm10: float
    device_id: str  # 4 hex digits, as printed on the label bytes ID1 ID2


def _checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def check_frame(frame: bytes) -> None:
    """Validate a 10-byte data or reply frame; DecodeError in words."""
    if len(frame) != FRAME_LEN:
        raise DecodeError(f"bad length: {len(frame)} bytes, an SDS011 frame has {FRAME_LEN}")
    if frame[0] != HEAD or frame[9] != TAIL:
        raise DecodeError("malformed frame: must start with AA and end with AB")
    if frame[1] not in (DATA, REPLY):
        raise DecodeError(f"unknown frame type {frame[1]:02X} (C0 data, C5 command reply)")
    if _checksum(frame[2:8]) != frame[8]:
        raise DecodeError(f"bad checksum: got {frame[8]:02X}, expected {_checksum(frame[2:8]):02X}")


def parse_data(frame: bytes) -> SdsMeasurement:
    """PM2.5 and PM10 of a data frame (AA C0 ...)."""
    check_frame(frame)
    if frame[1] != DATA:
        raise DecodeError("not a data frame (C5 is a command reply)")
    pm25 = int.from_bytes(frame[2:4], "little")
    pm10 = int.from_bytes(frame[4:6], "little")
    return SdsMeasurement(pm25 / 10, pm10 / 10, frame[6:8].hex().upper())


def build_command(command: int, data: bytes = b"", device_id: bytes = ANY_DEVICE) -> bytes:
    """A 19-byte command: d1 = command, d2..d13 = data (zero padded), d14 d15 = device id."""
    if len(data) > 12 or len(device_id) != 2:
        raise ValueError("SDS011 command data is at most 12 bytes and the device id 2 bytes")
    body = bytes([command]) + data.ljust(12, b"\x00") + device_id
    return bytes([HEAD, COMMAND]) + body + bytes([_checksum(body), TAIL])


def query_command(device_id: bytes = ANY_DEVICE) -> bytes:
    return build_command(CMD_QUERY, b"", device_id)


def set_query_mode_command(query: bool = True, device_id: bytes = ANY_DEVICE) -> bytes:
    """Reporting mode: query (the sensor answers queries) or active (a frame every second)."""
    return build_command(CMD_REPORTING_MODE, bytes([1, 1 if query else 0]), device_id)


def sleep_command(sleep: bool, device_id: bytes = ANY_DEVICE) -> bytes:
    """Sleep (laser and fan off: they wear out in ~8000 h of work) or wake."""
    return build_command(CMD_SLEEP_WORK, bytes([1, 0 if sleep else 1]), device_id)


_COMMAND_NAMES = {
    (CMD_REPORTING_MODE, 1, 1): "set_query_mode",
    (CMD_REPORTING_MODE, 1, 0): "set_active_mode",
    (CMD_SLEEP_WORK, 1, 0): "sleep",
    (CMD_SLEEP_WORK, 1, 1): "wake",
}


def parse_command(frame: bytes) -> dict[str, Value]:
    """Name and device id of a 19-byte command frame."""
    if len(frame) != COMMAND_LEN:
        raise DecodeError(f"bad length: {len(frame)} bytes, an SDS011 command has {COMMAND_LEN}")
    if frame[0] != HEAD or frame[1] != COMMAND or frame[18] != TAIL:
        raise DecodeError("malformed command: must start with AA B4 and end with AB")
    if _checksum(frame[2:17]) != frame[17]:
        raise DecodeError(f"bad checksum: got {frame[17]:02X}, expected {_checksum(frame[2:17]):02X}")
    cmd = frame[2]
    name = (
        "query" if cmd == CMD_QUERY else _COMMAND_NAMES.get((cmd, frame[3], frame[4]), f"command_{cmd:02X}")
    )
    return {"command": name, "device_id": frame[15:17].hex().upper()}


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode sds011 HEX`: a 10-byte data frame, or a 19-byte command."""
    if len(data) == COMMAND_LEN and data[1:2] == bytes([COMMAND]):
        return parse_command(data)
    m = parse_data(data)
    return {"pm2_5": m.pm2_5, "pm10": m.pm10, "device_id": m.device_id}


def scan(buf: bytearray, stats: ScanStats) -> bytes | None:
    """Take the first valid 10-byte frame out of `buf`, dropping (and counting) what precedes it."""
    while True:
        if not align(buf, HEAD, (DATA, REPLY), stats):
            return None
        if len(buf) < FRAME_LEN:
            return None
        frame = bytes(buf[:FRAME_LEN])
        try:
            check_frame(frame)
        except DecodeError as exc:
            # A false start (AA inside noise) or a corrupted frame: resynchronise one byte further.
            if frame[9] == TAIL:
                stats.bad_checksum += 1
            else:
                stats.garbage_bytes += 1
            stats.last_problem = str(exc)
            del buf[:1]
            continue
        del buf[:FRAME_LEN]
        return frame
