"""Linky TIC codec: groups, checksums, frames and values for historic and standard modes (pure, no I/O).

A frame is STX {LF group CR}* ETX; a group is LABEL SEP [HORODATE SEP] DATA SEP CHECKSUM.
Historic mode separates with SP, standard mode with HT. DATA may contain
spaces and the checksum character may itself be a space, so a group is
parsed from its end: last byte = checksum, the byte before = separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from agent.errors import DecodeError
from agent.reading import Value

Mode = Literal["historic", "standard"]

STX, ETX, EOT, LF, CR, SP, HT = 0x02, 0x03, 0x04, 0x0A, 0x0D, 0x20, 0x09
SEPARATOR: dict[Mode, int] = {"historic": SP, "standard": HT}
BAUDRATE: dict[Mode, int] = {"historic": 1200, "standard": 9600}

_LABEL = re.compile(r"^[A-Z0-9][A-Z0-9+\-]*$")
_HORODATE = re.compile(r"^[HhEe ]\d{12}$")
MAX_FRAME = 8192  # a standard frame is ~1 KB; past this it is noise, not a frame
MAX_DIGITS = 15  # the longest TIC number is a 9-digit index (Wh); past 15 digits it is not a reading

# Numeric labels and their units (Enedis-NOI-CPT_54E; historic labels from NOI-CPT_02E).
_HISTORIC_UNITS: dict[str, str] = {
    "ISOUSC": "A",
    "BASE": "Wh",
    "HCHC": "Wh",
    "HCHP": "Wh",
    "EJPHN": "Wh",
    "EJPHPM": "Wh",
    "BBRHCJB": "Wh",
    "BBRHPJB": "Wh",
    "BBRHCJW": "Wh",
    "BBRHPJW": "Wh",
    "BBRHCJR": "Wh",
    "BBRHPJR": "Wh",
    "PEJP": "min",
    "IINST": "A",
    "IINST1": "A",
    "IINST2": "A",
    "IINST3": "A",
    "ADPS": "A",
    "IMAX": "A",
    "IMAX1": "A",
    "IMAX2": "A",
    "IMAX3": "A",
    "PMAX": "W",
    "PAPP": "VA",
    "ADIR1": "A",
    "ADIR2": "A",
    "ADIR3": "A",
}
_STANDARD_UNITS: dict[str, str] = {
    "EAST": "Wh",
    "EAIT": "Wh",
    "ERQ1": "VArh",
    "ERQ2": "VArh",
    "ERQ3": "VArh",
    "ERQ4": "VArh",
    **{f"EASF{i:02d}": "Wh" for i in range(1, 11)},
    **{f"EASD{i:02d}": "Wh" for i in range(1, 5)},
    "IRMS1": "A",
    "IRMS2": "A",
    "IRMS3": "A",
    "URMS1": "V",
    "URMS2": "V",
    "URMS3": "V",
    "PREF": "kVA",
    "PCOUP": "kVA",
    "SINSTS": "VA",
    "SINSTS1": "VA",
    "SINSTS2": "VA",
    "SINSTS3": "VA",
    "SMAXSN": "VA",
    "SMAXSN1": "VA",
    "SMAXSN2": "VA",
    "SMAXSN3": "VA",
    "SMAXSN-1": "VA",
    "SMAXSN1-1": "VA",
    "SMAXSN2-1": "VA",
    "SMAXSN3-1": "VA",
    "SINSTI": "VA",
    "SMAXIN": "VA",
    "SMAXIN-1": "VA",
    "CCASN": "W",
    "CCASN-1": "W",
    "CCAIN": "W",
    "CCAIN-1": "W",
    "UMOY1": "V",
    "UMOY2": "V",
    "UMOY3": "V",
}
# Numeric without a unit (counters, indexes of tables).
_STANDARD_PLAIN_NUMBERS = frozenset({"NTARF", "NJOURF", "NJOURF+1", "RELAIS"})

DEFAULT_LABELS: dict[Mode, tuple[str, ...]] = {
    "historic": (
        "ADCO",
        "OPTARIF",
        "ISOUSC",
        "BASE",
        "HCHC",
        "HCHP",
        "EJPHN",
        "EJPHPM",
        "BBRHCJB",
        "BBRHPJB",
        "BBRHCJW",
        "BBRHPJW",
        "BBRHCJR",
        "BBRHPJR",
        "PTEC",
        "DEMAIN",
        "IINST",
        "IINST1",
        "IINST2",
        "IINST3",
        "ADPS",
        "PAPP",
    ),
    "standard": (
        "ADSC",
        "NGTF",
        "LTARF",
        "NTARF",
        "EAST",
        *(f"EASF{i:02d}" for i in range(1, 11)),
        *(f"EASD{i:02d}" for i in range(1, 5)),
        "EAIT",
        "IRMS1",
        "IRMS2",
        "IRMS3",
        "URMS1",
        "URMS2",
        "URMS3",
        "PREF",
        "PCOUP",
        "SINSTS",
        "SINSTS1",
        "SINSTS2",
        "SINSTS3",
        "SINSTI",
        "STGE",
    ),
}
ADDRESS_LABELS = ("ADCO", "ADSC")


@dataclass(frozen=True, slots=True)
class Horodate:
    """`S YYMMDDhhmmss`: season letter (H winter, E summer; lower-case = degraded meter clock)."""

    season: str
    text: str

    @property
    def degraded(self) -> bool:
        return self.season.islower()

    def iso_local(self) -> str:
        d = self.text[1:]
        return f"20{d[0:2]}-{d[2:4]}-{d[4:6]}T{d[6:8]}:{d[8:10]}:{d[10:12]}"


@dataclass(frozen=True, slots=True)
class TicGroup:
    label: str
    data: str
    checksum: str
    horodate: Horodate | None = None


def checksum(payload: bytes) -> str:
    """The TIC checksum character of `payload` (the bytes the mode covers)."""
    return chr((sum(payload) & 0x3F) + 0x20)


def parse_group(raw: bytes, mode: Mode) -> TicGroup:
    """One group, without its LF and CR. Raise DecodeError ("malformed ..."/"bad checksum ...")."""
    if len(raw) < 4:
        raise DecodeError(f"malformed group: too short ({len(raw)} bytes)")
    if any(b > 0x7E or (b < 0x20 and b != HT) for b in raw):
        raise DecodeError("malformed group: non-printable byte")
    sep = SEPARATOR[mode]
    ck = raw[-1]
    if raw[-2] != sep:
        raise DecodeError(f"malformed group: no {'SP' if sep == SP else 'HT'} before the checksum character")
    if ck > 0x5F:
        raise DecodeError(f"malformed group: checksum character {chr(ck)!r} out of range")
    body = raw[:-2]
    text = body.decode("ascii")
    label, found, rest = text.partition(chr(sep))
    if not found or not _LABEL.match(label):
        raise DecodeError(f"malformed group: no valid label in {text[:20]!r}")
    horodate: Horodate | None = None
    if mode == "standard":
        if "\t" in rest:
            hd, _, rest = rest.partition("\t")
            if "\t" in rest or not _HORODATE.match(hd):
                raise DecodeError(f"malformed group {label}: bad horodate {hd!r}")
            horodate = Horodate(hd[0], hd)
        covered = raw[:-1]  # standard ("mode 2"): the separator before the checksum is included
    else:
        if "\t" in text:
            raise DecodeError(f"malformed group {label}: HT in a historic group")
        covered = body
    expected = checksum(covered)
    if expected != chr(ck):
        raise DecodeError(f"bad checksum in group {label}: got {chr(ck)!r}, expected {expected!r}")
    return TicGroup(label=label, data=rest, checksum=chr(ck), horodate=horodate)


@dataclass(slots=True)
class FrameResult:
    """A frame's good groups, and why the others were dropped."""

    groups: list[TicGroup] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def bad_checksums(self) -> int:
        return sum(1 for e in self.errors if e.startswith("bad checksum"))


