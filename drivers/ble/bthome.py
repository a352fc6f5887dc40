"""BTHome v2 advertisements (service data 0xFCD2): object table, AES-CCM decryption, replay protection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from agent.errors import DecodeError
from agent.reading import Value
from drivers.ble.advert import Measurement, Measurements, mac_from_bytes, scaled


class _Object(NamedTuple):
    """How one BTHome object id is laid out: little-endian integer of `size` bytes, × factor."""

    name: str
    size: int
    signed: bool = False
    factor: float = 1.0
    decimals: int = 0
    unit: str | None = None
    kind: str = "number"  # number | binary | button | dimmer | command | text | raw | firmware


def _n(
    name: str,
    size: int,
    factor: float = 1.0,
    decimals: int = 0,
    unit: str | None = None,
    signed: bool = False,
) -> _Object:
    return _Object(name, size, signed, factor, decimals, unit)


def _b(name: str) -> _Object:
    return _Object(name, 1, kind="binary")


# Every object id of the BTHome v2 format (bthome.io/format, checked against the format author's parser
# bthome-ble 3.25 by tests/differential/test_bthome_reference.py). The names are point names.
OBJECTS: dict[int, _Object] = {
    0x00: _n("packet_id", 1),
    0x01: _n("battery", 1, unit="%"),
    0x02: _n("temperature", 2, 0.01, 2, "°C", signed=True),
    0x03: _n("humidity", 2, 0.01, 2, "%"),
    0x04: _n("pressure", 3, 0.01, 2, "hPa"),
    0x05: _n("illuminance", 3, 0.01, 2, "lx"),
    0x06: _n("mass", 2, 0.01, 2, "kg"),
    0x07: _n("mass_lb", 2, 0.01, 2, "lb"),
    0x08: _n("dewpoint", 2, 0.01, 2, "°C", signed=True),
    0x09: _n("count", 1),
    0x0A: _n("energy", 3, 0.001, 3, "kWh"),
    0x0B: _n("power", 3, 0.01, 2, "W"),
    0x0C: _n("voltage", 2, 0.001, 3, "V"),
    0x0D: _n("pm25", 2, unit="µg/m³"),
    0x0E: _n("pm10", 2, unit="µg/m³"),
    0x0F: _b("generic_boolean"),
    0x10: _b("power_on"),
    0x11: _b("opening"),
    0x12: _n("co2", 2, unit="ppm"),
    0x13: _n("voc", 2, unit="µg/m³"),
    0x14: _n("moisture", 2, 0.01, 2, "%"),
    0x15: _b("battery_low"),
    0x16: _b("battery_charging"),
    0x17: _b("carbon_monoxide"),
    0x18: _b("cold"),
    0x19: _b("connectivity"),
    0x1A: _b("door"),
    0x1B: _b("garage_door"),
    0x1C: _b("gas_detected"),
    0x1D: _b("heat"),
    0x1E: _b("light"),
    0x1F: _b("lock"),
    0x20: _b("moisture_detected"),
    0x21: _b("motion"),
    0x22: _b("moving"),
    0x23: _b("occupancy"),
    0x24: _b("plug"),
    0x25: _b("presence"),
    0x26: _b("problem"),
    0x27: _b("running"),
    0x28: _b("safety"),
    0x29: _b("smoke"),
    0x2A: _b("sound"),
    0x2B: _b("tamper"),
    0x2C: _b("vibration"),
    0x2D: _b("window"),
    0x2E: _n("humidity", 1, unit="%"),
    0x2F: _n("moisture", 1, unit="%"),
    0x3A: _Object("button", 1, kind="button"),
    0x3B: _Object("command", 0, kind="command"),  # length byte (low 5 bits: argument bytes), opcode, args
    0x3C: _Object("dimmer", 2, kind="dimmer"),
    0x3D: _n("count", 2),
    0x3E: _n("count", 4),
    0x3F: _n("rotation", 2, 0.1, 1, "°", signed=True),
    0x40: _n("distance", 2, unit="mm"),
    0x41: _n("distance_m", 2, 0.1, 1, "m"),
    0x42: _n("duration", 3, 0.001, 3, "s"),
    0x43: _n("current", 2, 0.001, 3, "A"),
    0x44: _n("speed", 2, 0.01, 2, "m/s"),
    0x45: _n("temperature", 2, 0.1, 1, "°C", signed=True),
    0x46: _n("uv_index", 1, 0.1, 1),
    0x47: _n("volume", 2, 0.1, 1, "L"),
    0x48: _n("volume_ml", 2, unit="mL"),
    0x49: _n("volume_flow_rate", 2, 0.001, 3, "m³/h"),
    0x4A: _n("voltage", 2, 0.1, 1, "V"),
    0x4B: _n("gas", 3, 0.001, 3, "m³"),
    0x4C: _n("gas", 4, 0.001, 3, "m³"),
    0x4D: _n("energy", 4, 0.001, 3, "kWh"),
    0x4E: _n("volume", 4, 0.001, 3, "L"),
    0x4F: _n("water", 4, 0.001, 3, "L"),
    0x50: _n("timestamp", 4, unit="s"),
    0x51: _n("acceleration", 2, 0.001, 3, "m/s²"),
    0x52: _n("gyroscope", 2, 0.001, 3, "°/s"),
    0x53: _Object("text", 0, kind="text"),
    0x54: _Object("raw", 0, kind="raw"),
    0x55: _n("volume_storage", 4, 0.001, 3, "L"),
    0x56: _n("conductivity", 2, unit="µS/cm"),
    0x57: _n("temperature", 1, unit="°C", signed=True),
    0x58: _n("temperature", 1, 0.35, 2, "°C", signed=True),
    0x59: _n("count", 1, signed=True),
    0x5A: _n("count", 2, signed=True),
    0x5B: _n("count", 4, signed=True),
    0x5C: _n("power", 4, 0.01, 2, "W", signed=True),
    0x5D: _n("current", 2, 0.001, 3, "A", signed=True),
    0x5E: _n("direction", 2, 0.01, 2, "°"),
    0x5F: _n("precipitation", 2, 0.1, 1, "mm"),
    0x60: _n("channel", 1),
    0x61: _n("rotational_speed", 2, unit="rpm"),
    0x62: _n("speed", 4, 0.000001, 6, "m/s", signed=True),
    0x63: _n("acceleration", 4, 0.000001, 6, "m/s²", signed=True),
    0x64: _n("light_level", 1),
    0x65: _n("settings_revision", 1),
    0xF0: _n("device_type_id", 2),
    0xF1: _Object("firmware_version", 4, kind="firmware"),
    0xF2: _Object("firmware_version", 3, kind="firmware"),
}

BUTTON_EVENTS = {
    0x01: "press",
    0x02: "double_press",
    0x03: "triple_press",
    0x04: "long_press",
    0x05: "long_double_press",
    0x06: "long_triple_press",
    0x80: "hold_press",
    0x81: "hold_release",
}
DIMMER_EVENTS = {0x01: "rotate_left", 0x02: "rotate_right"}
COMMAND_EVENTS = {0x00: "off", 0x01: "on", 0x02: "toggle", 0x03: "step_up", 0x04: "step_down"}

_SERVICE_UUID_LE = b"\xd2\xfc"
_MIC_LEN = 4
_COUNTER_LEN = 4


@dataclass(slots=True)
class Packet:
    """One decoded BTHome advertisement."""

    info: int
    values: Measurements = field(default_factory=dict)
    mac: str | None = None  # the MAC carried in the payload (bit 1), as printed
    counter: int | None = None  # encryption counter (encrypted packets only)
    unknown: UnknownObject | None = None  # an object id this decoder does not know, and what it cost
    skipped: list[str] = field(default_factory=list)  # objects located but unreadable, with why

    @property
    def encrypted(self) -> bool:
        return bool(self.info & 0x01)

    @property
    def trigger_based(self) -> bool:
        return bool(self.info & 0x04)


def parse_key(text: str) -> bytes:
    """A 128-bit bindkey from its 32 hex digits (spaces and a trailing newline tolerated)."""
    cleaned = "".join(text.split())
    try:
        key = bytes.fromhex(cleaned)
    except ValueError:
        raise DecodeError("the BTHome bindkey is not hexadecimal") from None
    if len(key) != 16:
        raise DecodeError(f"the BTHome bindkey must be 16 bytes (32 hex digits), got {len(key)} bytes")
    return key


def _mac_bytes(address: str) -> bytes:
    try:
        raw = bytes.fromhex(address.replace(":", "").replace("-", ""))
    except ValueError:
        raise DecodeError(f"'{address}' is not a MAC address") from None
    if len(raw) != 6:
        raise DecodeError(f"'{address}' is not a MAC address")
    return raw


class UnknownObject(NamedTuple):
    """An object id not in the table: its size is unknown, so the objects after it cannot be located."""

    object_id: int
    offset: int  # where it starts in the (decrypted) object sequence
    bytes_lost: int  # from the unknown id to the end of the sequence, not decoded

    def __str__(self) -> str:
        return (
            f"unknown BTHome object id 0x{self.object_id:02X} at byte {self.offset}: "
            f"{self.bytes_lost} byte(s) from there on not decoded"
        )


def decode_objects(payload: bytes) -> Measurements:
    """The measurements of a (decrypted) object sequence; repeated names become name, name_2, name_3...

    An unknown object id ends the sequence (see `decode_object_sequence`), keeping what came before it.
    """
    return decode_object_sequence(payload)[0]


def decode_object_sequence(
    payload: bytes, skipped: list[str] | None = None
) -> tuple[Measurements, UnknownObject | None]:
    """The measurements, and the unknown object id that ended decoding early (None if all were known).

    An object that is located but cannot be read (text that is not UTF-8) is left out and described
    in `skipped`; the objects around it are kept.

    Object ids come in ascending order, so everything before an id this table lacks (one added
    to the format later) was decoded correctly; sizes are only known per id, so past it nothing
    can be located safely. A truncated or malformed object raises DecodeError (the advertisement
    is damaged, not merely newer than this decoder).
    """
    values: Measurements = {}
    seen: dict[str, int] = {}
    i = 0
    while i < len(payload):
        start, object_id = i, payload[i]
        obj = OBJECTS.get(object_id)
        if obj is None:
            return values, UnknownObject(object_id, i, len(payload) - i)
        i += 1
        size = obj.size
        if obj.kind in ("text", "raw", "command"):
            if i >= len(payload):
                raise DecodeError(f"BTHome object 0x{object_id:02X} has no length byte")
            # command: the low 5 bits count the arguments that follow the opcode byte
            size = payload[i] if obj.kind != "command" else 1 + (payload[i] & 0x1F)
            i += 1
        if i + size > len(payload):
            raise DecodeError(
                f"BTHome object 0x{object_id:02X} needs {size} bytes, only {len(payload) - i} left"
            )
        chunk = payload[i : i + size]
        i += size
        try:
            decoded = _values_of(obj, chunk)
        except DecodeError as exc:
            if skipped is None:
                raise
            skipped.append(f"object 0x{object_id:02X} at byte {start}: {exc}")
            continue
        for name, measurement in decoded:
            count = seen.get(name, 0) + 1
            seen[name] = count
            values[name if count == 1 else f"{name}_{count}"] = measurement
    return values, None


def _values_of(obj: _Object, chunk: bytes) -> list[tuple[str, Measurement]]:
    if obj.kind == "command":
        opcode, args = chunk[0], chunk[1:]
        out = [(obj.name, Measurement(COMMAND_EVENTS.get(opcode, f"command_0x{opcode:02X}")))]
        if args:
            out.append((f"{obj.name}_args", Measurement(args.hex().upper())))
        return out
    measurement = _value_of(obj, chunk)
    return [] if measurement is None else [(obj.name, measurement)]


def _value_of(obj: _Object, chunk: bytes) -> Measurement | None:
    value: Value
    if obj.kind == "binary":
        value = chunk[0] != 0
    elif obj.kind == "button":
        if chunk[0] == 0:
            return None  # "no event": nothing happened
        value = BUTTON_EVENTS.get(chunk[0], f"event_0x{chunk[0]:02X}")
    elif obj.kind == "dimmer":
        if chunk[0] == 0:
            return None
        steps = chunk[1]
        value = -steps if chunk[0] == 0x01 else steps
        return Measurement(value, "steps")
    elif obj.kind == "text":
        try:
            value = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("BTHome text object is not valid UTF-8") from None
    elif obj.kind == "raw":
        value = chunk.hex().upper()
    elif obj.kind == "firmware":
        value = ".".join(str(b) for b in reversed(chunk))
    else:
        raw = int.from_bytes(chunk, "little", signed=obj.signed)
        value = raw if obj.factor == 1.0 else scaled(raw, obj.factor, obj.decimals)
    return Measurement(value, obj.unit)


def _decrypt(info: int, mac: bytes, body: bytes, key: bytes) -> tuple[bytes, int]:
    # Imported here so that plain BTHome decoding works without the `ble` extra.
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    if len(body) < _COUNTER_LEN + _MIC_LEN + 1:
        raise DecodeError(f"encrypted BTHome payload too short ({len(body)} bytes after the header)")
    ciphertext = body[: -(_COUNTER_LEN + _MIC_LEN)]
    counter_bytes = body[-(_COUNTER_LEN + _MIC_LEN) : -_MIC_LEN]
    mic = body[-_MIC_LEN:]
    nonce = mac + _SERVICE_UUID_LE + bytes([info]) + counter_bytes
    try:
        plain = AESCCM(key, tag_length=_MIC_LEN).decrypt(nonce, ciphertext + mic, None)
    except InvalidTag:
        raise DecodeError(
            "BTHome MIC check failed: wrong bindkey, wrong address or corrupted payload"
        ) from None
    return plain, int.from_bytes(counter_bytes, "little")


def parse(data: bytes, *, key: bytes | None = None, address: str | None = None) -> Packet:
    """Decode service data from its device-information byte. Stateless: see `BTHomeReceiver` for replay."""
    if len(data) < 1:
        raise DecodeError("empty BTHome service data")
    info = data[0]
    version = info >> 5
    if version != 2:
        raise DecodeError(
            f"BTHome version {version} in device information byte 0x{info:02X}; only 2 is supported"
        )
    body = data[1:]
    mac: str | None = None
    if info & 0x02:
        if len(body) < 6:
            raise DecodeError("BTHome payload announces a MAC but is shorter than 6 bytes")
        mac = mac_from_bytes(body[:6], reversed_order=True)
        body = body[6:]
    packet = Packet(info=info, mac=mac)
    if info & 0x01:
        if key is None:
            raise DecodeError("encrypted BTHome advertisement and no bindkey configured")
        sender = mac or address
        if sender is None:
            raise DecodeError("encrypted BTHome advertisement: the device's MAC address is needed to decrypt")
        body, packet.counter = _decrypt(info, _mac_bytes(sender), body, key)
    elif key is not None:
        raise DecodeError("unencrypted BTHome advertisement refused: this device has a bindkey (downgrade)")
    packet.values, packet.unknown = decode_object_sequence(body, packet.skipped)
    return packet


class BTHomeReceiver:
    """Per-device state: the bindkey and the last accepted encryption counter (kept in memory only)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.last_counter: int | None = None

    def receive(self, data: bytes, address: str) -> Packet:
        packet = parse(data, key=self.key, address=address)
        if packet.counter is not None:
            if self.last_counter is not None and packet.counter <= self.last_counter:
                raise DecodeError(
                    f"BTHome counter {packet.counter} is not above the last accepted "
                    f"{self.last_counter}: replayed advertisement"
                )
            self.last_counter = packet.counter
        return packet


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode bthome HEX [--key KEY --address MAC]`."""
    key = parse_key(options["key"]) if options.get("key") else None
    packet = parse(data, key=key, address=options.get("address"))
    out: dict[str, Value] = {name: m.value for name, m in packet.values.items()}
    if packet.mac is not None:
        out["mac"] = packet.mac
    if packet.counter is not None:
        out["encryption_counter"] = packet.counter
    if packet.unknown is not None:
        out["unknown_object"] = str(packet.unknown)
    if packet.skipped:
        out["skipped_objects"] = "; ".join(packet.skipped)
    return out
