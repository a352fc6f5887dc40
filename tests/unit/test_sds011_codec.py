"""SDS011 codec against the shared vectors (frames, commands, invalid frames)."""

from __future__ import annotations

import pytest

from agent.errors import DecodeError
from drivers.sds011 import codec as sds
from drivers.serialport.counters import ScanStats
from tests.vectors import load_vectors

V = load_vectors("air_quality_serial.json")


@pytest.mark.parametrize("vector", V["sds011_vectors"], ids=lambda v: v["id"])
def test_sds011_frames(vector: dict) -> None:
    frame = bytes.fromhex(vector["input_hex"])
    exp = vector["expected"]
    if not exp["checksum_valid"]:
        with pytest.raises(DecodeError, match="bad checksum"):
            sds.decode_cli(frame, {})
        return
    m = sds.parse_data(frame)
    assert m.pm2_5 == exp["pm2_5_ugm3"] and m.pm10 == exp["pm10_ugm3"]
    assert round(m.pm2_5 * 10) == exp["pm2_5_raw"] and round(m.pm10 * 10) == exp["pm10_raw"]
    assert m.device_id == exp["device_id_hex"]
    assert frame[8] == exp["checksum"]
    assert sds.decode_cli(frame, {}) == {"pm2_5": m.pm2_5, "pm10": m.pm10, "device_id": m.device_id}


@pytest.mark.parametrize("vector", V["sds011_command_vectors"], ids=lambda v: v["id"])
def test_sds011_commands(vector: dict) -> None:
    built = {
        "sds011-cmd-passive_mode": sds.set_query_mode_command(True),
        "sds011-cmd-passive_read": sds.query_command(),
        "sds011-cmd-sleep": sds.sleep_command(True),
        "sds011-cmd-wake": sds.sleep_command(False),
    }[vector["id"]]
    assert built.hex().upper() == vector["command_hex"]
    assert vector["expected_reply_len"] == sds.FRAME_LEN
    decoded = sds.decode_cli(built, {})
    assert decoded["device_id"] == "FFFF"
    assert decoded["command"] in ("set_query_mode", "query", "sleep", "wake")


def test_sds011_rejects_length_and_scanner_skips_noise() -> None:
    good = bytes.fromhex(V["sds011_vectors"][0]["input_hex"])
    bad = bytes.fromhex(V["sds011_vectors"][-1]["input_hex"])
    with pytest.raises(DecodeError, match="bad length"):
        sds.decode_cli(good[:9], {})
    buf = bytearray(b"\x00\xaa\x11" + bad + good[:4])
    stats = ScanStats()
    assert sds.scan(buf, stats) is None
    buf += good[4:]
    assert sds.scan(buf, stats) == good
    assert stats.bad_checksum == 1 and stats.garbage_bytes >= 3


def test_a_codec_exception_is_a_counted_bug_never_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """The serial drivers' codec calls: only DecodeError is expected; anything else is a bug, counted."""
    from pathlib import Path

    from agent.driver import DriverContext, SharedResources
    from agent.errors import DeviceProtocolError
    from drivers.sds011.config import Sds011DeviceConfig
    from drivers.sds011.driver import Sds011Driver

    config = Sds011DeviceConfig.model_validate({"driver": "sds011", "port": "/dev/null"})
    driver = Sds011Driver("pm", config, DriverContext(SharedResources(), {}, Path(".")))

    def broken(frame: bytes) -> object:
        raise IndexError("boom")

    with pytest.raises(DeviceProtocolError, match="codec bug decoding the data frame: IndexError"):
        driver.decode(broken, b"\xaa", "data frame")

    def broken_scan(buf: bytearray, stats: ScanStats) -> bytes | None:
        if buf[:1] == b"\x00":
            raise IndexError("boom")
        return None

    buf = bytearray(b"\x00\x00\xaa")
    assert driver.frame_scan(broken_scan)(buf) is None
    assert buf == bytearray(b"\xaa")  # the bytes the scanner choked on were dropped, one at a time
    assert driver.counters["codec_bugs"] == 3
    assert sum(1 for r in caplog.records if r.exc_info) == 1
