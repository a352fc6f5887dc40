"""Serial line counters: counted always, logged as one summary per period at most (a noisy line can't flood)."""

from __future__ import annotations

import logging

import pytest

from drivers._serial.counters import LineCounters

NAMES = ("frames_ok", "bad_checksum", "garbage_bytes")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_bad_frames_gives_one_log_line_per_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    line = LineCounters("linky", NAMES, logging.getLogger("fieldgate.test.serial"), log_every=60, clock=clock)
    caplog.set_level(logging.WARNING, logger="fieldgate.test.serial")
    for i in range(280):  # 70 s of a noisy line, 4 bad frames a second
        clock.now += 0.25
        line.add("bad_checksum", problem=f"bad checksum in group PAPP #{i}")
        line.add("garbage_bytes", 3)
        line.add("frames_ok")
    assert line.values == {"frames_ok": 280, "bad_checksum": 280, "garbage_bytes": 840}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # 1120 problems, one summary when the minute was up
    assert "bad_checksum=" in warnings[0] and "frames_ok" not in warnings[0]
    assert "linky" in warnings[0] and "bad checksum in group PAPP" in warnings[0]

    caplog.clear()
    clock.now += 61
    line.add("garbage_bytes", 2)  # the next period logs the delta only
    (delta,) = [r.getMessage() for r in caplog.records]
    assert "bad_checksum=40," in delta and "garbage_bytes=125 " in delta  # since the last summary only

    caplog.clear()
    clock.now += 61
    line.add("frames_ok")  # a clean period: nothing to say
    assert caplog.records == []


def test_summary_names_the_problems_and_is_none_when_clean() -> None:
    line = LineCounters("co2", NAMES, logging.getLogger("fieldgate.test.serial"), clock=Clock())
    line.add("frames_ok", 5)
    assert line.summary() is None
    line.add("bad_checksum", problem="bad checksum: got 87, expected 86")
    line.add("garbage_bytes", 0)  # nothing counted, nothing said
    assert line.summary() == "bad_checksum=1 (last: bad checksum: got 87, expected 86)"


def test_align_drops_and_counts_noise_before_a_two_byte_header() -> None:
    from drivers._serial.counters import ScanStats, align

    stats = ScanStats()
    buf = bytearray(b"\x01\x02\xaa\x00\xaa")  # noise, a false start (AA 00), then a lone AA
    assert align(buf, 0xAA, (0xC0,), stats) is False  # needs the byte after the last AA
    assert buf == bytearray(b"\xaa") and stats.garbage_bytes == 4
    buf += b"\xc0\x01"
    assert align(buf, 0xAA, (0xC0,), stats) is True
    assert buf[:2] == b"\xaa\xc0" and stats.garbage_bytes == 4
