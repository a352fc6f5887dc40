"""Fuzz every codec that takes outside bytes: only the codec's own DecodeError may ever escape.

Random, truncated and bit-flipped frames of each codec (and, for checksummed formats, frames whose
checksum is recomputed after the damage, so the fuzz reaches the record decoders behind the checksum).
A fixed example budget, no example database (nothing is written to .hypothesis/). Each failure found
becomes a named regression test at the end of this file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import DecodeError
from drivers._serial.counters import ScanStats
from drivers.ble import bthome, ruuvi, xiaomi
from drivers.ble.advert import Advertisement, parse_ad_structures
from drivers.ble.config import GattFormat
from drivers.mbus import codec as mbus
from drivers.mhz19 import codec as mhz19
from drivers.pms5003 import codec as pms
from drivers.sds011 import codec as sds
from drivers.tic import codec as tic
from tests.vectors import load_vectors

# A fixed budget per test; FIELDGATE_FUZZ_EXAMPLES raises it for a longer hunt by hand (never in CI).
FUZZ = settings(
    max_examples=int(os.environ.get("FIELDGATE_FUZZ_EXAMPLES", "300")),
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BLE = load_vectors("ble_sensors.json")
MBUS = load_vectors("mbus_water_meters.json")
TIC = load_vectors("linky_tic.json")
AIR = load_vectors("air_quality_serial.json")

BTHOME_SEEDS = [bytes.fromhex(v["service_data_hex"]) for v in BLE["bthome_vectors"]]
RUUVI_SEEDS = [bytes.fromhex(v["manufacturer_data_payload_hex"]) for v in BLE["ruuvi_vectors"]]
XIAOMI_SEEDS = [bytes.fromhex(v["service_data_hex"]) for v in BLE["xiaomi_vectors"]]
MBUS_SEEDS = [bytes.fromhex(v["frame_hex"]) for v in MBUS["vectors"]]
TIC_SEEDS = [bytes.fromhex(v["frame_hex"]) for v in TIC["frame_vectors"]]
SDS_SEEDS = [bytes.fromhex(v["input_hex"]) for v in AIR["sds011_vectors"]]
PMS_SEEDS = [bytes.fromhex(v["input_hex"]) for v in AIR["pms5003_vectors"]]
MHZ_SEEDS = [bytes.fromhex(v["input_hex"]) for v in AIR["mhz19_vectors"] if "input_hex" in v]


def damaged(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, and the seeds truncated, bit-flipped, extended or with bytes overwritten."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
            if kind == "truncate":
                data = data[: draw(st.integers(0, len(data)))]
            elif kind == "insert":
                data.insert(draw(st.integers(0, len(data))), draw(st.integers(0, 255)))
            elif data and kind == "flip":
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif data and kind == "set":
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            elif data:
                del data[draw(st.integers(0, len(data) - 1))]
        return bytes(data)

    return st.one_of(st.binary(max_size=300), mutate())


def only_decode_error(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except DecodeError:
        return None


# -- BLE --------------------------------------------------------------------------------------------

KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")


@FUZZ
@given(damaged(BTHOME_SEEDS + [b"\x40" + bytes([i]) for i in range(0x00, 0x100, 7)]))
def test_fuzz_bthome(data: bytes) -> None:
    only_decode_error(lambda: bthome.parse(data))
    only_decode_error(lambda: bthome.parse(data, key=KEY, address="54:48:E6:8F:80:A5"))
    only_decode_error(lambda: bthome.decode_cli(data, {}))


@FUZZ
@given(st.binary(max_size=60))
def test_fuzz_bthome_object_sequences(objects: bytes) -> None:
    """Random object sequences behind a valid header: the object decoder itself."""
    only_decode_error(lambda: bthome.decode_object_sequence(objects))


@FUZZ
@given(damaged(RUUVI_SEEDS))
def test_fuzz_ruuvi(data: bytes) -> None:
    only_decode_error(lambda: ruuvi.decode(data))


@FUZZ
@given(damaged(XIAOMI_SEEDS))
def test_fuzz_xiaomi_atc_pvvx(data: bytes) -> None:
    only_decode_error(lambda: xiaomi.decode_atc(data))
    only_decode_error(lambda: xiaomi.decode_pvvx(data))
    only_decode_error(lambda: xiaomi.decode_cli(data, {}))


@FUZZ
@given(st.binary(max_size=62))
def test_fuzz_ad_structures_and_dispatch(data: bytes) -> None:
    """Raw AD structures never raise; what they carry goes to each decoder as the driver does."""
    pytest.importorskip("bleak")
    from drivers.ble.driver import decode_advertisement

    service, manufacturer, _name = parse_ad_structures(data)
    advert = Advertisement("54:48:E6:8F:80:A5", -70, None, service, manufacturer)
    for decoder in ("bthome", "ruuvi", "atc", "pvvx"):
        only_decode_error(lambda decoder=decoder: decode_advertisement(decoder, advert))


# -- M-Bus ------------------------------------------------------------------------------------------


def long_frame(body: bytes) -> bytes:
    body = body[:255]
    return bytes([0x68, len(body), len(body), 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])


def mbus_decode(frame: bytes) -> None:
    telegram = only_decode_error(lambda: mbus.decode_long_frame(frame))
    if telegram is not None:
        assert not getattr(telegram, "bugs", None), (
            telegram.bugs
        )  # an exception inside one record is still a bug
    only_decode_error(lambda: mbus.decode_cli(frame, {}))


@FUZZ
@given(damaged(MBUS_SEEDS))
def test_fuzz_mbus_frames(frame: bytes) -> None:
    mbus_decode(frame)


@FUZZ
@given(damaged(MBUS_SEEDS))
def test_fuzz_mbus_frames_with_valid_checksum(frame: bytes) -> None:
    """The damage is re-framed with a correct length and checksum: the record decoder sees it all."""
    mbus_decode(long_frame(bytes([0x08, 0x01]) + frame[6:-2]))


@st.composite
def mbus_records(draw: st.DrawFn) -> bytes:
    """Records built from plausible parts: any DIF/DIFE, any VIF (FB, FD, 7C...), any VIFEs, data."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        dif = draw(st.integers(0, 255))
        out.append(dif)
        if dif & 0x80:
            out.append(draw(st.integers(0, 0x7F)))
        vif = draw(st.one_of(st.integers(0, 255), st.sampled_from([0xFB, 0xFD, 0x6C, 0x6D, 0xEC, 0xED])))
        out.append(vif)
        if vif & 0x7F == 0x7C:
            out += bytes([3]) + b"ABC"
        if vif & 0x80:
            vifes = draw(st.lists(st.integers(0, 255), min_size=1, max_size=3))
            for e in vifes[:-1]:
                out.append(e | 0x80)
            out.append(vifes[-1] & 0x7F)
        out += draw(st.binary(min_size=0, max_size=8))
    return bytes(out)


