"""The common part of drivers that own one serial port: open/close, counters, request/response exchange."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from agent.driver import Driver, DriverContext
from agent.errors import DecodeError, DeviceProtocolError, DeviceUnreachable
from drivers.serialport.config import SerialDeviceConfig, SerialSettings
from drivers.serialport.counters import LineCounters, ScanStats
from drivers.serialport.port import SerialPort

CfgT = TypeVar("CfgT", bound=SerialDeviceConfig)
FrameT = TypeVar("FrameT")
T = TypeVar("T")

COUNTER_NAMES = ("frames_ok", "bad_checksum", "malformed", "garbage_bytes", "timeouts", "port_lost")

log = logging.getLogger("fieldgate.serial")


class SerialDriver(Driver[CfgT]):
    """A device alone on its serial port. Subclasses give the protocol's default line settings."""

    default_settings: SerialSettings

    def __init__(self, device: str, config: CfgT, context: DriverContext) -> None:
        super().__init__(device, config, context)
        self.line = LineCounters(device, COUNTER_NAMES, log)
        self.port: SerialPort | None = None
        self._bug_logged = False

    @property
    def counters(self) -> dict[str, int]:
        """frames_ok, bad_checksum, malformed, garbage_bytes, timeouts, port_lost since the agent started."""
        return self.line.values

    def settings(self) -> SerialSettings:
        return self.config.serial_settings(self.default_settings)

    async def open(self) -> None:
        await self.close()
        port = SerialPort(self.config.port, self.settings())
        await port.open()
        self.port = port

    async def close(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            port.close()

    def _open_port(self) -> SerialPort:
        if self.port is None:
            raise DeviceUnreachable(f"{self.config.port}: port is not open")
        return self.port

    def publish_line_summary(self) -> None:
        summary = self.line.summary()
        if summary:
            self.point_errors["serial_line"] = summary
        else:
            self.point_errors.pop("serial_line", None)

    def codec_bug(self, exc: Exception, what: str) -> None:
        """An unexpected exception in a codec is a bug: counted as `codec_bugs`, its traceback logged once."""
        self.line.add("codec_bugs", problem=f"codec bug in the {what}: {type(exc).__name__}: {exc}")
        if not self._bug_logged:
            self._bug_logged = True
            log.error(
                "%s: the codec failed on the %s (a bug; logged once)",
                self.device,
                what,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def decode(self, func: Callable[[bytes], T], frame: bytes, what: str) -> T:
        """`func(frame)`; a DecodeError passes, any other exception is a counted codec bug for this frame."""
        try:
            return func(frame)
        except DecodeError:
            raise
        except Exception as exc:
            self.codec_bug(exc, what)
            self.publish_line_summary()
            raise DeviceProtocolError(
                f"{self.config.port}: codec bug decoding the {what}: {type(exc).__name__}: {exc}"
            ) from exc

    def frame_scan(
        self,
        scan: Callable[[bytearray, ScanStats], bytes | None],
        accept: Callable[[bytes], bool] = lambda frame: True,
    ) -> Callable[[bytearray], bytes | None]:
        """Adapt a codec scanner for `exchange`: count garbage and bad checksums, skip unwanted frames."""
        stats = ScanStats()

        def run(buf: bytearray) -> bytes | None:
            while True:
                garbage, bad = stats.garbage_bytes, stats.bad_checksum
                try:
                    frame = scan(buf, stats)
                except Exception as exc:  # a scanner bug: counted, and the byte it choked on dropped
                    self.codec_bug(exc, "frame scanner")
                    del buf[:1]
                    continue
                g, b = stats.garbage_bytes - garbage, stats.bad_checksum - bad
                self.line.add("garbage_bytes", g, problem=f"{g} garbage byte(s)" if g else None)
                self.line.add("bad_checksum", b, problem=stats.last_problem)
                if frame is None or accept(frame):
                    return frame

        return run

    async def exchange(
        self,
        request: bytes | None,
        scan: Callable[[bytearray], FrameT | None],
        wait: float,
        what: str,
    ) -> FrameT:
        """Send `request` (if any) and wait for the first frame `scan` accepts.

        `scan` consumes what it has looked at from the buffer (counting garbage
        and bad frames itself) and returns a frame or None. A port that
        vanished raises DeviceUnreachable; silence raises it too, in words.
        """
        port = self._open_port()
        try:
            stale = port.discard_input()
            self.line.add(
                "garbage_bytes", stale, problem="unsolicited bytes before a request" if stale else None
            )
            if request is not None:
                await port.write(request)
            buf = bytearray()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while True:
                frame = scan(buf)
                if frame is not None:
                    self.line.add("frames_ok")
                    return frame
                left = deadline - loop.time()
                if left <= 0:
                    self.line.add("timeouts", problem=f"no {what} within {wait:g}s")
                    raise DeviceUnreachable(f"{self.config.port}: no {what} within {wait:g}s")
                buf += await port.read(left)
        except DeviceUnreachable as exc:
            if "port lost" in str(exc) or "not open" in str(exc):
                self.line.add("port_lost", problem=str(exc))
            raise
        finally:
            self.publish_line_summary()