def parse_frame_body(body: bytes, mode: Mode) -> FrameResult:
    """Groups between STX and ETX (both excluded). Bad groups are dropped and explained, never guessed."""
    result = FrameResult()
    pos = 0
    n = len(body)
    while pos < n:
        if body[pos] != LF:
            end = body.find(LF, pos)
            end = n if end < 0 else end
            result.errors.append(f"malformed frame: {end - pos} byte(s) outside any group")
            pos = end
            continue
        cr = body.find(CR, pos + 1)
        nxt = body.find(LF, pos + 1)
        if cr < 0 or (0 <= nxt < cr):
            result.errors.append("malformed frame: group without CR")
            pos = n if nxt < 0 else nxt
            continue
        try:
            result.groups.append(parse_group(body[pos + 1 : cr], mode))
        except DecodeError as exc:
            result.errors.append(str(exc))
        pos = cr + 1
    return result


def split_frame(frame: bytes) -> bytes:
    """The body of one whole frame STX..ETX; DecodeError if it is not one."""
    if len(frame) < 2 or frame[0] != STX or frame[-1] != ETX:
        raise DecodeError("malformed frame: a TIC frame starts with STX (02) and ends with ETX (03)")
    body = frame[1:-1]
    if STX in body or ETX in body:
        raise DecodeError("malformed frame: STX or ETX inside the frame")
    if EOT in body:
        raise DecodeError("interrupted frame: EOT inside the frame")
    return body