@FUZZ
@given(mbus_records(), st.sampled_from([0x72, 0x78]))
def test_fuzz_mbus_records(records: bytes, ci: int) -> None:
    header = bytes.fromhex("78034911 7704 0E 16 0A 00 0000") if ci == 0x72 else b""
    mbus_decode(long_frame(bytes([0x08, 0x01, ci]) + header + records))


# -- TIC --------------------------------------------------------------------------------------------


def tic_all(frame: bytes) -> None:
    only_decode_error(lambda: tic.decode_cli(frame, {}))
    for mode in ("historic", "standard"):
        only_decode_error(lambda mode=mode: tic.decode_cli(frame, {"mode": mode}))
    body = frame[1:-1]
    for mode in ("historic", "standard"):
        result = tic.parse_frame_body(body, mode)  # never raises: bad groups are listed
        for group in result.groups:
            only_decode_error(lambda group=group, mode=mode: tic.value_of(group, mode))
    tic.detect_mode(body)
    tic.FrameAssembler().feed(frame)


@FUZZ
@given(damaged(TIC_SEEDS))
def test_fuzz_tic_frames(frame: bytes) -> None:
    tic_all(frame)


@st.composite
def tic_groups(draw: st.DrawFn) -> bytes:
    """Groups with correct checksums and random labels/data, so that value decoding is reached."""
    mode = draw(st.sampled_from(["historic", "standard"]))
    sep = b" " if mode == "historic" else b"\t"
    labels = list(tic._HISTORIC_UNITS) + list(tic._STANDARD_UNITS) + ["DATE", "ADCO", "NTARF"]
    out = bytearray(b"\x02")
    for _ in range(draw(st.integers(1, 4))):
        label = draw(st.sampled_from(labels)).encode()
        text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
        digits = st.integers(0, 10**30).map(str) | st.integers(16, 6000).map(lambda n: "7" * n)
        data = draw(st.one_of(text, digits)).encode()
        payload = label + sep
        if mode == "standard" and draw(st.booleans()):
            payload += draw(st.sampled_from([b"E", b"h", b"X"])) + str(draw(st.integers(0, 10**13))).encode()
            payload += sep
        payload += data
        covered = payload + sep if mode == "standard" else payload
        out += b"\n" + payload + sep + tic.checksum(covered).encode() + b"\r"
    out += b"\x03"
    return bytes(out)


