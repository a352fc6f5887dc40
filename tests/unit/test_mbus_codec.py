"""M-Bus codec against the libmbus water-meter frames (headers, records) and short frames."""

from __future__ import annotations

import pytest

from agent.errors import DecodeError
from drivers.mbus import codec
from tests.vectors import load_vectors

V = load_vectors("mbus_water_meters.json")


@pytest.mark.parametrize("vector", V["vectors"], ids=lambda v: v["id"])
def test_long_frame_headers(vector: dict) -> None:
    frame = bytes.fromhex(vector["frame_hex"])
    exp = vector["header_expected"]
    lf = codec.parse_long_frame(frame)
    assert (frame[1], lf.control, lf.address, lf.ci) == (
        exp["L"],
        int(exp["C"], 16),
        exp["A"],
        int(exp["CI"], 16),
    )
    t = codec.decode_long_frame(frame)
    assert t.header["meter_id"] == exp["id_bcd"]
    assert t.header["manufacturer"] == exp["manufacturer"]
    assert t.header["version"] == exp["version"]
    assert t.header["access_number"] == exp["access_number"]
    assert t.header["status"] == int(exp["status"], 16)
    assert t.header["medium"] == codec.MEDIUM[int(exp["medium_code"], 16)]


def _libmbus_values(vector: dict, quantity: str) -> list[object]:
    return [r["value"] for r in vector["records_expected_libmbus_norm_xml"] if r.get("quantity") == quantity]


@pytest.mark.parametrize("vector", V["vectors"], ids=lambda v: v["id"])
def test_records_agree_with_libmbus(vector: dict) -> None:
    t = codec.decode_long_frame(bytes.fromhex(vector["frame_hex"]))
    by_name = {r.name: r for r in t.records}
    fab = _libmbus_values(vector, "Fabrication No")
    assert by_name["fabrication_number"].value == str(int(float(str(fab[0]))))
    published = [r.value for r in t.records if r.name.startswith("volume") and r.unit == "m³"]
    libmbus_volumes = [float(str(v)) for v in _libmbus_values(vector, "Volume")]
    # Every volume we publish is one libmbus printed (we skip manufacturer-specific ones, never guess).
    for value in published:
        assert any(abs(float(value) - lv) < 1e-9 for lv in libmbus_volumes), value
    assert published, "every water meter answer carries a volume"
    datetimes = [str(v).removesuffix("Z") for v in _libmbus_values(vector, "Time point (date & time)")]
    assert by_name["datetime"].value == datetimes[0]


def test_itron_bm_plus_m_fully() -> None:
    v = V["vectors"][0]
    out = codec.decode_cli(bytes.fromhex(v["frame_hex"]), {})
    assert out["volume"] == 54.321
    assert out["volume_s1"] == 0.0
    assert out["datetime"] == "2014-03-13T11:11:00"
    assert out["firmware_version"] == 2 and out["software_version"] == 6
    assert out["operating_time"] == 0
    assert "date_s1" not in out  # 00-00 due date: not a date, not published
    t = codec.decode_long_frame(bytes.fromhex(v["frame_hex"]))
    assert {r.unit for r in t.records if r.name.startswith("volume")} == {"m³"}


def test_engelmann_flow_dates_and_durations() -> None:
    v = next(x for x in V["vectors"] if x["id"] == "mbus-efe_engelmann-waterstar")
    out = codec.decode_cli(bytes.fromhex(v["frame_hex"]), {})
    assert out["volume_flow_max"] == 2.07 and out["volume_flow"] == 0.0
    assert out["date_s1"] == "2013-12-31" and out["date"] == "2014-12-31"
    assert out["on_time"] == 102902400
    assert out["volume_s2"] == 0.332
    assert out["volume_per_pulse_in0"] == 0.000008


def test_plain_text_vif_and_manufacturer_vife() -> None:
    v = V["vectors"][1]
    t = codec.decode_long_frame(bytes.fromhex(v["frame_hex"]))
    out = {r.name: r.value for r in t.records}
    assert out["cust_id"] == "TEST CYBLE" and out["bat_time"] == 4338
    assert out["volume"] == 123.49
    assert any("7F" in s for s in t.skipped)  # the 0.2 m³ "volume" with a manufacturer VIFE is not published


