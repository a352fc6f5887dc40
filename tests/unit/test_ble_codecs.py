"""BLE decoders against the shared vectors (BTHome v2 incl. encrypted, Ruuvi DF5, ATC/pvvx) and bad input."""

from __future__ import annotations

from typing import Any

import pytest

from agent.errors import DecodeError
from drivers.ble import bthome, ruuvi, xiaomi
from drivers.ble.advert import Advertisement, parse_ad_structures
from drivers.ble.characteristic import decode_value
from drivers.ble.driver import decode_advertisement
from tests.vectors import load_vectors

VECTORS = load_vectors("ble_sensors.json")
BTHOME_OK = [
    v
    for v in VECTORS["bthome_vectors"]
    if "decryption_failed" not in v["expected"]
    and "supported" not in v["expected"]
    and "accepted" not in v["expected"]
]
BTHOME_BAD = [v for v in VECTORS["bthome_vectors"] if v not in BTHOME_OK]
KEY = "231d39c1d7cc1ab1aee224cd096db932"
ENCRYPTED = bytes.fromhex("41A47266C95F730011223378237214")
ENCRYPTED_MAC = "54:48:E6:8F:80:A5"

# Vector keys that are not point names: device-information flags and decryption internals.
_NOT_POINTS = {
    "device_info",
    "trigger_based_sleepy",
    "mac_in_payload",
    "decrypted_payload_hex",
    "nonce_hex",
    "encryption_counter",
}


def _expected_points(expected: dict[str, Any]) -> dict[str, Any]:
    points: dict[str, Any] = {}
    for key, value in expected.items():
        if key in _NOT_POINTS:
            continue
        name = key.split(" (")[0]  # "humidity (0x2E, uint8 %)" -> "humidity"
        if name.endswith("_1"):  # the vectors number repeats from 1; the first keeps its plain name here
            name = name[:-2]
        points[name] = value
    return points


def _options(v: dict[str, Any]) -> dict[str, str]:
    options = {}
    if v.get("bindkey_hex"):
        options["key"] = v["bindkey_hex"]
    if v.get("ble_address"):
        options["address"] = v["ble_address"]
    return options


@pytest.mark.parametrize("vector", BTHOME_OK, ids=[v["id"] for v in BTHOME_OK])
def test_bthome_vectors(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["service_data_hex"])
    out = bthome.decode_cli(data, _options(vector))
    expected = vector["expected"]
    for name, value in _expected_points(expected).items():
        assert out[name] == value, name
        assert type(out[name]) is type(value) or isinstance(value, float), name
    packet = bthome.parse(
        data,
        key=bytes.fromhex(vector["bindkey_hex"]) if vector.get("bindkey_hex") else None,
        address=vector.get("ble_address"),
    )
    if "trigger_based_sleepy" in expected:
        assert packet.trigger_based is expected["trigger_based_sleepy"]
    if "mac_in_payload" in expected:
        assert packet.mac == expected["mac_in_payload"]
    if "encryption_counter" in expected:
        assert packet.counter == expected["encryption_counter"]
    if "device_info" in expected:
        assert packet.encrypted is expected["device_info"]["encrypted"]


@pytest.mark.parametrize("vector", BTHOME_BAD, ids=[v["id"] for v in BTHOME_BAD])
def test_bthome_rejected_vectors(vector: dict[str, Any]) -> None:
    with pytest.raises(DecodeError, match=r"MIC|version|downgrade"):
        bthome.decode_cli(bytes.fromhex(vector["service_data_hex"]), _options(vector))