@FUZZ
@given(tic_groups())
def test_fuzz_tic_values(frame: bytes) -> None:
    tic_all(frame)


# -- serial air-quality sensors ---------------------------------------------------------------------


def serial_all(
    data: bytes, scan: Callable[[bytearray, ScanStats], bytes | None], parse: Callable[[bytes], Any]
) -> None:
    buf = bytearray(data)
    stats = ScanStats()
    while (frame := scan(buf, stats)) is not None:  # the scanner never raises
        only_decode_error(lambda frame=frame: parse(frame))
    only_decode_error(lambda: parse(data))


@FUZZ
@given(damaged(SDS_SEEDS))
def test_fuzz_sds011(data: bytes) -> None:
    serial_all(data, sds.scan, sds.parse_data)
    only_decode_error(lambda: sds.decode_cli(data, {}))


@FUZZ
@given(damaged(PMS_SEEDS))
def test_fuzz_pms5003(data: bytes) -> None:
    serial_all(data, pms.scan, pms.decode)
    only_decode_error(lambda: pms.decode_cli(data, {}))


@FUZZ
@given(damaged(MHZ_SEEDS))
def test_fuzz_mhz19(data: bytes) -> None:
    serial_all(data, mhz19.scan, mhz19.parse_co2)
    only_decode_error(lambda: mhz19.decode_cli(data, {}))


# -- regressions found by the fuzz (each named after what it found) ----------------------------------


def test_regression_mbus_date_in_a_wider_field_overflowed() -> None:
    """Found by test_fuzz_mbus_records: VIF 6D/6C in a 48-bit field raised OverflowError (int.to_bytes)."""
    for records in ("06 6D FF FF FF FF FF 7F", "06 6C 01 02 03 04 05 06", "07 6D 00 00 00 00 00 00 00 80"):
        telegram = mbus.decode_long_frame(long_frame(bytes([0x08, 0x01, 0x78]) + bytes.fromhex(records)))
        assert not telegram.bugs and telegram.errors + telegram.skipped


def test_regression_tic_value_of_4301_digits() -> None:
    """Found by test_fuzz_tic_values: int() of more than 4300 digits raised ValueError."""
    payload = b"BASE " + b"7" * 4301
    frame = b"\x02\n" + payload + b" " + tic.checksum(payload).encode() + b"\r\x03"
    with pytest.raises(DecodeError, match="4301 digits"):
        tic.decode_cli(frame, {"mode": "historic"})


@FUZZ
@given(
    st.sampled_from(get_args(GattFormat)),  # every format the config accepts
    st.binary(max_size=8),
    st.floats(-1e300, 1e300) | st.just(1.0),
    st.floats(-1e300, 1e300) | st.just(0.0),
)
def test_fuzz_gatt_characteristic(fmt: str, data: bytes, scale: float, offset: float) -> None:
    from drivers.ble.characteristic import decode_value

    value = only_decode_error(lambda: decode_value(fmt, data, scale, offset))
    if isinstance(value, float):
        assert math.isfinite(value)  # infinities are refused, never published


def test_regression_gatt_float_scaled_past_the_float_range() -> None:
    """float32 3e38 × scale 1e300 was published as inf (found reviewing the codecs for the fuzz, which now
    also asserts finite values)."""
    from drivers.ble.characteristic import decode_value

    with pytest.raises(DecodeError, match="out of range"):
        decode_value("float32le", bytes.fromhex("FFFF7F7F"), 1e300, 0.0)