def test_siemens_extension_table() -> None:
    v = next(x for x in V["vectors"] if x["id"] == "mbus-siemens_water")
    out = codec.decode_cli(bytes.fromhex(v["frame_hex"]), {})
    assert out["parameter_set"] == "WFH21"
    assert out["model_version"] == 2173253517322
    assert out["on_time"] == 75427200
    assert out["volume"] == 0.101


@pytest.mark.parametrize("vector", V["short_frame_vectors"], ids=lambda v: v["id"])
def test_short_frames(vector: dict) -> None:
    frame = bytes.fromhex(vector["frame_hex"])
    if vector["id"] == "mbus-ack":
        assert codec.decode_cli(frame, {}) == {"ack": True}
        return
    built = codec.snd_nke(1) if "nke" in vector["id"] else codec.req_ud2(1)
    assert built == frame
    out = codec.decode_cli(frame, {})
    assert out["address"] == 1 and out["frame"] in ("SND_NKE", "REQ_UD2")


def test_rejections_in_words() -> None:
    good = bytes.fromhex(V["vectors"][0]["frame_hex"])
    with pytest.raises(DecodeError, match="bad checksum"):
        codec.decode_cli(good[:-2] + bytes([good[-2] ^ 0xFF]) + good[-1:], {})
    with pytest.raises(DecodeError, match="bad length"):
        codec.decode_cli(good[:-5], {})
    with pytest.raises(DecodeError, match="bad checksum"):
        codec.decode_cli(bytes.fromhex("105B015D16"), {})
    with pytest.raises(DecodeError, match="malformed"):
        codec.decode_cli(bytes.fromhex("683C3D68") + good[4:], {})
    # A record cut short inside a valid frame: rebuild the frame with a truncated last record.
    # The records before it are kept; the cut record is a record error, not the loss of the frame.
    t = codec.decode_long_frame(frame_78("04 13 31 D4 00 00 04 13 31 D4"))
    assert [r.value for r in t.records] == [54.321]
    assert len(t.errors) == 1 and "truncated record" in t.errors[0]


def frame_78(records_hex: str, address: int = 1) -> bytes:
    """A RSP_UD long frame, CI 78 (no fixed header), around the given records."""
    body = bytes([0x08, address, 0x78]) + bytes.fromhex(records_hex)
    return bytes([0x68, len(body), len(body), 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])


def records_of(records_hex: str) -> dict[str, tuple[object, object]]:
    t = codec.decode_long_frame(frame_78(records_hex))
    assert not t.bugs
    return {r.name: (r.value, r.unit) for r in t.records}


# -- issue 23 -----------------------------------------------------------------------------------------


def test_type_i_date_time_with_seconds() -> None:
    """DIF 06 VIF 6D: 48-bit type I (EN 13757-3 Annex A). It raised OverflowError, losing the readout."""
    # 2014-03-13 11:11:45: second 45, minute 11, hour 11, then the type G date 13.03.14, then week data
    out = records_of("04 13 31 D4 00 00 06 6D 2D 0B 0B CD 13 00")
    assert out["datetime"] == ("2014-03-13T11:11:45", None)
    assert out["volume"] == (54.321, "m³")


def test_type_i_invalid_flag_is_skipped_with_reason() -> None:
    t = codec.decode_long_frame(frame_78("06 6D 2D 8B 0B CD 13 00 04 13 31 D4 00 00"))
    assert [r.name for r in t.records] == ["volume"]
    assert any("invalid date-time" in s for s in t.skipped)


def test_unreadable_record_is_a_record_error_and_the_others_are_kept() -> None:
    """A date in a 3-byte field cannot be read: that record is an error, the volume after it published."""
    t = codec.decode_long_frame(frame_78("03 6D 01 02 03 04 13 31 D4 00 00"))
    assert [r.name for r in t.records] == ["volume"]
    assert len(t.errors) == 1 and "03 6D" in t.errors[0] and "data type 3" in t.errors[0]
    assert "record_errors" in codec.decode_cli(frame_78("03 6D 01 02 03"), {})


