"""fieldgate's BTHome decoder against the format author's parser, bthome-ble (test dependency only).

Both decode the same service data: the vendored vectors, one frame per object id of the table with edge
values, and multi-object frames generated from the specification (bthome.io/format). Every value must
agree; a difference is allowed only if listed in ALLOWED with the reason (the spec's word for ours).
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import pytest

pytest.importorskip("bleak")
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bthome_ble import BTHomeBluetoothDeviceData
from bthome_ble.const import MEAS_TYPES
from habluetooth import BluetoothServiceInfoBleak

from agent.errors import DecodeError
from drivers.ble import bthome
from tests.vectors import load_vectors

ADDRESS = "A4:C1:38:8D:18:B2"
UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"

# Object ids whose value the reference does not publish as an entity but keeps as device metadata
# (F0 device type, F1/F2 firmware): compared against that metadata below, not as values.
DEVICE_INFO_IDS = {0xF0, 0xF1, 0xF2}

# Object ids whose values may differ by less than the reference's rounding, with why ours is right.
ROUNDING: dict[int, tuple[float, str]] = {
    0x58: (
        0.051,
        "temperature sint8 x 0.35 °C: the reference rounds the product to one decimal (1 step = 0.3 °C); "
        "bthome.io/format gives the factor 0.35, so one step is 0.35 °C and fieldgate keeps two decimals",
    ),
}

# Differences allowed, each with why fieldgate is right (or why the difference is only representation).
ALLOWED: dict[str, str] = {
    "reference key collision": "two objects of one device class in different units (e.g. 0x48 volume mL "
    "and 0x4E volume L) get one entity key in the reference, which keeps only the last; fieldgate "
    "publishes both (volume_ml, volume). Such pairs are not combined in the generated multi-object frames",
    "empty text/raw": "a text or raw object of length 0: the reference drops it, fieldgate publishes the "
    "empty string (bthome.io/format allows length 0; an empty value is still a value)",
}


def service_info(payload: bytes) -> BluetoothServiceInfoBleak:
    return BluetoothServiceInfoBleak(
        name="Test",
        address=ADDRESS,
        device=BLEDevice(ADDRESS, None, None),
        rssi=-56,
        manufacturer_data={},
        service_data={UUID: payload},
        service_uuids=[UUID],
        source="local",
        advertisement=AdvertisementData("Test", {}, {}, [], None, -56, ()),
        time=0,
        connectable=False,
        tx_power=None,
    )


def norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, int | float):
        return round(float(value), 6)
    return str(value).upper()


def reference(payload: bytes, key: bytes | None = None) -> tuple[list[Any], dict[str, Any]]:
    """The reference's values (a sorted multiset, as fieldgate represents them) and device metadata."""
    data = BTHomeBluetoothDeviceData(bindkey=key)
    update = data.update(service_info(payload))
    values: list[Any] = []
    for k, v in update.entity_values.items():
        if k.key != "signal_strength":
            values.append(norm(v.native_value))
    values += [norm(v.native_value) for v in update.binary_entity_values.values()]
    for event in update.events.values():
        props = event.event_properties or {}
        if event.device_key.key.startswith("dimmer"):
            steps = int(props["steps"])
            values.append(norm(-steps if event.event_type == "rotate_left" else steps))
        else:
            values.append(norm(event.event_type))
            if props.get("args"):
                values.append(norm(props["args"]))
    device = update.devices.get(None)
    info = {"sw_version": device.sw_version if device else None, "type_id": data.device_type_id}
    return sorted(values, key=repr), info


def ours(payload: bytes, key: bytes | None = None) -> tuple[list[Any], dict[str, Any]]:
    try:
        packet = bthome.parse(payload, key=key, address=ADDRESS)
    except DecodeError:
        return [], {}
    values = [
        norm(m.value) for n, m in packet.values.items() if not n.startswith(("firmware", "device_type"))
    ]
    # With several firmware objects the reference keeps the last one (fieldgate publishes each).
    firmware = [m.value for n, m in packet.values.items() if n.startswith("firmware")]
    type_ids = [m.value for n, m in packet.values.items() if n.startswith("device_type")]
    info = {"sw_version": firmware[-1] if firmware else None, "type_id": type_ids[-1] if type_ids else None}
    return sorted(values, key=repr), info


