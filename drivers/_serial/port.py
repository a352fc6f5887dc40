"""An asyncio serial port over pyserial: termios setup by pyserial, reads through `loop.add_reader`.

pyserial configures the line (baud rate, 7E1/8N1...) and hands us a file
descriptor; we read it non-blocking from the event loop, so no thread and no
extra dependency (pyserial-asyncio adds little over these ~100 lines).
A vanished port (USB adapter unplugged, pty closed) shows up as EIO or
end-of-file on the descriptor: the port is then marked lost and every read or
write raises DeviceUnreachable until the driver opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from typing import Any

import serial

from agent.errors import DeviceUnreachable
from drivers._serial.config import SerialSettings

_MAX_BUFFER = 64 * 1024  # a line spewing garbage with nobody reading must not grow memory without bound


class SerialPort:
    """One open serial port; readers await bytes, writers write whole frames."""

    def __init__(self, path: str, settings: SerialSettings) -> None:
        self.path = path
        self.settings = settings
        self._serial: Any = None
        self._fd: int | None = None
        self._buffer = bytearray()
        self._data = asyncio.Event()
        self._lost: str | None = None
        self.dropped_bytes = 0  # bytes thrown away because the buffer was full

    @property
    def is_open(self) -> bool:
        return self._fd is not None and self._lost is None

    async def open(self) -> None:
        """Open and configure the port; DeviceUnreachable (in words) if it is missing or busy."""
        self.close()
        try:
            ser = serial.Serial(
                port=None,
                baudrate=self.settings.baudrate,
                bytesize=self.settings.bytesize,
                parity=self.settings.parity,
                stopbits=self.settings.stopbits,
                timeout=0,
                exclusive=True,
            )
            ser.port = self.path
            ser.open()
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise DeviceUnreachable(f"{self.path}: cannot open serial port: {exc}") from exc
        self._serial = ser
        fd: int = ser.fileno()
        os.set_blocking(fd, False)
        self._fd = fd
        self._lost = None
        self._buffer.clear()
        self._data.clear()
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    async def set_baudrate(self, baudrate: int) -> None:
        """Reopen the line at another speed (TIC mode detection).

        Reopening rather than changing termios on the fly: some drivers (ptys,
        a few USB adapters) refuse a speed change on an open descriptor.
        """
        if baudrate == self.settings.baudrate and self.is_open:
            return
        self.settings = SerialSettings(
            baudrate, self.settings.bytesize, self.settings.parity, self.settings.stopbits
        )
        await self.open()

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._mark_lost(f"port lost ({exc.strerror or exc})")
            return
        if not chunk:
            self._mark_lost("port lost (hang-up)")
            return
        room = _MAX_BUFFER - len(self._buffer)
        if len(chunk) > room:
            self.dropped_bytes += len(chunk) - room
            chunk = chunk[:room]
        self._buffer += chunk
        self._data.set()

    def _mark_lost(self, reason: str) -> None:
        self._lost = reason
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing registered
                asyncio.get_running_loop().remove_reader(self._fd)
        self._data.set()  # wake a waiting reader so it sees the loss

    def _check(self) -> None:
        if self._fd is None:
            raise DeviceUnreachable(f"{self.path}: port is not open")
        if self._lost is not None:
            raise DeviceUnreachable(f"{self.path}: {self._lost}")

    def discard_input(self) -> int:
        """Forget what was received so far (stale answers); returns how many bytes were dropped."""
        self._check()
        n = len(self._buffer)
        self._buffer.clear()
        self._data.clear()
        return n

    async def read(self, wait: float) -> bytes:
        """Whatever arrived, waiting up to `wait` seconds for at least one byte; b"" on timeout."""
        self._check()
        if not self._buffer:
            self._data.clear()
            try:
                async with asyncio.timeout(wait):  # not wait_for: on 3.11 it can swallow a cancellation
                    await self._data.wait()
            except TimeoutError:
                self._check()
                return b""
            self._check()
        data = bytes(self._buffer)
        self._buffer.clear()
        self._data.clear()
        return data

    async def write(self, data: bytes) -> None:
        """Write a whole frame (small frames: the kernel buffer takes them at once)."""
        self._check()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            except OSError as exc:
                self._mark_lost(f"port lost ({exc.strerror or exc})")
                self._check()
                return
            view = view[n:]

    def close(self) -> None:
        """Release the port. Never raises."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing registered
                asyncio.get_running_loop().remove_reader(fd)
        ser, self._serial = self._serial, None
        if ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                ser.close()
        self._buffer.clear()
        self._lost = None

    async def aclose(self) -> None:
        self.close()
