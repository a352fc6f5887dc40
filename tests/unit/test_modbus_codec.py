"""Modbus codec: every type and word order against the shared vectors, scale/offset, NaN, writes."""

from __future__ import annotations

import math
import struct

import pytest

from agent.errors import DecodeError, WriteRefused
from drivers.modbus import codec
from tests.vectors import load_vectors

VECTORS = load_vectors("modbus_energy_meters.json")
ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
STRUCT_TYPE = {"f": "float32", "i": "int32", "I": "uint32"}


def regs(hexes: list[str]) -> list[int]:
    return [int(h, 16) for h in hexes]


@pytest.mark.parametrize(
    "vector", VECTORS["sdm630_vectors"] + VECTORS["sdm120_vectors"], ids=lambda v: str(v["id"])
)
def test_eastron_register_dumps_decode_to_the_stated_values(vector: dict) -> None:
    value = codec.decode(regs(vector["registers_hex"]), "float32", "ABCD")
    assert value == pytest.approx(vector["expected"]["float32_ABCD"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("vector", VECTORS["word_order_vectors"], ids=lambda v: str(v["id"]))
@pytest.mark.parametrize("order", ORDERS)
def test_word_order_vectors_decode_and_encode(vector: dict, order: str) -> None:
    type_ = STRUCT_TYPE[vector["type"]]
    wire = regs(vector["encodings"][order]["registers_hex"])
    value = codec.decode(wire, type_, order)
    if type_ == "float32":
        assert value == pytest.approx(vector["value"], rel=1e-6)
    else:
        assert value == vector["value"]
    assert codec.encode(vector["value"], type_, order) == wire


def test_orders_generalise_to_64_bit() -> None:
    # 0x0102030405060708 as ABCD is the big-endian register sequence
    abcd = [0x0102, 0x0304, 0x0506, 0x0708]
    assert codec.decode(abcd, "uint64", "ABCD") == 0x0102030405060708
    assert codec.decode(list(reversed(abcd)), "uint64", "CDAB") == 0x0102030405060708
    assert codec.decode([0x0201, 0x0403, 0x0605, 0x0807], "uint64", "BADC") == 0x0102030405060708
    assert codec.decode([0x0807, 0x0605, 0x0403, 0x0201], "uint64", "DCBA") == 0x0102030405060708
    for order in ORDERS:
        wire = codec.encode(-1234567890123, "int64", order)
        assert codec.decode(wire, "int64", order) == -1234567890123
        wire = codec.encode(123.456789012345, "float64", order)
        assert codec.decode(wire, "float64", order) == 123.456789012345
    # DCBA of 4 registers is exactly the little-endian bytes on the wire
    wire = codec.encode(math.pi, "float64", "DCBA")
    assert b"".join(w.to_bytes(2, "big") for w in wire) == struct.pack("<d", math.pi)


@pytest.mark.parametrize(
    ("registers", "type_", "order", "expected"),
    [
        ([0xFFFE], "int16", "ABCD", -2),
        ([0xFFFE], "uint16", "ABCD", 65534),
        ([0x3412], "uint16", "BADC", 0x1234),
        ([0x3412], "uint16", "DCBA", 0x1234),
        ([0x1234], "uint16", "CDAB", 0x1234),
        ([0x0001], "bool", "ABCD", True),
        ([0x0000], "bool", "ABCD", False),
    ],
)
def test_16_bit_types(registers: list[int], type_: str, order: str, expected: object) -> None:
    assert codec.decode(registers, type_, order) == expected


def test_bit_of_a_register() -> None:
    assert codec.decode([0b1000], "uint16", bit=3) is True
    assert codec.decode([0b0111], "uint16", bit=3) is False
    assert codec.set_bit(0b0111, 3, True) == 0b1111
    assert codec.set_bit(0xFFFF, 15, False) == 0x7FFF


def test_string_strips_nuls_and_spaces() -> None:
    wire = [0x5344, 0x4D36, 0x3330, 0x2000, 0x0000]  # "SDM630 " + NULs
    assert codec.decode(wire, "string", length=5) == "SDM630"
    assert codec.decode([0x4453, 0x364D], "string", "BADC", length=2) == "SDM6"
    assert codec.encode("SDM6", "string", "ABCD", length=3) == [0x5344, 0x4D36, 0x0000]
    with pytest.raises(DecodeError, match="ASCII"):
        codec.decode([0x53FF], "string", length=1)


def test_scale_and_offset_keep_ints_when_identity() -> None:
    assert codec.decode([0, 1234], "uint32") == 1234
    assert isinstance(codec.decode([0, 1234], "uint32"), int)
    assert codec.decode([1234], "uint16", scale=0.1) == pytest.approx(123.4)
    assert codec.decode([1234], "int16", scale=0.1, offset=-40) == pytest.approx(83.4)


def test_nan_and_infinity_are_refused_never_returned() -> None:
    with pytest.raises(DecodeError, match="not a number"):
        codec.decode([0x7FC0, 0x0000], "float32")
    with pytest.raises(DecodeError, match="infinite"):
        codec.decode([0x7F80, 0x0000], "float32")


def test_short_input_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="needs 2 registers"):
        codec.decode([1], "float32")


def test_encode_inverts_scale_and_rounds_half_away_from_zero() -> None:
    assert codec.encode(123.45, "uint16", scale=0.1) == [1235]  # 1234.5 -> 1235
    assert codec.encode(-0.25, "int16", scale=0.1) == [0xFFFD]  # -2.5 -> -3
    assert codec.encode(25, "int16", scale=0.5, offset=-40) == [130]
    assert codec.encode("42", "uint16") == [42]
    assert codec.encode(True, "bool") == [1]


@pytest.mark.parametrize(
    ("value", "type_", "message"),
    [
        (70000, "uint16", "outside the uint16 range"),
        (-1, "uint32", "outside the uint32 range"),
        (1e39, "float32", "does not fit"),
        (True, "uint16", "boolean"),
        ("abc", "int16", "expected a number"),
        ("toolongtext", "string", "does not fit"),
        (2, "bool", "expected a boolean"),
    ],
)
def test_encode_refusals_say_why(value: object, type_: str, message: str) -> None:
    with pytest.raises(WriteRefused, match=message):
        codec.encode(value, type_, length=2)  # type: ignore[arg-type]


def test_exception_codes_in_words() -> None:
    assert codec.exception_text(2) == "exception 2: illegal data address"
    for code in (1, 2, 3, 4, 5, 6, 8, 10, 11):
        assert "unknown" not in codec.exception_text(code)
    assert "unknown" in codec.exception_text(99)


def test_rtu_frame_vectors_have_valid_crc() -> None:
    # The CRC-16/MODBUS we rely on (pymodbus' framer) agrees with every shared RTU frame.
    from pymodbus.framer.rtu import FramerRTU

    for vector in VECTORS["rtu_frame_vectors"]:
        frame = bytes.fromhex(vector["input_hex"])
        crc = int.from_bytes(frame[-2:], "big")
        assert FramerRTU.check_CRC(frame[:-2], crc) is vector["expected"]["crc_valid"]
        if "registers_hex" in vector["expected"]:
            assert codec.decode(regs(vector["expected"]["registers_hex"]), "float32") == pytest.approx(
                vector["expected"]["float32_ABCD"]
            )