def detect_mode(body: bytes) -> Mode | None:
    """The mode whose rules make a frame body valid (HT separators => standard), None if neither fits."""
    best: tuple[int, Mode | None] = (0, None)
    for mode in ("standard", "historic"):
        good = len(parse_frame_body(body, mode).groups)
        if good > best[0]:
            best = (good, mode)
    return best[1]


def value_of(group: TicGroup, mode: Mode) -> tuple[Value, str | None]:
    """The typed value and unit of a group: numbers for indexes/powers/currents, strings otherwise.

    DATE (standard) has no data: its value is the meter clock, ISO local time.
    """
    if group.label == "DATE" and group.horodate is not None and not group.data.strip():
        return group.horodate.iso_local(), None
    units = _HISTORIC_UNITS if mode == "historic" else _STANDARD_UNITS
    unit = units.get(group.label)
    if unit is not None or (mode == "standard" and group.label in _STANDARD_PLAIN_NUMBERS):
        digits = group.data.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise DecodeError(f"bad value in group {group.label}: {group.data[:20]!r} is not a number")
        if len(digits) > MAX_DIGITS:
            raise DecodeError(
                f"bad value in group {group.label}: {len(digits)} digits, no TIC value has more than {MAX_DIGITS}"
            )
        return int(digits), unit
    return group.data.strip(), None


def decode_cli(data: bytes, options: dict[str, str]) -> dict[str, Value]:
    """`fieldgate decode tic HEX [--mode historic|standard]`: a whole frame STX..ETX, every group checked.

    Without `mode` the mode is detected from the separators. Values are keyed by
    label; a horodate that goes with a value is given as `LABEL.horodate`.
    """
    body = split_frame(data)
    mode_opt = options.get("mode")
    mode: Mode
    if mode_opt in ("historic", "standard"):
        mode = mode_opt  # type: ignore[assignment]
    elif mode_opt in (None, "", "auto"):
        detected = detect_mode(body)
        if detected is None:
            raise DecodeError("no valid group in either mode (historic or standard)")
        mode = detected
    else:
        raise DecodeError(f"unknown TIC mode {mode_opt!r}: historic or standard")
    result = parse_frame_body(body, mode)
    if result.errors:
        raise DecodeError(f"{mode} mode: {result.errors[0]}")
    if not result.groups:
        raise DecodeError("empty frame: no group")
    out: dict[str, Value] = {}
    for g in result.groups:
        value, _unit = value_of(g, mode)
        out[g.label] = value
        if g.horodate is not None and g.data.strip():
            out[f"{g.label}.horodate"] = g.horodate.iso_local()
    return out


@dataclass(slots=True)
class FrameAssembler:
    """Cuts a byte stream into frame bodies, resynchronising on STX after partial or interrupted frames.

    Counts what it throws away: `garbage_bytes` outside frames, `partial_frames`
    (a new STX before ETX, an EOT, or an over-long frame).
    """

    garbage_bytes: int = 0
    partial_frames: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _in_frame: bool = False

    def feed(self, data: bytes) -> list[bytes]:
        bodies: list[bytes] = []
        for b in data:
            if b == STX:
                if self._in_frame:
                    self.partial_frames += 1
                self._in_frame = True
                self._buf.clear()
            elif not self._in_frame:
                self.garbage_bytes += 1
            elif b == ETX:
                bodies.append(bytes(self._buf))
                self._buf.clear()
                self._in_frame = False
            elif b == EOT:
                self.partial_frames += 1
                self._buf.clear()
                self._in_frame = False
            else:
                self._buf.append(b)
                if len(self._buf) > MAX_FRAME:
                    self.partial_frames += 1
                    self._buf.clear()
                    self._in_frame = False
        return bodies
