"""The M-Bus driver over a pseudo-terminal: one undecodable record never costs the meter's readout."""

from __future__ import annotations

import asyncio
import os
import select
from pathlib import Path

import pytest

from agent.driver import DriverContext, SharedResources
from drivers.mbus import codec
from drivers.mbus.config import MbusDeviceConfig
from drivers.mbus.driver import MbusDriver


def frame_72(records_hex: str, address: int = 8) -> bytes:
    """RSP_UD, CI 72: meter 11490378, ACW, version 14, cold water, then the records."""
    header = bytes.fromhex("78034911 7704 0E 16 0A 00 0000")
    body = bytes([0x08, address, 0x72]) + header + bytes.fromhex(records_hex)
    return bytes([0x68, len(body), len(body), 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])


def _read_some(fd: int) -> bytes:
    r, _, _ = select.select([fd], [], [], 0.1)
    return os.read(fd, 256) if r else b""


async def _meter(master: int, answer: bytes, stop: asyncio.Event) -> None:
    """Answer every REQ_UD2 to address 8 with `answer` (SND_NKE with E5)."""
    loop = asyncio.get_running_loop()
    buf = b""
    while not stop.is_set():
        try:
            buf += await loop.run_in_executor(None, _read_some, master)
        except OSError:
            return
        while len(buf) >= 5:
            req, buf = buf[:5], buf[5:]
            if req == codec.snd_nke(8):
                os.write(master, b"\xe5")
            elif req in (codec.req_ud2(8), codec.req_ud2(8, True)):
                os.write(master, answer)


async def _read_once(answer: bytes) -> tuple[MbusDriver, dict[str, tuple[object, object]]]:
    master, slave = os.openpty()
    stop = asyncio.Event()
    shared = SharedResources()
    config = MbusDeviceConfig.model_validate(
        {"driver": "mbus", "port": os.ttyname(slave), "address": 8, "reply_timeout": "500ms", "retries": 0}
    )
    driver = MbusDriver("water-8", config, DriverContext(shared, {}, Path(".")))
    await driver.open()
    player = asyncio.create_task(_meter(master, answer, stop))
    try:
        readings = await asyncio.wait_for(driver.read(), 10)
    finally:
        stop.set()
        await player
        await shared.aclose()
        os.close(master)
        os.close(slave)
    return driver, {r.point: (r.value, r.unit) for r in readings}


async def test_type_i_datetime_no_longer_loses_the_readout() -> None:
    """DIF 06 VIF 6D raised OverflowError in the codec: the meter's whole readout was lost."""
    driver, values = await _read_once(frame_72("04 13 31 D4 00 00 06 6D 2D 0B 0B CD 13 00"))
    assert values["volume"] == (54.321, "m³")
    assert values["datetime"] == ("2014-03-13T11:11:45", None)
    assert driver.counters["bad_records"] == 0 and driver.counters["codec_bugs"] == 0


async def test_undecodable_record_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    driver, values = await _read_once(frame_72("03 6D 01 02 03 04 13 31 D4 00 00"))
    assert values["volume"] == (54.321, "m³")
    assert driver.counters["bad_records"] == 1
    assert "03 6D" in driver.point_errors["serial_line"]
    assert sum("record not decoded" in r.message for r in caplog.records) == 1


async def test_codec_bug_in_one_record_is_reported_not_fatal(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception decoding one record is a bug: counted, traceback logged once, others kept."""
    real = codec._fd

    def broken(code: int, *args: object, **kwargs: object) -> object:
        if code == 0x0E:
            raise ZeroDivisionError("boom")
        return real(code, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "_fd", broken)
    driver, values = await _read_once(frame_72("04 13 31 D4 00 00 09 FD 0E 02 09 FD 0F 06"))
    assert values["volume"] == (54.321, "m³") and values["software_version"] == (6, None)
    assert "firmware_version" not in values
    assert driver.counters["codec_bugs"] == 1
    assert sum(1 for r in caplog.records if r.exc_info) == 1


async def test_codec_bug_on_a_whole_frame_is_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(frame: bytes) -> codec.Telegram:
        raise IndexError("boom")

    monkeypatch.setattr(codec, "decode_long_frame", broken)
    with pytest.raises(Exception, match="codec bug: IndexError"):
        await _read_once(frame_72("04 13 31 D4 00 00"))
    assert sum(1 for r in caplog.records if r.exc_info) == 1
