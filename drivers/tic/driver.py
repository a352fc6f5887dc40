"""Linky TIC driver: listens to the meter's frames, keeps the latest value per label, emits per interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from agent.driver import DriverContext, PointSpec
from agent.errors import DecodeError, DeviceUnreachable
from agent.reading import Reading, now_ms
from drivers.serialport.config import SerialSettings
from drivers.serialport.driver import SerialDriver
from drivers.serialport.port import SerialPort
from drivers.tic.codec import (
    ADDRESS_LABELS,
    BAUDRATE,
    DEFAULT_LABELS,
    FrameAssembler,
    Mode,
    TicGroup,
    detect_mode,
    parse_frame_body,
    value_of,
)
from drivers.tic.config import TicDeviceConfig

log = logging.getLogger("fieldgate.tic")

_SETTINGS = {mode: SerialSettings(baud, 7, "E", 1) for mode, baud in BAUDRATE.items()}


class TicDriver(SerialDriver[TicDeviceConfig]):
    """A push device: `stream()` yields, at most once per `min_interval`, the latest value of each label."""

    name = "linky-tic"

    def __init__(self, device: str, config: TicDeviceConfig, context: DriverContext) -> None:
        super().__init__(device, config, context)
        self.mode: Mode | None = None if config.mode == "auto" else config.mode
        self.meter_address: str | None = None  # ADCO / ADSC: identifies the meter (also a string point)
        self._assembler = FrameAssembler()
        self.line.values.update({"partial_frames": 0, "bad_value": 0})

    def settings(self) -> SerialSettings:
        return self.config.serial_settings(_SETTINGS[self.mode or "standard"])

    def _wanted(self, label: str) -> bool:
        labels = self.config.labels
        if labels == "all":
            return True
        if labels is None:
            return label in DEFAULT_LABELS[self.mode or "historic"]
        return label in labels

    def points(self) -> dict[str, PointSpec]:
        labels = self.config.labels
        if labels == "all":
            return {}
        names = labels if labels is not None else DEFAULT_LABELS[self.mode or "historic"]
        return {n: PointSpec(n, "string" if n in ADDRESS_LABELS else "float64") for n in names}

    async def open(self) -> None:
        await super().open()
        self._assembler = FrameAssembler()
        if self.config.mode == "auto":
            try:
                self.mode = await self._detect(self._open_port())
            except BaseException:
                await self.close()
                raise

    async def _detect(self, port: SerialPort) -> Mode:
        """Listen at 9600 then 1200 baud for a frame that is valid in one mode (HT separators => standard)."""
        loop = asyncio.get_running_loop()
        for mode in ("standard", "historic"):
            await port.set_baudrate(self.config.baudrate or BAUDRATE[mode])
            port.discard_input()
            assembler = FrameAssembler()
            deadline = loop.time() + self.config.detect_timeout
            while (left := deadline - loop.time()) > 0:
                for body in assembler.feed(await port.read(left)):
                    found = detect_mode(body)
                    if found is not None:
                        if found != mode:
                            await port.set_baudrate(self.config.baudrate or BAUDRATE[found])
                        log.info("%s: TIC %s mode detected", self.device, found)
                        return found
        raise DeviceUnreachable(
            f"{self.config.port}: no TIC frame at 9600 or 1200 baud (check the I1/I2 wiring and the meter)"
        )

    def _frame_readings(self, body: bytes, ts: int) -> list[Reading]:
        mode = self.mode or "historic"
        try:
            result = parse_frame_body(body, mode)
        except Exception as exc:  # a codec bug: counted and reported, the next frame is another chance
            self.codec_bug(exc, "frame")
            return []
        for err in result.errors:
            self.line.add("bad_checksum" if err.startswith("bad checksum") else "malformed", problem=err)
        if result.groups:
            self.line.add("frames_ok")
        readings: list[Reading] = []
        for group in result.groups:
            self._note_address(group)
            if not self._wanted(group.label):
                continue
            try:
                value, unit = value_of(group, mode)
            except DecodeError as exc:
                self.line.add("bad_value", problem=str(exc))
                continue
            except Exception as exc:  # a codec bug costs this group only
                self.codec_bug(exc, f"group {group.label}")
                continue
            quality = "uncertain" if group.horodate is not None and group.horodate.degraded else None
            readings.append(Reading(self.device, group.label, ts, value, unit, quality))
        return readings

    def _note_address(self, group: TicGroup) -> None:
        if group.label in ADDRESS_LABELS:
            address = group.data.strip()
            if self.meter_address is not None and address != self.meter_address:
                log.warning(
                    "%s: meter address changed from %s to %s", self.device, self.meter_address, address
                )
            self.meter_address = address

    def _account(self, before: tuple[int, int]) -> None:
        garbage = self._assembler.garbage_bytes - before[0]
        partial = self._assembler.partial_frames - before[1]
        self.line.add(
            "garbage_bytes", garbage, problem=f"{garbage} byte(s) outside frames" if garbage else None
        )
        self.line.add(
            "partial_frames", partial, problem="partial frame (resynchronised)" if partial else None
        )

    async def _frames(self) -> AsyncGenerator[list[Reading], None]:
        """Readings of each valid frame as it arrives; DeviceUnreachable on port loss or long silence."""
        port = self._open_port()
        loop = asyncio.get_running_loop()
        last_good = loop.time()
        try:
            while True:
                silence = self.config.silence_timeout
                data = await port.read(max(0.05, min(1.0, last_good + silence - loop.time())))
                before = (self._assembler.garbage_bytes, self._assembler.partial_frames)
                bodies = self._assembler.feed(data)
                self._account(before)
                ok_before = self.line.values["frames_ok"]
                for body in bodies:
                    readings = self._frame_readings(body, now_ms())
                    self.publish_line_summary()
                    yield readings
                if self.line.values["frames_ok"] > ok_before:
                    last_good = loop.time()
                    self.publish_line_summary()
                elif loop.time() - last_good >= silence:
                    raise DeviceUnreachable(
                        f"{self.config.port}: no valid TIC frame for {silence:g}s "
                        f"({self.mode or 'unknown'} mode; check the wiring, the mode and the baud rate)"
                    )
        except DeviceUnreachable as exc:
            if "port lost" in str(exc):
                self.line.add("port_lost", problem=str(exc))
            self.publish_line_summary()
            raise

    async def read(self) -> list[Reading]:
        """One-shot: the readings of the next valid frame (the `read` verb)."""
        async with aclosing(self._frames()) as frames:
            async for readings in frames:
                if readings:
                    return readings
        return []  # pragma: no cover - _frames never ends without raising

    def stream(self) -> AsyncIterator[list[Reading]]:
        return self._stream()

    async def _stream(self) -> AsyncGenerator[list[Reading], None]:
        loop = asyncio.get_running_loop()
        latest: dict[str, Reading] = {}
        next_emit = 0.0
        async with aclosing(self._frames()) as frames:
            async for readings in frames:
                for r in readings:
                    latest[r.point] = r
                if latest and loop.time() >= next_emit:
                    yield list(latest.values())
                    latest = {}
                    next_emit = loop.time() + self.config.min_interval
