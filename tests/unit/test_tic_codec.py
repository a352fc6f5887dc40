"""Linky TIC codec against the shared vectors (every group and frame, valid and invalid)."""

from __future__ import annotations

import pytest

from agent.errors import DecodeError
from drivers.tic import codec
from tests.vectors import load_vectors

V = load_vectors("linky_tic.json")
HIST = V["group_vectors_historic"]
STD = V["group_vectors_standard"]
FRAMES = V["frame_vectors"]


def _raw(vector: dict) -> bytes:
    data = bytes.fromhex(vector["group_hex_with_LF_CR"]) if "group_hex_with_LF_CR" in vector else None
    if data is not None:
        assert data[0] == codec.LF and data[-1] == codec.CR
        return data[1:-1]
    return vector["group_text"].encode("ascii")


@pytest.mark.parametrize(("mode", "vector"), [("historic", v) for v in HIST] + [("standard", v) for v in STD],
                         ids=[v["id"] for v in HIST + STD])  # fmt: skip
def test_group_vectors(mode: codec.Mode, vector: dict) -> None:
    expected = vector["expected"]
    raw = _raw(vector)
    if expected.get("error") == "Malformed":
        with pytest.raises(DecodeError, match="malformed"):
            codec.parse_group(raw, mode)
        return
    if expected.get("checksum_valid") is False:
        with pytest.raises(DecodeError, match="bad checksum"):
            codec.parse_group(raw, mode)
        return
    group = codec.parse_group(raw, mode)
    assert group.label == expected["label"]
    assert group.data == expected["data"]
    if "checksum_char" in expected:
        assert group.checksum == expected["checksum_char"]
    if "horodate" in expected:
        assert (group.horodate.text if group.horodate else None) == expected["horodate"]
    if "horodate_decoded" in expected:
        assert group.horodate is not None
        assert group.horodate.season == expected["horodate_decoded"]["season"]
        assert group.horodate.iso_local() == expected["horodate_decoded"]["datetime_local"]
    if "value" in expected:
        value, unit = codec.value_of(group, mode)
        assert value == expected["value"]
        assert unit == expected.get("unit")


@pytest.mark.parametrize("vector", FRAMES, ids=[v["id"] for v in FRAMES])
def test_frame_vectors(vector: dict) -> None:
    frame = bytes.fromhex(vector["frame_hex"])
    body = codec.split_frame(frame)
    result = codec.parse_frame_body(body, vector["mode"])
    assert result.errors == []
    assert {g.label: g.data for g in result.groups} == vector["expected"]
    assert codec.detect_mode(body) == vector["mode"]
    assert codec.BAUDRATE[vector["mode"]] == vector["baud"]
    decoded = codec.decode_cli(frame, {"mode": vector["mode"]})
    for label, data in vector["expected"].items():
        assert label in decoded
        if data.strip().isdigit() and isinstance(decoded[label], int):
            assert decoded[label] == int(data)


def test_checksum_space_is_kept_when_parsing_from_the_end() -> None:
    group = codec.parse_group(b"HCHC 000723392  ", "historic")
    assert (group.data, group.checksum) == ("000723392", " ")


def test_wrong_mode_is_rejected() -> None:
    with pytest.raises(DecodeError, match="malformed"):
        codec.parse_group(b"EAST\t003519702\t*", "historic")
    frame = bytes.fromhex(FRAMES[0]["frame_hex"])
    with pytest.raises(DecodeError, match="historic mode"):
        codec.decode_cli(frame, {"mode": "historic"})


def test_decode_cli_rejects_bad_checksum_and_truncation() -> None:
    good = bytes.fromhex(next(f for f in FRAMES if f["mode"] == "historic")["frame_hex"])
    bad = good.replace(b"BASE 123456789 8", b"BASE 123456789 9")
    assert bad != good
    with pytest.raises(DecodeError, match="bad checksum in group BASE"):
        codec.decode_cli(bad, {"mode": "historic"})
    with pytest.raises(DecodeError, match="STX"):
        codec.decode_cli(good[:-3], {"mode": "historic"})
    with pytest.raises(DecodeError, match="unknown TIC mode"):
        codec.decode_cli(good, {"mode": "turbo"})


def test_degraded_clock_season_is_lower_case() -> None:
    payload = b"SMAXSN\th240210110331\t00986\t"
    raw = payload + codec.checksum(payload).encode()
    group = codec.parse_group(raw, "standard")
    assert group.horodate is not None and group.horodate.degraded
    assert codec.value_of(group, "standard") == (986, "VA")


def test_assembler_resynchronises_after_partial_frames_and_garbage() -> None:
    frame = bytes.fromhex(FRAMES[1]["frame_hex"])
    stream = b"\x7fgarbage" + frame[5:] + frame[:10] + b"\x04" + frame[:7] + frame + b"zz" + frame
    asm = codec.FrameAssembler()
    bodies: list[bytes] = []
    for i in range(0, len(stream), 3):  # arbitrary chunking, as the UART delivers it
        bodies += asm.feed(stream[i : i + 3])
    # The tail of the frame cut at the start has no STX: garbage, never a frame.
    assert bodies == [frame[1:-1], frame[1:-1]]
    assert asm.partial_frames == 2  # EOT, then STX before ETX
    assert asm.garbage_bytes > 0
    good = [codec.parse_frame_body(b, "historic") for b in bodies]
    assert [len(r.groups) for r in good] == [2, 2]


# -- issue 17: a value with thousands of digits is a counted bad_value ---------------------------------


def _historic_group(label: str, data: str) -> bytes:
    payload = f"{label} {data}".encode()
    return b"\n" + payload + b" " + codec.checksum(payload).encode() + b"\r"


def test_value_with_thousands_of_digits_is_a_decode_error() -> None:
    """int() of 5000 digits raised ValueError (the interpreter's digit limit), escaping as a crash."""
    group = codec.parse_group(_historic_group("BASE", "9" * 5000)[1:-1], "historic")
    with pytest.raises(DecodeError, match="5000 digits"):
        codec.value_of(group, "historic")


def test_driver_counts_a_huge_value_as_bad_value_and_keeps_the_other_groups(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from agent.driver import DriverContext, SharedResources
    from drivers.tic import driver as tic_driver
    from drivers.tic.config import TicDeviceConfig

    config = TicDeviceConfig.model_validate({"driver": "linky-tic", "port": "/dev/null", "labels": "all"})
    driver = tic_driver.TicDriver("linky", config, DriverContext(SharedResources(), {}, Path(".")))
    body = _historic_group("BASE", "1" * 5000) + _historic_group("PAPP", "00420")
    readings = driver._frame_readings(body, 0)
    assert [(r.point, r.value) for r in readings] == [("PAPP", 420)]
    assert driver.counters["bad_value"] == 1

    # An unexpected exception in the codec is a bug: counted, logged once with its traceback, group lost only.
    def broken(group: codec.TicGroup, mode: codec.Mode) -> tuple[object, object]:
        if group.label == "BASE":
            raise ZeroDivisionError("boom")
        return codec.value_of(group, mode)

    monkeypatch.setattr(tic_driver, "value_of", broken)
    for _ in range(2):
        readings = driver._frame_readings(_historic_group("BASE", "1") + _historic_group("PAPP", "00420"), 0)
        assert [r.point for r in readings] == ["PAPP"]
    assert driver.counters["codec_bugs"] == 2
    assert sum(1 for r in caplog.records if r.exc_info) == 1
