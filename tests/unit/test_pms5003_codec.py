"""PMS5003 codec against the shared vectors (frames, commands, invalid frames)."""

from __future__ import annotations

import pytest

from agent.errors import DecodeError
from drivers._serial.counters import ScanStats
from drivers.pms5003 import codec as pms
from tests.vectors import load_vectors

V = load_vectors("air_quality_serial.json")


@pytest.mark.parametrize("vector", V["pms5003_vectors"], ids=lambda v: v["id"])
def test_pms5003_frames(vector: dict) -> None:
    frame = bytes.fromhex(vector["input_hex"])
    exp = vector["expected"]
    values = pms.parse_frame(frame)
    mapping = {"pm1_0_cf1": "pm1_0_cf1", "pm2_5_cf1": "pm2_5_cf1", "pm10_cf1": "pm10_cf1",
               "pm1_0_atm": "pm1_0", "pm2_5_atm": "pm2_5", "pm10_atm": "pm10",
               "n0_3_per_0_1L": "n0_3", "n0_5_per_0_1L": "n0_5", "n1_0_per_0_1L": "n1_0",
               "n2_5_per_0_1L": "n2_5", "n5_0_per_0_1L": "n5_0", "n10_per_0_1L": "n10"}  # fmt: skip
    for vec_name, ours in mapping.items():
        assert values[ours] == exp[vec_name], vec_name
    assert f"{values['reserved']:04X}" == exp["reserved_word_hex"]
    assert frame[30:32].hex().upper() == exp["checksum"]
    if "pypms_warning" in exp:
        with pytest.raises(DecodeError, match="inconsistent"):
            pms.decode_cli(frame, {})
    elif not any(values.values()):
        with pytest.raises(DecodeError, match="warming up"):
            pms.decode_cli(frame, {})
    else:
        assert pms.decode_cli(frame, {}) == {k: values[k] for k in mapping.values()}


@pytest.mark.parametrize("vector", V["pms5003_command_vectors"], ids=lambda v: v["id"])
def test_pms5003_commands(vector: dict) -> None:
    built = {
        "pms5003-cmd-passive_mode": pms.passive_mode_command(True),
        "pms5003-cmd-passive_read": pms.read_command(),
        "pms5003-cmd-sleep": pms.sleep_command(True),
        "pms5003-cmd-wake": pms.sleep_command(False),
    }[vector["id"]]
    assert built.hex().upper() == vector["command_hex"]
    assert pms.decode_cli(built, {})["command"] == vector["id"].removeprefix("pms5003-cmd-")


def test_pms5003_bad_checksum_length_and_scanner() -> None:
    good = bytes.fromhex(V["pms5003_vectors"][0]["input_hex"])
    corrupt = good[:10] + bytes([good[10] ^ 1]) + good[11:]
    with pytest.raises(DecodeError, match="bad checksum"):
        pms.decode_cli(corrupt, {})
    with pytest.raises(DecodeError, match="bad length"):
        pms.decode_cli(good[:31], {})
    ack = bytes.fromhex("424D0004E1000174")  # answer to the mode command: valid, not data
    stats = ScanStats()
    buf = bytearray(b"\x42\x42" + corrupt + ack + good)
    assert pms.scan(buf, stats) == good
    assert stats.bad_checksum == 1


def test_pms5003_scanner_counts_noise_and_keeps_a_header_split_across_reads() -> None:
    good = bytes.fromhex(V["pms5003_vectors"][0]["input_hex"])
    stats = ScanStats()
    buf = bytearray(b"\x00B\x01" + good[:1])  # noise, a lone 'B', noise, then the first byte of a frame
    assert pms.scan(buf, stats) is None
    assert bytes(buf) == good[:1] and stats.garbage_bytes == 3  # the frame's 'B' waits for the next read
    buf += good[1:]
    assert pms.scan(buf, stats) == good
    assert stats.garbage_bytes == 3 and not buf