@pytest.mark.parametrize(
    ("hex_data", "options", "reason"),
    [
        ("", {}, "empty"),
        ("4002CA", {}, "needs 2 bytes"),
        ("2002CA0903BF13", {}, "version 1"),
        ("42B2188D", {}, "MAC"),
        ("41A47266C95F73", {"key": KEY, "address": ENCRYPTED_MAC}, "too short"),
        ("41A47266C95F730011223378237214", {}, "no bindkey"),
        ("41A47266C95F730011223378237214", {"key": KEY}, "MAC address is needed"),
        ("41A47266C95F730011223378237215", {"key": KEY, "address": ENCRYPTED_MAC}, "MIC"),
        ("41A47266C95F730011223378237214", {"key": KEY, "address": "54:48:E6:8F:80:A6"}, "MIC"),
        ("41A47266C95F730011223378237214", {"key": "00", "address": ENCRYPTED_MAC}, "16 bytes"),
        ("41A47266C95F730011223378237214", {"key": "zz" * 16, "address": ENCRYPTED_MAC}, "hexadecimal"),
        ("4053FF41", {}, "needs 255 bytes"),
    ],
)
def test_bthome_malformed(hex_data: str, options: dict[str, str], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        bthome.decode_cli(bytes.fromhex(hex_data), options)


def test_bthome_replayed_counter_refused_within_a_run() -> None:
    receiver = bthome.BTHomeReceiver(bytes.fromhex(KEY))
    assert receiver.receive(ENCRYPTED, ENCRYPTED_MAC).values["temperature"].value == 25.06
    with pytest.raises(DecodeError, match="replayed"):
        receiver.receive(ENCRYPTED, ENCRYPTED_MAC)
    # A fresh run accepts it again: nothing is persisted.
    assert bthome.BTHomeReceiver(bytes.fromhex(KEY)).receive(ENCRYPTED, ENCRYPTED_MAC).counter == 857870592


def test_bthome_plain_advert_from_keyed_device_refused() -> None:
    receiver = bthome.BTHomeReceiver(bytes.fromhex(KEY))
    with pytest.raises(DecodeError, match="downgrade"):
        receiver.receive(bytes.fromhex("4002CA0903BF13"), ENCRYPTED_MAC)


def test_bthome_other_objects() -> None:
    # button double press, dimmer 3 steps left, text, raw, firmware 4.2.1.0, device type, binary motion
    data = bytes.fromhex("403A023C010353036162635402BEEFF100010204F001002101")
    out = bthome.decode_cli(data, {})
    assert out == {
        "button": "double_press",
        "dimmer": -3,
        "text": "abc",
        "raw": "BEEF",
        "firmware_version": "4.2.1.0",
        "device_type_id": 1,
        "motion": True,
    }
    units = bthome.decode_objects(bytes.fromhex("0D0C000E0100"))
    assert units["pm25"].unit == "µg/m³" and units["pm25"].value == 12


def test_bthome_object_table_is_complete_and_consistent() -> None:
    for object_id, obj in bthome.OBJECTS.items():
        assert obj.kind in (
            "number",
            "binary",
            "button",
            "dimmer",
            "command",
            "text",
            "raw",
            "firmware",
        ), hex(object_id)
        if obj.kind == "number":
            assert 1 <= obj.size <= 4, hex(object_id)
    binary_ids = [i for i, o in bthome.OBJECTS.items() if o.kind == "binary"]
    assert binary_ids == list(range(0x0F, 0x12)) + list(range(0x15, 0x2E))
    assert all(i in bthome.OBJECTS for i in range(0x00, 0x30) if i not in (0x30,))
    assert all(i in bthome.OBJECTS for i in range(0x3A, 0x66))


RUUVI_NAMES = {
    "temperature_c": "temperature",
    "humidity_pct": "humidity",
    "pressure_pa": "pressure",
    "acceleration_x_mg": "acceleration_x",
    "acceleration_y_mg": "acceleration_y",
    "acceleration_z_mg": "acceleration_z",
    "battery_mv": "battery_voltage",
    "tx_power_dbm": "tx_power",
    "movement_counter": "movement_counter",
    "measurement_sequence": "measurement_sequence",
    "mac": "mac",
}


@pytest.mark.parametrize("vector", VECTORS["ruuvi_vectors"], ids=[v["id"] for v in VECTORS["ruuvi_vectors"]])
def test_ruuvi_vectors(vector: dict[str, Any]) -> None:
    out = ruuvi.decode_cli(bytes.fromhex(vector["manufacturer_data_payload_hex"]), {})
    for key, name in RUUVI_NAMES.items():
        expected = vector["expected"][key]
        if expected is None:
            assert name not in out, f"{name} is 'not available' and must be omitted"
        else:
            assert out[name] == pytest.approx(expected), name


@pytest.mark.parametrize(
    ("hex_data", "reason"),
    [("", "empty"), ("0312FC", "format 3"), ("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C88", "24 bytes")],
)
def test_ruuvi_malformed(hex_data: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        ruuvi.decode_cli(bytes.fromhex(hex_data), {})


XIAOMI_NAMES = {
    "temperature_c": "temperature",
    "humidity_pct": "humidity",
    "battery_pct": "battery",
    "battery_mv": "battery_voltage",
    "frame_counter": "frame_counter",
}


@pytest.mark.parametrize(
    "vector", VECTORS["xiaomi_vectors"], ids=[v["id"] for v in VECTORS["xiaomi_vectors"]]
)
def test_xiaomi_vectors(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["service_data_hex"])
    expected = vector["expected"]
    fn = xiaomi.decode_cli_atc if expected["format"] == "atc1441" else xiaomi.decode_cli_pvvx
    out = fn(data, {})
    for key, name in XIAOMI_NAMES.items():
        assert out[name] == expected[key], name
    assert str(out["mac"]).replace(":", "") == expected["mac"]
    if "flags" in expected:
        assert out["flags"] == int(expected["flags"], 16)
    assert xiaomi.decode_cli(data, {}) == out
    # The captured HCI report carries these bytes as service data 0x181A (AD type 0x16, UUID 1A 18).
    report = vector["hci_event_hex"].upper()
    at = report.index("161A18" + vector["service_data_hex"].upper())
    service, _, _ = parse_ad_structures(
        bytes.fromhex(report[at - 2 : at + 6 + len(vector["service_data_hex"])])
    )
    assert service[0x181A] == data


@pytest.mark.parametrize(
    ("fn", "hex_data"),
    [
        (xiaomi.decode_cli_atc, "A4C1380283F400A22F5F0BF8"),
        (xiaomi.decode_cli_pvvx, "F4830238C1A4A9066911B60B58F7"),
    ],
)
def test_xiaomi_wrong_length(fn: Any, hex_data: str) -> None:
    with pytest.raises(DecodeError, match="bytes, got"):
        fn(bytes.fromhex(hex_data), {})


def test_decode_advertisement_picks_the_configured_payload() -> None:
    pvvx = bytes.fromhex("F4830238C1A4A9066911B60B58F70D")
    advert = Advertisement("A4:C1:38:02:83:F4", -60, service_data={0x181A: pvvx})
    assert decode_advertisement("atc", advert) is None  # pvvx firmware frame, ATC configured: not ours
    values = decode_advertisement("pvvx", advert)
    assert values is not None and values["temperature"].value == 17.05
    assert decode_advertisement("bthome", advert) is None


def test_ad_structures_parsed_and_truncation_tolerated() -> None:
    raw = (
        bytes.fromhex("0a16d2fc4002ca0903bf130709746865726d6f1bff9904")
        + bytes.fromhex("0512FC")
        + b"\x05\xff"
    )
    service, manufacturer, name = parse_ad_structures(raw)
    assert service == {0xFCD2: bytes.fromhex("4002ca0903bf13")}
    assert name == "thermo"
    assert manufacturer == {}  # the truncated manufacturer structure is dropped, not misread


@pytest.mark.parametrize(
    ("fmt", "hex_data", "scale", "expected"),
    [
        ("int16le", "2909", 0.01, 23.45),
        ("uint16be", "0929", 1.0, 2345),
        ("float32le", "0000c03f", 1.0, 1.5),
        ("uint8", "ff", 1.0, 255),
        ("int24le", "ffffff", 1.0, -1),
        ("utf8", "66772d3100", 1.0, "fw-1"),
        ("bool", "01", 1.0, True),
    ],
)
def test_gatt_formats(fmt: str, hex_data: str, scale: float, expected: Any) -> None:
    assert decode_value(fmt, bytes.fromhex(hex_data), scale) == expected


def test_gatt_short_value_rejected() -> None:
    with pytest.raises(DecodeError, match="needs 4 bytes"):
        decode_value("uint32le", b"\x01\x02")
    with pytest.raises(DecodeError, match="finite"):
        decode_value("float32le", bytes.fromhex("0000c07f"))


# -- issue 23: the current BTHome v2 table, and an unknown id costs only what follows it ---------------


@pytest.mark.parametrize(
    ("hex_objects", "expected"),
    [
        # 0x62 speed sint32 x 0.000001 m/s, 0x63 acceleration sint32 x 0.000001 m/s² (bthome.io/format)
        ("6240420F00", {"speed": 1.0}),
        ("62C0BDF0FF", {"speed": -1.0}),
        ("6387D61200", {"acceleration": 1.234567}),
        ("6401", {"light_level": 1}),
        ("6507", {"settings_revision": 7}),
        # 0x3B command: length byte (low 5 bits = argument bytes), opcode, arguments
        ("3B0002", {"command": "toggle"}),
        ("3B0101AB", {"command": "on", "command_args": "AB"}),
        ("3A81", {"button": "hold_release"}),
        ("3A07", {"button": "event_0x07"}),  # a code the specification does not name
    ],
)
def test_bthome_newer_object_ids(hex_objects: str, expected: dict[str, Any]) -> None:
    assert bthome.decode_cli(bytes.fromhex("40" + hex_objects), {}) == expected


def test_bthome_unknown_id_keeps_what_precedes_it() -> None:
    """Ids come in ascending order: temperature and humidity decode, the unknown 0xEE ends the sequence."""
    packet = bthome.parse(bytes.fromhex("4002CA0903BF13EE0102"))
    assert {k: m.value for k, m in packet.values.items()} == {"temperature": 25.06, "humidity": 50.55}
    assert packet.unknown == bthome.UnknownObject(0xEE, 6, 3)
    assert "unknown BTHome object id 0xEE at byte 6" in str(packet.unknown)


@pytest.mark.parametrize("object_id", [0x3B, 0x62, 0x63, 0x64, 0x65])
def test_bthome_ids_of_issue_23_are_known(object_id: int) -> None:
    assert object_id in bthome.OBJECTS


def test_bthome_unreadable_text_costs_that_object_only() -> None:
    """Text that is not UTF-8 rejected the whole advertisement; now only that object is left out."""
    packet = bthome.parse(bytes.fromhex("4002CA095302FFFE2101"))
    assert {k: m.value for k, m in packet.values.items()} == {"temperature": 25.06, "motion": True}
    assert packet.skipped == ["object 0x53 at byte 3: BTHome text object is not valid UTF-8"]
    with pytest.raises(DecodeError, match="UTF-8"):
        bthome.decode_objects(bytes.fromhex("5302FFFE"))  # the plain helper still says it
