"""M-Bus master driver: SND_NKE then REQ_UD2 per primary address; meters on one port share it."""

from __future__ import annotations

import asyncio
import logging

from agent.driver import Driver, DriverContext
from agent.errors import DecodeError, DeviceProtocolError, DeviceUnreachable
from agent.reading import Reading, Value, now_ms
from drivers.mbus import codec
from drivers.mbus.config import MbusDeviceConfig
from drivers.serialport.config import SerialSettings
from drivers.serialport.counters import LineCounters
from drivers.serialport.driver import COUNTER_NAMES
from drivers.serialport.port import SerialPort

log = logging.getLogger("fieldgate.mbus")


class MbusPort:
    """One M-Bus master port shared by the meters behind it: opened once, one exchange at a time."""

    def __init__(self, path: str, settings: SerialSettings) -> None:
        self.port = SerialPort(path, settings)
        self.lock = asyncio.Lock()

    async def ensure_open(self) -> None:
        if not self.port.is_open:
            await self.port.open()

    async def aclose(self) -> None:
        self.port.close()


class MbusDriver(Driver[MbusDeviceConfig]):
    """One meter. Every record of its answer becomes a point (see docs/MBUS.md for the names)."""

    name = "mbus"
    default_settings = SerialSettings(2400, 8, "E", 1)

    def __init__(self, device: str, config: MbusDeviceConfig, context: DriverContext) -> None:
        super().__init__(device, config, context)
        self.line = LineCounters(device, COUNTER_NAMES, log)
        settings = config.serial_settings(self.default_settings)
        self.bus: MbusPort = context.shared.get(
            ("serial", config.port), lambda: MbusPort(config.port, settings)
        )
        self.meter_id: str | None = None
        self.skipped: list[str] = []  # records of the last answer not published, with why
        self.line.values.update({"bad_records": 0, "codec_bugs": 0})
        self._logged: set[str] = set()  # record codings already logged (each once)

    @property
    def counters(self) -> dict[str, int]:
        return self.line.values

    async def open(self) -> None:
        async with self.bus.lock:
            await self.bus.ensure_open()

    async def _answer(self, port: SerialPort, request: bytes, expect_long: bool) -> bytes | None:
        """Send a frame, return the answer (E5 or a checksum-valid long frame), None on silence."""
        port.discard_input()
        await port.write(request)
        buf = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.reply_timeout
        while True:
            while buf:
                n = codec.frame_length(buf)
                if n == 0 or (n == 1 and expect_long) or (n == 5 and expect_long):
                    self.line.add("garbage_bytes", problem="byte outside a frame")
                    del buf[:1]
                    continue
                if n is None or len(buf) < n:
                    break
                frame = bytes(buf[:n])
                if n == 1:
                    return frame
                try:
                    codec.parse_long_frame(frame)
                except DecodeError as exc:
                    self.line.add("bad_checksum" if "checksum" in str(exc) else "malformed", problem=str(exc))
                    del buf[:1]
                    continue
                return frame
            left = deadline - loop.time()
            if left <= 0:
                return None
            buf += await port.read(left)

    async def _request_telegram(self, port: SerialPort, fcb: bool) -> codec.Telegram:
        request = codec.req_ud2(self.config.address, fcb)
        problem = "no answer"
        for _attempt in range(self.config.retries + 1):
            frame = await self._answer(port, request, expect_long=True)
            if frame is None:
                self.line.add("timeouts", problem=f"no answer from address {self.config.address}")
                continue
            try:
                telegram = codec.decode_long_frame(frame)
            except DecodeError as exc:
                problem = str(exc)
                self.line.add("malformed", problem=problem)
                continue
            except Exception as exc:  # a codec bug: counted and reported, traceback logged once
                problem = f"codec bug: {type(exc).__name__}: {exc}"
                self._codec_bug(exc, frame.hex().upper())
                continue
            self._record_problems(telegram)
            if telegram.address != self.config.address:
                problem = f"answer from address {telegram.address}, expected {self.config.address}"
                self.line.add("malformed", problem=problem)
                continue
            self.line.add("frames_ok")
            return telegram
        if problem == "no answer":
            raise DeviceUnreachable(
                f"{self.config.port}: no answer from M-Bus address {self.config.address} "
                f"after {self.config.retries + 1} request(s)"
            )
        raise DeviceProtocolError(f"M-Bus address {self.config.address}: {problem}")

    def _codec_bug(self, exc: Exception, where: str) -> None:
        self.line.add("codec_bugs", problem=f"codec bug ({where[:60]}): {type(exc).__name__}: {exc}")
        if "codec_bug" not in self._logged:
            self._logged.add("codec_bug")
            log.error(
                "%s: the M-Bus codec failed on %s (a bug; logged once)",
                self.device,
                where,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def _record_problems(self, telegram: codec.Telegram) -> None:
        """Records of an answer that could not be decoded: counted, each coding logged once; the rest kept."""
        for error in telegram.errors:
            self.line.add("bad_records", problem=error)
            key = error.partition(":")[0]
            if key not in self._logged:
                self._logged.add(key)
                log.warning("%s: record not decoded (logged once per coding): %s", self.device, error)
        for coding, exc in telegram.bugs:
            self._codec_bug(exc, f"record {coding}")

    async def read(self) -> list[Reading]:
        try:
            async with self.bus.lock:
                await self.bus.ensure_open()
                port = self.bus.port
                if self.config.reset:
                    # Some meters do not acknowledge SND_NKE; their answer to REQ_UD2 is what counts.
                    await self._answer(port, codec.snd_nke(self.config.address), expect_long=False)
                values: dict[str, tuple[Value, str | None]] = {}
                self.skipped = []
                fcb = False
                for _ in range(self.config.max_telegrams):
                    telegram = await self._request_telegram(port, fcb)
                    for name, vu in telegram.values().items():
                        values.setdefault(name, vu)  # the first telegram's header is the meter's
                    self.skipped += telegram.skipped
                    if not telegram.more_follows:
                        break
                    fcb = not fcb
        except DeviceUnreachable as exc:
            if "port lost" in str(exc):
                self.line.add("port_lost", problem=str(exc))
                self.bus.port.close()
            raise
        finally:
            summary = self.line.summary()
            if summary:
                self.point_errors["serial_line"] = summary
        ts = now_ms()
        meter_id = values.get("meter_id")
        if meter_id is not None:
            self.meter_id = str(meter_id[0])
        values.pop("access_number", None)  # changes on every answer: not a measurement
        wanted = self.config.points
        return [
            Reading(self.device, name, ts, value, unit)
            for name, (value, unit) in values.items()
            if wanted is None or name in wanted
        ]
