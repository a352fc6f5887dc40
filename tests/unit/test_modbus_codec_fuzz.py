"""Fuzz the Modbus register decoder: whatever a device answers, only DecodeError escapes.

A fixed example budget, no example database. Registers as a device can answer them (16-bit words),
and as a buggy transport could hand them over (out of range); every type, order, bit, scale and length
the configuration allows.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DecodeError
from drivers.modbus import codec

FUZZ = settings(
    max_examples=int(os.environ.get("FIELDGATE_FUZZ_EXAMPLES", "300")), database=None, deadline=None
)
TYPES = ["bool", "string", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]


@FUZZ
@given(
    registers=st.lists(st.integers(0, 0xFFFF) | st.integers(-(2**20), 2**20), max_size=8),
    type_=st.sampled_from(TYPES),
    order=st.sampled_from(ORDERS),
    scale=st.floats(allow_nan=False) | st.just(1.0),
    offset=st.floats(allow_nan=False) | st.just(0.0),
    bit=st.none() | st.integers(0, 15),
    length=st.none() | st.integers(1, 8),
)
def test_fuzz_modbus_decode(
    registers: list[int],
    type_: str,
    order: str,
    scale: float,
    offset: float,
    bit: int | None,
    length: int | None,
) -> None:
    try:
        value = codec.decode(
            registers,
            type_,
            order,
            scale=scale,
            offset=offset,
            bit=bit,
            length=length if type_ == "string" else None,
        )
    except DecodeError:
        return
    if isinstance(value, float):
        assert math.isfinite(value)  # NaN and infinities are refused, never published


@FUZZ
@given(data=st.binary(max_size=16).filter(lambda b: len(b) % 2 == 0), order=st.sampled_from(ORDERS))
def test_fuzz_register_bytes_round_trip(data: bytes, order: str) -> None:
    assert codec.registers_to_bytes(codec.bytes_to_registers(data, order), order) == data


def test_regression_modbus_int16_scaled_past_the_float_range() -> None:
    with pytest.raises(DecodeError, match="out of range"):
        codec.decode([18028], "int16", scale=9.971672591869958e303)