def check(payload: bytes, key: bytes | None = None, allowed: str | None = None) -> None:
    ref_values, ref_info = reference(payload, key)
    our_values, our_info = ours(payload, key)
    if allowed is not None:
        assert allowed in ALLOWED
        return
    tolerance = max((ROUNDING[i][0] for i in set(payload[1:]) & set(ROUNDING)), default=0.0)
    if tolerance and len(our_values) == len(ref_values):
        for a, b in zip(our_values, ref_values, strict=True):
            assert a == b or abs(a - b) <= tolerance, payload.hex()
        return
    assert our_values == ref_values, payload.hex()
    for k, v in our_info.items():
        if v is not None:  # without a firmware object the reference says "BTHome BLE v2": not a version
            assert v == ref_info[k], payload.hex()


# -- the vendored vectors -----------------------------------------------------------------------------

V = load_vectors("ble_sensors.json")["bthome_vectors"]


@pytest.mark.parametrize("vector", V, ids=[v["id"] for v in V])
def test_vectors_agree(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(vector["bindkey_hex"]) if vector.get("bindkey_hex") else None
    check(bytes.fromhex(vector["service_data_hex"]), key)


# -- frames generated from the specification --------------------------------------------------------


def _object_bytes(object_id: int, fill: bytes) -> bytes:
    obj = bthome.OBJECTS[object_id]
    if obj.kind in ("text", "raw"):
        body = fill if obj.kind == "raw" else fill.decode("latin-1").encode("ascii", "replace")
        return bytes([object_id, len(body)]) + body
    if obj.kind == "command":
        args = fill[:3]
        return bytes([object_id, len(args), fill[0] % 5]) + args
    if obj.kind == "button":
        return bytes([object_id, random.Random(fill).choice(list(bthome.BUTTON_EVENTS))])
    if obj.kind == "dimmer":
        return bytes([object_id, 1 + fill[0] % 2, fill[-1]])
    if obj.kind == "binary":
        return bytes([object_id, fill[0] & 1])
    return bytes([object_id]) + (fill * obj.size)[: obj.size]


EDGE_FILLS = [b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\x12\x34\x56\x78", b"\xfe\xdc\xba\x98"]
IDS = sorted(MEAS_TYPES)  # every object id of the specification, as its author's parser knows it


def _reference_key(object_id: int) -> str:
    fmt = MEAS_TYPES[object_id].meas_format
    return str(getattr(fmt, "device_class", fmt))


@pytest.mark.parametrize("object_id", IDS, ids=[f"0x{i:02X}" for i in IDS])
def test_every_object_id_with_edge_values(object_id: int) -> None:
    assert object_id in bthome.OBJECTS, f"object id 0x{object_id:02X} of the specification is not decoded"
    for fill in EDGE_FILLS:
        check(b"\x40" + _object_bytes(object_id, fill))


def test_empty_text_is_published_by_fieldgate_only() -> None:
    check(b"\x40\x53\x00", allowed="empty text/raw")
    assert bthome.decode_cli(b"\x40\x53\x00", {}) == {"text": ""}


def test_multi_object_frames() -> None:
    rng = random.Random(23)
    done = 0
    while done < 300:
        ids = sorted(rng.sample(IDS, rng.randint(2, 6)))
        keys = [_reference_key(i) for i in ids]
        formats = {(_reference_key(i), str(MEAS_TYPES[i].meas_format)) for i in ids}
        if len(formats) != len({k for k, _ in formats}) or len(set(keys)) != len(keys):
            continue  # ALLOWED["reference key collision"]; repeated objects are tested below
        done += 1
        payload = b"\x40" + b"".join(_object_bytes(i, rng.randbytes(4)) for i in ids)
        check(payload)


def test_unknown_id_both_keep_what_precedes_it() -> None:
    for unknown in (0x30, 0x66, 0x7F, 0xEF):
        check(b"\x40\x02\xca\x09\x03\xbf\x13" + bytes([unknown, 1, 2, 3]))


def test_repeated_objects_of_one_kind() -> None:
    """Two temperatures, two humidities: both decoders publish every one (name, name_2 in fieldgate)."""
    check(bytes.fromhex("4002CA0902CB0903BF1303C013"))


def test_unreadable_text_is_left_out_by_both() -> None:
    check(bytes.fromhex("4002CA095302FFFE2101"))
