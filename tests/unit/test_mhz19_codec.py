"""MH-Z19 (and the Senseair S8 guard) codec against the shared vectors (frames, commands, invalid frames)."""

from __future__ import annotations

import pytest

from agent.errors import DecodeError
from drivers._serial.counters import ScanStats
from drivers.mhz19 import codec as mhz19
from tests.vectors import load_vectors

V = load_vectors("air_quality_serial.json")


@pytest.mark.parametrize("vector", V["mhz19_vectors"], ids=lambda v: v["id"])
def test_mhz19_frames(vector: dict) -> None:
    exp = vector["expected"]
    if "command_hex" in vector:
        assert mhz19.read_co2_command().hex().upper() == vector["command_hex"]
        assert mhz19.decode_cli(bytes.fromhex(vector["command_hex"]), {}) == {"command": "read_co2"}
        return
    frame = bytes.fromhex(vector["input_hex"])
    if not exp["checksum_valid"]:
        with pytest.raises(DecodeError, match="bad checksum"):
            mhz19.decode_cli(frame, {})
        return
    assert mhz19.parse_co2(frame) == exp["co2_ppm"]
    assert mhz19.decode_cli(frame, {}) == {"co2": exp["co2_ppm"]}


def test_mhz19_length_and_scanner() -> None:
    good = bytes.fromhex("FF8601F40000000085")
    with pytest.raises(DecodeError, match="bad length"):
        mhz19.decode_cli(good[:8], {})
    stats = ScanStats()
    buf = bytearray(b"\xff\xff\x86" + bytes.fromhex("8601F40000000086") + good)
    assert mhz19.scan(buf, stats) == good
    assert stats.bad_checksum >= 1


def test_senseair_s8_vectors_are_not_ours() -> None:
    # S8 speaks Modbus RTU: the modbus driver reads it. The vectors exist: guard that they stay Modbus.
    for v in V["senseair_s8_vectors"]:
        assert bytes.fromhex(v["input_hex"])[1] == 0x04
