"""Our Modbus TCP client (drivers/modbus/tcpclient.py) through ModbusBus, against two peers on 127.0.0.1:
a raw asyncio server that answers as each test scripts it (split frames, two frames in one write, another
transaction or unit, garbage, exceptions, late answers, silence, a closed connection), and pymodbus's server
(the values read and written are the values it holds)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.errors import DeviceProtocolError, DeviceUnreachable
from drivers.modbus.bus import _TCP_SILENT_LIMIT, ModbusBus, ModbusExceptionResponse
from drivers.modbus.config import ModbusTcpBusConfig
from tests.broker import free_port
from tests.modbus_sim import ModbusSim, SimUnit

REPO = Path(__file__).resolve().parents[2]

Request = tuple[int, int, bytes]  # transaction id, unit id, PDU


def frame(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def answer_pdu(pdu: bytes, base: int = 0) -> bytes:
    """A correct answer: register n holds base + n, bit n is set when n % 3 == 0; writes are echoed."""
    function, address, count = struct.unpack_from(">BHH", pdu)
    if function in (3, 4):
        return struct.pack(
            f">BB{count}H", function, 2 * count, *((base + address + i) & 0xFFFF for i in range(count))
        )
    if function in (1, 2):
        packed = bytearray((count + 7) // 8)
        for i in range(count):
            packed[i // 8] |= ((address + i) % 3 == 0) << (i % 8)
        return bytes([function, len(packed)]) + packed
    return pdu[:5]


Script = Callable[["RawPeer", Request, asyncio.StreamWriter], Awaitable[None]]


async def answer(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
    tid, unit, pdu = request
    writer.write(frame(tid, unit, answer_pdu(pdu)))


class RawPeer:
    """A Modbus TCP server in plain asyncio: reads MBAP requests, lets `script` answer each (or not)."""

    def __init__(self) -> None:
        self.script: Script = answer
        self.requests: list[Request] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def later(self, delay: float, writer: asyncio.StreamWriter, data: bytes) -> None:
        async def send() -> None:
            await asyncio.sleep(delay)
            writer.write(data)

        task = asyncio.create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                tid, protocol, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                assert protocol == 0
                request = (tid, unit, await reader.readexactly(length - 1))
                self.requests.append(request)
                await self.script(self, request, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def peer() -> AsyncIterator[RawPeer]:
    p = RawPeer()
    await p.start()
    yield p
    await p.aclose()


@pytest.fixture
async def bus(peer: RawPeer) -> AsyncIterator[ModbusBus]:
    config = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=peer.port, timeout="200ms")
    b = ModbusBus("raw", config)
    yield b
    await b.aclose()


async def test_a_frame_split_into_single_bytes(peer: RawPeer) -> None:
    async def byte_by_byte(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        for b in frame(tid, unit, answer_pdu(pdu)):
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.002)

    peer.script = byte_by_byte
    # a timeout far above the 20 pauses of the answer, even on a loaded machine
    bus = ModbusBus(
        "raw", ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=peer.port, timeout="5s")
    )
    try:
        assert await bus.read(1, "holding", 10, 5) == [10, 11, 12, 13, 14]
        assert await bus.read(1, "coil", 0, 10) == [i % 3 == 0 for i in range(10)]
    finally:
        await bus.aclose()
    assert peer.connections == 1


async def test_a_late_answer_and_the_right_one_in_one_write(peer: RawPeer, bus: ModbusBus) -> None:
    held: list[Request] = []

    async def hold_the_first(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        if len(peer.requests) == 1:
            held.append(request)  # answered with the next one, after its timeout
            return
        late = b"".join(frame(tid, unit, answer_pdu(pdu, base=900)) for tid, unit, pdu in held)
        held.clear()
        writer.write(late + frame(request[0], request[1], answer_pdu(request[2])))

    peer.script = hold_the_first
    with pytest.raises(
        DeviceUnreachable, match=rf"unit 1: no answer within 0\.2 s on 127\.0\.0\.1:{peer.port}"
    ):
        await bus.read(1, "holding", 0, 2)
    # the late answer (900, 901) comes first in the same bytes: dropped by its transaction id
    assert await bus.read(1, "holding", 20, 2) == [20, 21]
    assert await bus.read(1, "holding", 30, 1) == [30]
    assert peer.connections == 1


async def test_a_late_answer_between_two_requests_is_dropped(peer: RawPeer, bus: ModbusBus) -> None:
    sent = asyncio.Event()

    async def slow_first(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        if len(peer.requests) == 1:
            peer.later(0.3, writer, frame(tid, unit, answer_pdu(pdu, base=900)))
            asyncio.get_running_loop().call_later(0.35, sent.set)
        else:
            writer.write(frame(tid, unit, answer_pdu(pdu)))

    peer.script = slow_first
    with pytest.raises(DeviceUnreachable, match="no answer within"):
        await bus.read(1, "holding", 0, 2)
    await sent.wait()  # the late answer is in the client's buffer or already dropped
    assert await bus.read(1, "holding", 0, 2) == [0, 1]


async def test_a_cancelled_request_leaves_its_late_answer_behind(peer: RawPeer, bus: ModbusBus) -> None:
    async def slow_first(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        delay = 0.1 if len(peer.requests) == 1 else 0.0
        peer.later(delay, writer, frame(tid, unit, answer_pdu(pdu, base=900 if delay else 0)))

    peer.script = slow_first
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.03):  # a cycle timeout of the device's task, say
            await bus.read(1, "holding", 0, 2)
    assert await bus.read(1, "holding", 0, 2) == [0, 1]


@pytest.mark.parametrize(
    ("wrong", "detail"),
    [
        (lambda tid, unit: (tid ^ 0x55, unit), r"transaction \d+ answered, \d+ was asked"),
        (lambda tid, unit: (tid, 9), "unit 9 answered, unit 1 was asked"),
    ],
)
async def test_an_answer_of_another_transaction_or_unit(
    peer: RawPeer, bus: ModbusBus, wrong: Callable[[int, int], tuple[int, int]], detail: str
) -> None:
    async def wrong_first(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        if len(peer.requests) == 1:
            tid, unit = wrong(tid, unit)
        writer.write(frame(tid, unit, answer_pdu(pdu)))

    peer.script = wrong_first
    with pytest.raises(
        DeviceProtocolError, match=rf"unit 1: answer from another unit or request \({detail}\)"
    ):
        await bus.read(1, "holding", 0, 2)
    assert await bus.read(1, "holding", 5, 2) == [5, 6]  # the connection is still good
    assert peer.connections == 1


async def test_garbage_is_a_garbled_answer_and_the_next_request_works(peer: RawPeer, bus: ModbusBus) -> None:
    async def garbage_first(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        if len(peer.requests) == 1:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        else:
            writer.write(frame(tid, unit, answer_pdu(pdu)))

    peer.script = garbage_first
    with pytest.raises(
        DeviceProtocolError, match=r"unit 1: garbled answer \(\d+ bytes, no valid Modbus TCP frame"
    ):
        await bus.read(1, "holding", 0, 2)
    assert await bus.read(1, "holding", 3, 1) == [3]


async def test_a_frame_that_never_completes_is_garbled_not_silence(peer: RawPeer, bus: ModbusBus) -> None:
    async def half(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        whole = frame(tid, unit, answer_pdu(pdu))
        writer.write(whole[: len(whole) // 2] if len(peer.requests) == 1 else whole)

    peer.script = half
    with pytest.raises(DeviceProtocolError, match=r"garbled answer \(\d+ bytes"):
        await bus.read(1, "holding", 0, 10)
    assert await bus.read(1, "holding", 0, 10) == list(range(10))


async def test_an_exception_pdu(peer: RawPeer, bus: ModbusBus) -> None:
    async def refuse(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        tid, unit, pdu = request
        writer.write(frame(tid, unit, bytes([pdu[0] | 0x80, 2])))

    peer.script = refuse
    with pytest.raises(
        ModbusExceptionResponse, match="unit 1: function 3: exception 2: illegal data address"
    ) as info:
        await bus.read(1, "holding", 0, 2)
    assert info.value.code == 2 and info.value.function_code == 3
    async with bus.session() as session:
        with pytest.raises(ModbusExceptionResponse, match="function 6: exception 2"):
            await session.write_register(1, 0, 5)


@pytest.mark.parametrize(
    ("table", "count", "answer_", "message"),
    [
        ("holding", 2, bytes([3, 2, 0, 1]), "answer has 1 registers, 2 were asked"),
        ("input", 2, bytes([4, 4, 0, 1]), r"unusable answer \(byte count 4, 2 data bytes\)"),
        ("coil", 10, bytes([1, 1, 0xFF]), r"short answer \(8 of 10 bits\)"),
        ("holding", 1, bytes([4, 2, 0, 1]), r"unusable answer \(function 4 to a request of function 3\)"),
    ],
)
async def test_short_and_unusable_answers(
    peer: RawPeer, bus: ModbusBus, table: str, count: int, answer_: bytes, message: str
) -> None:
    async def wrong(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(request[0], request[1], answer_))

    peer.script = wrong
    with pytest.raises(DeviceProtocolError, match=message):
        await bus.read(1, table, 0, count)


async def test_silence_drops_the_connection_after_the_limit(peer: RawPeer, bus: ModbusBus) -> None:
    async def silent(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        if peer.connections > 1:
            await answer(peer, request, writer)

    peer.script = silent
    for _ in range(_TCP_SILENT_LIMIT):
        with pytest.raises(DeviceUnreachable, match=r"no answer within 0\.2 s"):
            await bus.read(1, "holding", 0, 1)
    assert peer.connections == 1
    # presumed half-open after the limit: the next request reconnects (and is answered on the new link)
    assert await bus.read(1, "holding", 7, 1) == [7]
    assert peer.connections == 2


async def test_an_answer_resets_the_count_of_silent_requests(peer: RawPeer, bus: ModbusBus) -> None:
    async def every_third(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        if len(peer.requests) % _TCP_SILENT_LIMIT == 0:
            await answer(peer, request, writer)

    peer.script = every_third
    for _ in range(3):
        for _ in range(_TCP_SILENT_LIMIT - 1):
            with pytest.raises(DeviceUnreachable, match="no answer"):
                await bus.read(1, "holding", 0, 1)
        assert await bus.read(1, "holding", 0, 1) == [0]
    assert peer.connections == 1


async def test_a_connection_closed_by_the_peer_is_lost_then_reopened(peer: RawPeer, bus: ModbusBus) -> None:
    async def close_first(peer: RawPeer, request: Request, writer: asyncio.StreamWriter) -> None:
        if peer.connections == 1:
            writer.close()
        else:
            await answer(peer, request, writer)

    peer.script = close_first
    with pytest.raises(DeviceUnreachable, match=rf"bus raw: connection to 127\.0\.0\.1:{peer.port} lost \("):
        await bus.read(1, "holding", 0, 1)
    assert await bus.read(1, "holding", 4, 1) == [4]
    assert peer.connections == 2


async def test_a_refused_connection() -> None:
    port = free_port()  # nothing listens there
    bus = ModbusBus(
        "raw", ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=port, timeout="200ms")
    )
    with pytest.raises(DeviceUnreachable, match=rf"bus raw: cannot connect to 127\.0\.0\.1:{port}"):
        await bus.read(1, "holding", 0, 1)
    await bus.aclose()


async def test_writes_on_the_wire(peer: RawPeer, bus: ModbusBus) -> None:
    async with bus.session() as session:
        await session.write_coil(2, 17, True)
        await session.write_coil(2, 18, False)
        await session.write_register(2, 300, 0xBEEF)
        await session.write_registers(2, 400, [1, 2, 0xFFFF])
    assert [(unit, pdu) for _, unit, pdu in peer.requests] == [
        (2, bytes.fromhex("05 0011 ff00")),
        (2, bytes.fromhex("05 0012 0000")),
        (2, bytes.fromhex("06 012c beef")),
        (2, bytes.fromhex("10 0190 0003 06 0001 0002 ffff")),
    ]
    assert len({tid for tid, _, _ in peer.requests}) == 4  # a new transaction id per request


# -- against pymodbus's server: what we read is what it holds, what we write is what it then holds ---------


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    server = ModbusSim({1: SimUnit(), 2: SimUnit()})
    await server.start_tcp()
    yield server
    await server.aclose()


async def test_values_through_our_client_are_the_servers(sim: ModbusSim) -> None:
    rng = random.Random(24)
    config = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=sim.port, timeout="1s")
    bus = ModbusBus("lan", config)
    try:
        for uid in (1, 2):
            unit = sim.units[uid]
            holding = [rng.randrange(0x10000) for _ in range(125)] + [0, 0xFFFF]
            inputs = [rng.randrange(0x10000) for _ in range(125)]
            coils = [rng.random() < 0.5 for _ in range(2000)]
            discretes = [rng.random() < 0.5 for _ in range(13)]
            unit.set("holding", 100, holding)
            unit.set("input", 7, inputs)
            unit.set("coil", 0, coils)
            unit.set("discrete", 3, discretes)
            assert await bus.read(uid, "holding", 100, 125) == holding[:125]  # the most one request asks
            assert await bus.read(uid, "holding", 225, 2) == [0, 0xFFFF]
            assert await bus.read(uid, "input", 7, 125) == inputs
            assert await bus.read(uid, "coil", 0, 2000) == coils
            assert await bus.read(uid, "discrete", 3, 13) == discretes  # not a whole number of bytes
            assert await bus.read(uid, "coil", 5, 1) == coils[5:6]
            async with bus.session() as session:
                await session.write_coil(uid, 50, not coils[50])
                await session.write_register(uid, 500, 0xA55A)
                values = [rng.randrange(0x10000) for _ in range(123)]
                await session.write_registers(uid, 600, values)
            assert unit.get("coil", 50) == [not coils[50]]
            assert unit.get("holding", 500) == [0xA55A]
            assert unit.get("holding", 600, 123) == values
        assert sim.count(1) == sim.count(2) == 9
        assert bus.requests == 18 and bus.failures == 0
        with pytest.raises(ModbusExceptionResponse, match="exception 2: illegal data address"):
            await bus.read(1, "holding", 0xFFFF, 2)  # beyond the simulator's tables
    finally:
        await bus.aclose()


READ_IN_A_FRESH_INTERPRETER = """
import asyncio, json, struct, sys
from drivers.modbus.driver import ModbusBus
from drivers.modbus.config import ModbusTcpBusConfig

async def serve(reader, writer):
    tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
    await reader.readexactly(length - 1)
    writer.write(struct.pack(">HHHBBBH", tid, 0, 5, unit, 3, 2, 4242))
    await writer.drain()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = ModbusBus("lan", ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=port))
    values = await bus.read(1, "holding", 0, 1)
    await bus.aclose()
    server.close()
    print(json.dumps([values, sorted(m for m in sys.modules if m.split(".")[0] == "pymodbus")]))

asyncio.run(main())
"""


async def test_a_read_on_a_tcp_bus_never_imports_pymodbus() -> None:
    """The unit test (tests/unit/test_daemon_imports.py) checks the imports; this, the request path too."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        READ_IN_A_FRESH_INTERPRETER,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == [[4242], []]
