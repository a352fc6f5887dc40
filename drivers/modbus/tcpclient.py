"""Our Modbus TCP client: MBAP frames on one asyncio connection, one request at a time (ModbusBus's TCP buses).

Why not pymodbus's client (issue 24): on the reference workload its request path (framer, PDU objects, the
frame dump, `wait_for`) was ~19 % of the daemon's CPU, every request took 4 event-loop turns, and importing
it cost ~2.2 MiB. Here a request is one write, one future resolved from the protocol's `buffer_updated`, and
one timer (`loop.call_later`) on that future: no task, no `wait_for`. Serial RTU and RTU over TCP keep
pymodbus's client (drivers/modbus/bus.py imports it only for them).

The bus holds its lock around each request, so one request at a time is all this needs: the answer is matched
to it by transaction id and unit id. What can go wrong, as errors of the agent's tree (bus.py words them
with the bus and unit):

    DeviceUnreachable
      NoAnswer           nothing (or only whole frames of earlier requests) within the timeout
      ConnectionLost     the peer closed or reset the connection, before or during the request
    DeviceProtocolError
      GarbledAnswer      bytes that are no MBAP frame (protocol id not 0, a length outside 2..254), or the
                         start of a frame that never completed within the timeout
      WrongAnswer        a frame of another unit, or of a transaction never asked
      ModbusExceptionResponse   the unit answered with an exception (function | 0x80) and its code
      (plain)            an answer of another function, or whose byte count does not fit the request

An answer that comes after its request timed out (or was cancelled) is recognised by its transaction id and
dropped, so it is never taken for the answer to the next request. After garbage the buffered bytes are
dropped: the next frame is expected at the start of the next bytes the peer sends.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

from agent.errors import DeviceProtocolError, DeviceUnreachable
from drivers.modbus.codec import exception_text

# MBAP header: transaction id, protocol id (0 = Modbus), length (unit id + PDU), unit id
_HEADER = struct.Struct(">HHHB")
HEADER_SIZE = 7
MAX_LENGTH = 254  # unit id + the longest PDU (253 bytes)
# Receive buffer: holds a partial frame (< 7 + 253 bytes) and room for a read of at least as much again.
_BUFFER_SIZE = 1024
_STALE_KEPT = 16  # transaction ids of unanswered requests remembered, to drop their late answers
_REQUEST = struct.Struct(">BHH")  # function, address, count or value: every request but 16's

READ_FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class NoAnswer(DeviceUnreachable):
    """No answer to the request within its timeout."""

    def __init__(self) -> None:
        super().__init__("no answer")


class ConnectionLost(DeviceUnreachable):
    """The connection is closed; `reason` says how it ended."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connection lost ({reason})")
        self.reason = reason


class GarbledAnswer(DeviceProtocolError):
    """Bytes that are no Modbus TCP frame; `size` is how many were received."""

    def __init__(self, size: int) -> None:
        super().__init__(f"garbled answer ({size} bytes, no Modbus TCP frame)")
        self.size = size


class WrongAnswer(DeviceProtocolError):
    """A well-formed frame that does not answer the request: of another unit, or another transaction."""


class ModbusExceptionResponse(DeviceProtocolError):
    """The device answered with a Modbus exception; `code` is the exception code."""

    def __init__(self, unit_id: int, function_code: int, code: int) -> None:
        super().__init__(f"unit {unit_id}: function {function_code}: {exception_text(code)}")
        self.unit_id = unit_id
        self.function_code = function_code
        self.code = code


def next_frame(buf: bytes | bytearray, start: int, end: int) -> tuple[int, int, int] | None:
    """The MBAP frame at buf[start:end]: (transaction id, unit id, where it ends), None while incomplete.

    Its PDU is buf[start + 7 : the end]. Raises GarbledAnswer as soon as the bytes cannot start a frame
    (protocol id not 0, a length outside 2..254), without waiting for the rest of a header."""
    have = end - start
    if have < HEADER_SIZE:
        if (have >= 4 and (buf[start + 2] or buf[start + 3])) or (
            have >= 6 and not 2 <= (buf[start + 4] << 8 | buf[start + 5]) <= MAX_LENGTH
        ):
            raise GarbledAnswer(have)
        return None
    tid, protocol, length, unit = _HEADER.unpack_from(buf, start)
    if protocol or not 2 <= length <= MAX_LENGTH:
        raise GarbledAnswer(have)
    frame_end = start + 6 + length
    return None if frame_end > end else (tid, unit, frame_end)


def read_request(table: str, address: int, count: int) -> bytes:
    return _REQUEST.pack(READ_FUNCTION[table], address, count)


def write_coil_request(address: int, value: bool) -> bytes:
    return _REQUEST.pack(5, address, 0xFF00 if value else 0)


def write_register_request(address: int, value: int) -> bytes:
    return _REQUEST.pack(6, address, value)


def write_registers_request(address: int, values: Sequence[int]) -> bytes:
    n = len(values)
    return struct.pack(f">BHHB{n}H", 16, address, n, 2 * n, *values)


def _unusable(unit_id: int, why: str) -> DeviceProtocolError:
    return DeviceProtocolError(f"unit {unit_id}: unusable answer ({why})")


def check_function(unit_id: int, function: int, pdu: bytes) -> None:
    """Raise if the answer PDU is an exception (ModbusExceptionResponse) or of another function."""
    got = pdu[0] if pdu else -1
    if got == function:
        return
    if got == function | 0x80:
        if len(pdu) != 2:
            raise _unusable(unit_id, f"an exception PDU of {len(pdu)} bytes")
        raise ModbusExceptionResponse(unit_id, function, pdu[1])
    raise _unusable(unit_id, f"function {got} to a request of function {function}")


