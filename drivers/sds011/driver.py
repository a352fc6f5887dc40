"""SDS011 driver: wake, warm up, query (or take the pushed frame), sleep again."""

from __future__ import annotations

import asyncio

from agent.driver import DriverContext, PointSpec
from agent.reading import Reading, now_ms
from drivers.sds011 import codec
from drivers.sds011.config import Sds011DeviceConfig
from drivers.serialport.config import SerialSettings
from drivers.serialport.driver import SerialDriver

_REPLY_TIMEOUT = 2.0  # the sensor answers within ~100 ms; an active-mode frame comes every second


class Sds011Driver(SerialDriver[Sds011DeviceConfig]):
    name = "sds011"
    default_settings = SerialSettings(9600, 8, "N", 1)

    def __init__(self, device: str, config: Sds011DeviceConfig, context: DriverContext) -> None:
        super().__init__(device, config, context)
        self._id = bytes.fromhex(config.device_id) if config.device_id else codec.ANY_DEVICE

    def points(self) -> dict[str, PointSpec]:
        return {n: PointSpec(n, "float32", codec.UNIT) for n in ("pm2_5", "pm10")}

    async def _command(self, command: bytes, what: str) -> None:
        """Send a command and wait for its C5 reply (a sleeping sensor still answers wake)."""
        await self.exchange(
            command, self.frame_scan(codec.scan, lambda f: f[1] == codec.REPLY), _REPLY_TIMEOUT, what
        )

    async def open(self) -> None:
        await super().open()
        try:
            await self._command(codec.sleep_command(False, self._id), "answer to wake")
            query = self.config.reporting == "query"
            await self._command(codec.set_query_mode_command(query, self._id), "answer to set reporting mode")
        except BaseException:
            await self.close()
            raise

    async def read(self) -> list[Reading]:
        if self.config.sleep_between_reads:
            await self._command(codec.sleep_command(False, self._id), "answer to wake")
            await asyncio.sleep(self.config.warmup)
        request = codec.query_command(self._id) if self.config.reporting == "query" else None
        frame = await self.exchange(
            request, self.frame_scan(codec.scan, lambda f: f[1] == codec.DATA), _REPLY_TIMEOUT, "data frame"
        )
        ts = now_ms()
        m = self.decode(codec.parse_data, frame, "data frame")
        if self.config.sleep_between_reads:
            await self._command(codec.sleep_command(True, self._id), "answer to sleep")
        return [
            Reading(self.device, "pm2_5", ts, m.pm2_5, codec.UNIT),
            Reading(self.device, "pm10", ts, m.pm10, codec.UNIT),
        ]
