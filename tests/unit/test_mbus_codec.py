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
    body = bytes([0x08, 0x01, 0x78, 0x04, 0x13, 0x31, 0xD4])
    frame = bytes([0x68, len(body), len(body), 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])
    with pytest.raises(DecodeError, match="truncated record"):
        codec.decode_cli(frame, {})