def _data(unit_id: int, function: int, pdu: bytes) -> int:
    """The byte count of a read answer, checked against the PDU's length."""
    check_function(unit_id, function, pdu)
    size = pdu[1] if len(pdu) > 1 else -1
    if size != len(pdu) - 2:
        raise _unusable(unit_id, f"byte count {size}, {max(len(pdu) - 2, 0)} data bytes")
    return size


def registers_of(unit_id: int, function: int, pdu: bytes, count: int) -> list[int]:
    """The registers of a function 3 or 4 answer; exactly `count` of them, or a DeviceProtocolError."""
    size = _data(unit_id, function, pdu)
    if size & 1:
        raise _unusable(unit_id, f"an odd byte count, {size}, for registers")
    if size != 2 * count:
        raise DeviceProtocolError(f"unit {unit_id}: answer has {size // 2} registers, {count} were asked")
    return list(struct.unpack_from(f">{count}H", pdu, 2))


def bits_of(unit_id: int, function: int, pdu: bytes, count: int) -> list[bool]:
    """The first `count` bits of a function 1 or 2 answer (least significant bit first), or an error."""
    size = _data(unit_id, function, pdu)
    if size * 8 < count:
        raise DeviceProtocolError(f"unit {unit_id}: short answer ({size * 8} of {count} bits)")
    return [bool(pdu[2 + (i >> 3)] >> (i & 7) & 1) for i in range(count)]


def check_write(unit_id: int, function: int, pdu: bytes) -> None:
    """A write (5, 6, 16) is answered by its function, address and value or count (5 bytes). The echo's
    contents are not compared (nor were they by pymodbus's client)."""
    check_function(unit_id, function, pdu)
    if len(pdu) != 5:
        raise _unusable(unit_id, f"{len(pdu)} bytes to a write of function {function}, 5 expected")


class ModbusTcpLink(asyncio.BufferedProtocol):
    """One Modbus TCP connection: `request` sends a PDU and returns the answer's PDU.

    A BufferedProtocol: the transport receives into our own small buffer instead of allocating a 256 KiB
    bytes object per read, and frames are parsed in place."""

    def __init__(self) -> None:
        self._buf = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._len = 0  # bytes in _buf not yet taken as frames
        self._transport: asyncio.Transport | None = None
        self._lost: str | None = None
        self._next_tid = 0
        self._tid = -1  # the pending request's transaction id
        self._unit = -1
        self._waiter: asyncio.Future[bytes] | None = None
        self._stale: list[int] = []  # transaction ids whose late answers are dropped

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> ModbusTcpLink:  # noqa: ASYNC109 - connect
        """Connect; OSError or TimeoutError if the peer cannot be reached within `timeout`."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, link = await loop.create_connection(cls, host, port)
        return link

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._lost = "closed by us"
            self._transport.close()

    async def request(self, unit_id: int, pdu: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        """Send one request; its answer's PDU (function code first), or NoAnswer, ConnectionLost, GarbledAnswer,
        WrongAnswer. The function code and contents are the caller's to check (check_function and the rest)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionLost(self._lost or "closed")
        loop = asyncio.get_running_loop()
        self._tid = tid = self._next_tid
        self._next_tid = (tid + 1) & 0xFFFF
        self._unit = unit_id
        waiter: asyncio.Future[bytes] = loop.create_future()
        self._waiter = waiter
        transport.write(_HEADER.pack(tid, 0, len(pdu) + 1, unit_id) + pdu)
        timer = loop.call_later(timeout, self._expire, waiter)
        answered = False
        try:
            answer = await waiter
            answered = True
            return answer
        finally:
            timer.cancel()
            self._waiter = None
            # Timed out, cancelled or refused: its answer may still come, and is dropped then.
            if not answered:
                self._stale.append(tid)
                del self._stale[:-_STALE_KEPT]

    def _expire(self, waiter: asyncio.Future[bytes]) -> None:
        if waiter.done():
            return
        if self._len:  # the start of a frame that never completed
            size, self._len = self._len, 0
            waiter.set_exception(GarbledAnswer(size))
        else:
            waiter.set_exception(NoAnswer())

    def _fail(self, error: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if exc is not None:
            self._lost = str(exc) or type(exc).__name__
        elif self._lost is None:
            self._lost = "closed by the peer"
        self._fail(ConnectionLost(self._lost))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._len :]

    def buffer_updated(self, nbytes: int) -> None:
        end = self._len + nbytes
        buf = self._buf
        start = 0
        try:
            while (frame := next_frame(buf, start, end)) is not None:
                tid, unit, frame_end = frame
                self._take(tid, unit, start, frame_end)
                start = frame_end
        except GarbledAnswer as exc:
            self._len = 0  # no way to find the next frame in garbage: wait for the peer's next bytes
            self._fail(exc)
            return
        rest = end - start
        if start and rest:
            buf[:rest] = buf[start:end]  # same length: allowed while the view is exported
        self._len = rest

    def _take(self, tid: int, unit: int, start: int, end: int) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing asked (a late answer, or a frame after the answer): dropped
        if tid == self._tid:
            if unit == self._unit:
                waiter.set_result(bytes(self._view[start + HEADER_SIZE : end]))
            else:
                waiter.set_exception(WrongAnswer(f"unit {unit} answered, unit {self._unit} was asked"))
        elif tid in self._stale:
            self._stale.remove(tid)  # the late answer to a request that timed out
        else:
            waiter.set_exception(WrongAnswer(f"transaction {tid} answered, {self._tid} was asked"))