def type_g(year: int, month: int, day: int) -> str:
    """A type G date's two bytes: day and the year's low 3 bits, then month and the year's high 4 bits."""
    return bytes([((year & 0x07) << 5) | day, ((year >> 3) << 4) | month]).hex()


@pytest.mark.parametrize(
    ("yy", "expected"),
    [
        (99, "1999-12-31"),  # 81-99 are 1981-1999 (EN 13757-3 compatibility note; libmbus, pyMeterBus)
        (81, "1981-12-31"),
        (80, "2080-12-31"),
        (0, "2000-12-31"),
        (14, "2014-12-31"),
    ],
)
def test_two_digit_years(yy: int, expected: str) -> None:
    assert records_of("02 6C " + type_g(yy, 12, 31))["date"] == (expected, None)
    # type F: minute 5, hour 6, then the date
    assert records_of("04 6D 05 06 " + type_g(yy, 12, 31))["datetime"] == (expected + "T06:05:00", None)


def test_rate_vife_keeps_the_base_unit_and_divides_it() -> None:
    out = records_of("04 93 22 0A 00 00 00 04 93 20 0B 00 00 00 04 93 28 0C 00 00 00 04 93 24 0D 00 00 00")
    assert out["volume_per_week"] == (0.013, "m³/week")
    assert out["volume_per_hour"] == (0.01, "m³/h")
    assert out["volume_per_second"] == (0.011, "m³/s")
    assert out["volume_per_pulse_in0"] == (0.012, "m³/pulse")


def test_extension_tables() -> None:
    out = records_of(
        "04 FB 01 05 00 00 00"  # FB 01: energy 1 MWh units -> 5 MWh
        " 02 FB 1A 10 00"  # FB 1A is reserved in EN 13757-3:2013 -> error, not a guess
        " 02 FD 1C 60 09"  # baud rate 2400
        " 02 FD 25 0F 00"  # storage interval 15 minutes
        " 01 FD 71 46"  # RSSI: 2 x 70 - 130 = 10 dBm
        " 02 FD 48 E6 00"  # voltage 230 x 10^-1 V... FD 48: 10^(8-9) V
    )
    assert out["energy"] == (5000000, "Wh")
    assert out["baudrate"] == (2400, "Bd")
    assert out["storage_interval"] == (900, "s")
    assert out["rssi"] == (10, "dBm")
    assert out["voltage"] == (23.0, "V")


def test_manufacturer_vif_skipped_with_reason() -> None:
    t = codec.decode_long_frame(frame_78("04 7F 01 02 03 04 04 13 31 D4 00 00"))
    assert [r.name for r in t.records] == ["volume"]
    assert any("manufacturer-specific VIF" in s for s in t.skipped) and not t.errors


def test_decode_verb_on_type_i_prints_values_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """`fieldgate decode mbus` on a type I record printed an OverflowError traceback."""
    import argparse

    from agent.verbs import decode

    frame = frame_78("04 13 31 D4 00 00 06 6D 2D 0B 0B CD 13 00")
    args = argparse.Namespace(codec="mbus", hex=[frame.hex()], key=None, address=None, mode=None, json=True)
    assert decode.main(args) == 0
    out = capsys.readouterr().out
    assert '"datetime":"2014-03-13T11:11:45"' in out and '"volume":54.321' in out


def test_decode_verb_reports_a_codec_bug_in_words(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from agent.verbs import decode

    def broken(data: bytes, options: dict[str, str]) -> dict[str, object]:
        raise IndexError("boom")

    monkeypatch.setattr(codec, "decode_cli", broken)
    args = argparse.Namespace(codec="mbus", hex=["E5"], key=None, address=None, mode=None, json=True)
    assert decode.main(args) == 2
    assert "codec bug in mbus" in capsys.readouterr().out
