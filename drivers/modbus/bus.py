"""One Modbus bus (TCP link, RS-485 line or RTU-over-TCP gateway): one client, one lock, errors in words.

A Modbus TCP bus uses our own client (drivers/modbus/tcpclient.py); serial RTU and RTU over TCP use pymodbus's,
imported only when such a bus connects, so that a gateway whose buses are all TCP never imports pymodbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from agent.aio import settled
from agent.errors import DeviceProtocolError, DeviceUnreachable
from drivers.modbus import tcpclient
from drivers.modbus.config import ModbusRtuBusConfig, ModbusRtuTcpBusConfig, ModbusTcpBusConfig
from drivers.modbus.tcpclient import ModbusExceptionResponse, ModbusTcpLink

if TYPE_CHECKING:
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
    from pymodbus.exceptions import ModbusIOException

    PymodbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient

__all__ = ["BusConfig", "BusSession", "ModbusBus", "ModbusExceptionResponse"]

log = logging.getLogger(__name__)

# pymodbus logs every timeout as ERROR with a dump of the last frames: a dead unit would flood the
# journal each cycle. Our DeviceErrors carry the same facts in words and are counted in health, so
# pymodbus is quieted unless someone set its level on purpose (e.g. to DEBUG while commissioning).
if logging.getLogger("pymodbus").level == logging.NOTSET:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

BusConfig = ModbusTcpBusConfig | ModbusRtuTcpBusConfig | ModbusRtuBusConfig

# TCP: after this many requests in a row without any answer, the connection is presumed half-open
# and is closed; the next request reconnects.
_TCP_SILENT_LIMIT = 3


def char_bits(config: ModbusRtuBusConfig) -> int:
    """Bits on the line per character: start + data + parity + stop."""
    return 1 + config.bytesize + (0 if config.parity == "N" else 1) + config.stopbits


def rtu_silence(config: ModbusRtuBusConfig) -> float:
    """The 3.5-character inter-frame silence in seconds (fixed 1.75 ms above 19200 baud, per the RTU spec)."""
    if config.baudrate > 19200:
        return 0.00175
    return 3.5 * char_bits(config) / config.baudrate


class ModbusBus:
    """One client and one FIFO lock per bus, so requests of the devices on it never interleave.

    Devices take the lock per request (asyncio.Lock wakes waiters in FIFO order), so a
    device with many requests cannot starve the others. The connection opens lazily and
    is reopened after a loss. No retries (ours has none, pymodbus's are 0): a dead unit costs one timeout.
    """

    def __init__(self, name: str, config: BusConfig, *, timeout: float | None = None) -> None:
        self.name = name
        self.config = config
        self.timeout = timeout if timeout is not None else config.timeout
        self._lock = asyncio.Lock()
        self._tcp = isinstance(config, ModbusTcpBusConfig)  # our client (tcpclient), not pymodbus's
        self._client: ModbusTcpLink | PymodbusClient | None = None
        self._rx_bytes = 0  # bytes received during the current request (tells garbage from silence)
        self._silent = 0
        self._last_frame_end = 0.0
        self._silence = rtu_silence(config) if isinstance(config, ModbusRtuBusConfig) else 0.0
        self.requests = 0
        self.failures = 0

    def describe(self) -> str:
        c = self.config
        if isinstance(c, ModbusRtuBusConfig):
            return f"{c.port} ({c.baudrate} {c.bytesize}{c.parity}{c.stopbits})"
        return f"{c.host}:{c.port}"

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx_bytes = max(self._rx_bytes, len(data))
        return data

    def _make_client(self) -> PymodbusClient:
        """pymodbus's client for a serial or RTU-over-TCP bus (imported here: only such a bus loads pymodbus)."""
        from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
        from pymodbus.framer import FramerType

        c = self.config
        # reconnect_delay=0: no background reconnect task; we reconnect lazily on the next request.
        common: dict[str, Any] = {
            "timeout": self.timeout,
            "retries": 0,
            "reconnect_delay": 0,
            "trace_packet": self._trace_packet,
            "name": self.name,
        }
        if isinstance(c, ModbusRtuBusConfig):
            client: PymodbusClient = AsyncModbusSerialClient(
                c.port,
                framer=FramerType.RTU,
                baudrate=c.baudrate,
                bytesize=c.bytesize,
                parity=c.parity,
                stopbits=c.stopbits,
                **common,
            )
            # A silent unit on a shared line must not close the port for the others.
            client.set_max_no_responses(1_000_000)
            return client
        assert isinstance(c, ModbusRtuTcpBusConfig)
        return AsyncModbusTcpClient(c.host, port=c.port, framer=FramerType.RTU, **common)

    async def _connected_client(self) -> ModbusTcpLink | PymodbusClient:
        if self._client is not None and self._client.connected:
            return self._client
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._tcp:
            return await self._connected_link()
        client = self._client = self._make_client()
        if not await self._connect(client):
            client.close()
            self._client = None
            what = "open serial port" if isinstance(self.config, ModbusRtuBusConfig) else "connect to"
            raise DeviceUnreachable(f"bus {self.name}: cannot {what} {self.describe()}")
        return client

    async def _connected_link(self) -> ModbusTcpLink:
        c = self.config
        assert isinstance(c, ModbusTcpBusConfig)
        try:
            link = await ModbusTcpLink.open(c.host, c.port, self.timeout)
        except (OSError, TimeoutError):
            raise DeviceUnreachable(f"bus {self.name}: cannot connect to {self.describe()}") from None
        self._client = link
        return link

    async def _connect(self, client: PymodbusClient) -> bool:
        """Open the connection. pymodbus 3.16's `connect()` returns as soon as the transport is up (3.11
        slept 0.1 s after it, which we skipped for TCP by opening `client.ctx` directly). A serial line keeps
        a 0.1 s pause after opening, ours now: some USB adapters need a moment before the first frame."""
        ok = bool(await settled(client.connect()))
        if ok and isinstance(self.config, ModbusRtuBusConfig):
            await asyncio.sleep(0.1)
        return ok

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[BusSession]:
        """Hold the bus for several requests (read-modify-write of a bit point)."""
        async with self._lock:
            yield BusSession(self)

    async def _exchange(self, unit_id: int, pdu: bytes) -> bytes:
        """One request on a Modbus TCP bus (the lock held): the answer's PDU, or a DeviceError in words."""
        client = self._client
        if client is None or not client.connected:
            client = await self._connected_client()
        assert isinstance(client, ModbusTcpLink)
        self.requests += 1
        try:
            answer = await client.request(unit_id, pdu, self.timeout)
        except tcpclient.NoAnswer:
            self.failures += 1
            self._silent += 1
            if self._silent >= _TCP_SILENT_LIMIT:
                self._drop_client()  # presumed half-open: the next request reconnects
            raise DeviceUnreachable(
                f"unit {unit_id}: no answer within {self.timeout:g} s on {self.describe()}"
            ) from None
        except tcpclient.ConnectionLost as exc:
            self.failures += 1
            self._drop_client()
            raise DeviceUnreachable(
                f"bus {self.name}: connection to {self.describe()} lost ({exc.reason})"
            ) from None
        except tcpclient.WrongAnswer as exc:
            self.failures += 1
            raise DeviceProtocolError(
                f"unit {unit_id}: answer from another unit or request ({exc})"
            ) from None
        except tcpclient.GarbledAnswer as exc:
            self.failures += 1
            raise DeviceProtocolError(
                f"unit {unit_id}: garbled answer ({exc.size} bytes, no valid Modbus TCP frame: "
                "is this port a Modbus TCP server, or an RTU-over-TCP gateway (type modbus-rtu-tcp)?)"
            ) from None
        self._silent = 0
        return answer

    async def _call_locked(self, unit_id: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request through pymodbus's client (serial, RTU over TCP): the response or a DeviceError."""
        from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

        client = await self._connected_client()
        assert not isinstance(client, ModbusTcpLink)
        if self._silence:
            wait = self._last_frame_end + self._silence - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        self._rx_bytes = 0
        self.requests += 1
        try:
            response = await settled(getattr(client, method)(*args, device_id=unit_id, **kwargs))
        except ConnectionException as exc:
            self.failures += 1
            self._drop_client()
            raise DeviceUnreachable(
                f"bus {self.name}: connection to {self.describe()} lost ({exc.string})"
            ) from None
        except ModbusIOException as exc:
            self.failures += 1
            return self._no_answer(unit_id, exc)
        except ModbusException as exc:
            self.failures += 1
            raise DeviceProtocolError(f"unit {unit_id}: unusable answer ({exc.string})") from None
        finally:
            self._last_frame_end = time.monotonic()
        self._silent = 0
        if response is None:
            raise DeviceProtocolError(f"unit {unit_id}: empty answer")
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise ModbusExceptionResponse(unit_id, int(response.function_code) & 0x7F, code)
        return response

    def _no_answer(self, unit_id: int, exc: ModbusIOException) -> Any:
        if self._client is None or not self._client.connected:
            self._drop_client()
            raise DeviceUnreachable(f"bus {self.name}: connection to {self.describe()} lost") from None
        if "device id" in exc.string or "transaction id" in exc.string:
            raise DeviceProtocolError(f"unit {unit_id}: answer from another unit or request ({exc.string})")
        if self._rx_bytes:
            raise DeviceProtocolError(
                f"unit {unit_id}: garbled answer ({self._rx_bytes} bytes, no valid frame: "
                "CRC error, noise, or wrong baud rate/parity?)"
            )
        self._silent += 1
        if not isinstance(self.config, ModbusRtuBusConfig) and self._silent >= _TCP_SILENT_LIMIT:
            self._drop_client()
        raise DeviceUnreachable(f"unit {unit_id}: no answer within {self.timeout:g} s on {self.describe()}")

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._silent = 0

    async def read(self, unit_id: int, table: str, address: int, count: int) -> list[int] | list[bool]:
        async with self._lock:
            if self._tcp:  # the hot path: no BusSession
                return await self._read_tcp(unit_id, table, address, count)
            return await BusSession(self).read(unit_id, table, address, count)

    async def _read_tcp(self, unit_id: int, table: str, address: int, count: int) -> list[int] | list[bool]:
        function = tcpclient.READ_FUNCTION[table]
        answer = await self._exchange(unit_id, tcpclient.read_request(table, address, count))
        if function <= 2:
            return tcpclient.bits_of(unit_id, function, answer, count)
        return tcpclient.registers_of(unit_id, function, answer, count)

    async def aclose(self) -> None:
        async with self._lock:
            self._drop_client()


_READ_METHOD = {
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
    "holding": "read_holding_registers",
    "input": "read_input_registers",
}


class BusSession:
    """Requests made while holding the bus lock."""

    def __init__(self, bus: ModbusBus) -> None:
        self.bus = bus

    async def read(self, unit_id: int, table: str, address: int, count: int) -> list[int] | list[bool]:
        if self.bus._tcp:
            return await self.bus._read_tcp(unit_id, table, address, count)
        response = await self.bus._call_locked(unit_id, _READ_METHOD[table], address, count=count)
        if table in ("coil", "discrete"):
            bits = [bool(b) for b in response.bits]
            if len(bits) < count:
                raise DeviceProtocolError(f"unit {unit_id}: short answer ({len(bits)} of {count} bits)")
            return bits[:count]
        registers = [int(r) for r in response.registers]
        if len(registers) != count:
            raise DeviceProtocolError(
                f"unit {unit_id}: answer has {len(registers)} registers, {count} were asked"
            )
        return registers

    async def write_coil(self, unit_id: int, address: int, value: bool) -> None:
        if self.bus._tcp:
            await self._write_tcp(unit_id, tcpclient.write_coil_request(address, value))
        else:
            await self.bus._call_locked(unit_id, "write_coil", address, value)

    async def write_register(self, unit_id: int, address: int, value: int) -> None:
        if self.bus._tcp:
            await self._write_tcp(unit_id, tcpclient.write_register_request(address, value))
        else:
            await self.bus._call_locked(unit_id, "write_register", address, value)

    async def write_registers(self, unit_id: int, address: int, values: list[int]) -> None:
        if self.bus._tcp:
            await self._write_tcp(unit_id, tcpclient.write_registers_request(address, values))
        else:
            await self.bus._call_locked(unit_id, "write_registers", address, values)

    async def _write_tcp(self, unit_id: int, request: bytes) -> None:
        tcpclient.check_write(unit_id, request[0], await self.bus._exchange(unit_id, request))
