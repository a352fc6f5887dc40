"""Fuzz our Modbus TCP client's parsers (drivers/modbus/tcpclient.py): whatever bytes a peer sends, only our
DeviceErrors escape, and well-formed frames come out whole however the bytes were cut.

A fixed example budget, no example database (as tests/unit/test_modbus_codec_fuzz.py).
"""

from __future__ import annotations

import asyncio
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DeviceProtocolError
from drivers.modbus import tcpclient
from drivers.modbus.tcpclient import (
    GarbledAnswer,
    ModbusExceptionResponse,
    ModbusTcpLink,
    NoAnswer,
    next_frame,
)

FUZZ = settings(
    max_examples=int(os.environ.get("FIELDGATE_FUZZ_EXAMPLES", "300")), database=None, deadline=None
)

frames_st = st.lists(
    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(min_size=1, max_size=253)),
    min_size=1,
    max_size=5,
)


def frame(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def parse_all(data: bytes) -> tuple[list[tuple[int, int, bytes]], int]:
    """What the link does with a buffer: the whole frames in it, and how many bytes they took."""
    out: list[tuple[int, int, bytes]] = []
    start = 0
    while (found := next_frame(data, start, len(data))) is not None:
        tid, unit, end = found
        assert start + tcpclient.HEADER_SIZE < end <= len(data)  # a frame is consumed, never nothing
        out.append((tid, unit, data[start + tcpclient.HEADER_SIZE : end]))
        start = end
    return out, start


@FUZZ
@given(data=st.binary(max_size=600), prefix=st.binary(max_size=12))
def test_any_bytes_are_frames_incomplete_or_garbled(data: bytes, prefix: bytes) -> None:
    for buf in (data, prefix + data):
        try:
            _, consumed = parse_all(buf)
        except GarbledAnswer as exc:
            assert 0 < exc.size <= len(buf)
            continue
        assert 0 <= consumed <= len(buf)
        # what is left is the start of one frame, never a whole one
        assert len(buf) - consumed < tcpclient.HEADER_SIZE + tcpclient.MAX_LENGTH


@FUZZ
@given(frames=frames_st, cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_frames_come_out_whole_however_the_bytes_are_cut(
    frames: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    """As buffer_updated sees them: bytes arriving in pieces, several frames in one piece."""
    wire = b"".join(frame(*f) for f in frames)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {len(wire)})
    got: list[tuple[int, int, bytes]] = []
    pending = b""
    last = 0
    for point in points:
        pending += wire[last:point]
        last = point
        found, consumed = parse_all(pending)
        got.extend(found)
        pending = pending[consumed:]
    assert got == frames and pending == b""


def test_garbage_is_recognised_before_a_whole_header() -> None:
    assert next_frame(b"\x00\x01\x00", 0, 3) is None  # could still be a frame
    for garbage in (
        b"\x00\x01\x00\x05",  # protocol id 5
        b"\x00\x01\x00\x00\x00\x01",  # length 1: no room for a function code
        b"\x00\x01\x00\x00\x01\x00",  # length 256: longer than any PDU
        struct.pack(">HHHB", 1, 1, 3, 1) + b"\x03\x00",  # a whole frame, but protocol id 1
    ):
        try:
            next_frame(garbage, 0, len(garbage))
        except GarbledAnswer:
            continue
        raise AssertionError(f"{garbage.hex()} taken for the start of a frame")


@FUZZ
@given(
    pdu=st.binary(max_size=260),
    function=st.sampled_from([1, 2, 3, 4]),
    count=st.integers(1, 2000),
)
def test_any_read_answer_is_values_or_a_device_error(pdu: bytes, function: int, count: int) -> None:
    try:
        if function <= 2:
            values: list[int] | list[bool] = tcpclient.bits_of(7, function, pdu, count)
            assert all(isinstance(v, bool) for v in values)
        else:
            values = tcpclient.registers_of(7, function, pdu, count)
            assert all(0 <= v <= 0xFFFF for v in values)
    except ModbusExceptionResponse as exc:
        assert pdu[0] == function | 0x80 and exc.code == pdu[1] and exc.function_code == function
        return
    except DeviceProtocolError as exc:
        assert str(exc).startswith("unit 7: ")
        return
    assert len(values) == count and pdu[0] == function


@FUZZ
@given(pdu=st.binary(max_size=12), function=st.sampled_from([5, 6, 16]))
def test_any_write_answer_is_accepted_or_a_device_error(pdu: bytes, function: int) -> None:
    try:
        tcpclient.check_write(3, function, pdu)
    except DeviceProtocolError as exc:
        assert str(exc).startswith("unit 3: ")
        return
    assert pdu[0] == function and len(pdu) == 5


@FUZZ
@given(registers=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125))
def test_registers_round_trip(registers: list[int]) -> None:
    n = len(registers)
    pdu = struct.pack(f">BB{n}H", 3, 2 * n, *registers)
    assert tcpclient.registers_of(1, 3, pdu, n) == registers


@FUZZ
@given(bits=st.lists(st.booleans(), min_size=1, max_size=2000))
def test_bits_round_trip(bits: list[bool]) -> None:
    packed = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        packed[i // 8] |= bit << (i % 8)
    pdu = bytes([1, len(packed)]) + packed
    assert tcpclient.bits_of(1, 1, pdu, len(bits)) == bits


class Wire(asyncio.Transport):
    """The seam of asyncio's own transport contract: what the link writes, kept; nothing is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def feed(link: ModbusTcpLink, data: bytes) -> None:
    """What asyncio's transport does with received bytes: into the link's buffer, as much as it offers."""
    while data:
        buf = link.get_buffer(-1)
        n = min(len(buf), len(data))
        assert n > 0  # the link always has room
        buf[:n] = data[:n]
        link.buffer_updated(n)
        data = data[n:]


@FUZZ
@given(
    late=st.binary(min_size=1, max_size=253),
    answer=st.binary(min_size=1, max_size=253),
    after=frames_st,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
)
def test_the_link_takes_its_answer_however_it_arrives(
    late: bytes, answer: bytes, after: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    """A late answer to a timed-out request, the answer, then other frames: cut anywhere, in one buffer."""

    async def exchange() -> bytes:
        wire = Wire()
        link = ModbusTcpLink()
        link.connection_made(wire)
        try:
            await link.request(5, b"\x03\x00\x00\x00\x01", 0.0)
        except NoAnswer:
            pass
        else:
            raise AssertionError("answered without bytes")
        pending = asyncio.ensure_future(link.request(5, b"\x03\x00\x00\x00\x01", 60.0))
        await asyncio.sleep(0)
        first, second = (struct.unpack_from(">H", sent)[0] for sent in wire.sent)
        stream = frame(first, 5, late) + frame(second, 5, answer) + b"".join(frame(*f) for f in after)
        last = 0
        for point in sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)}):
            feed(link, stream[last:point])
            last = point
        return await pending

    assert asyncio.run(exchange()) == answer
