"""MH-Z19 driver: one read command per cycle; readings during pre-heat marked uncertain or withheld."""

from __future__ import annotations

import asyncio

from agent.driver import DriverContext, PointSpec
from agent.reading import Reading, now_ms
from drivers.mhz19 import codec
from drivers.mhz19.config import Mhz19DeviceConfig
from drivers.serialport.config import SerialSettings
from drivers.serialport.driver import SerialDriver

_REPLY_TIMEOUT = 2.0


class Mhz19Driver(SerialDriver[Mhz19DeviceConfig]):
    name = "mhz19"
    default_settings = SerialSettings(9600, 8, "N", 1)

    def __init__(self, device: str, config: Mhz19DeviceConfig, context: DriverContext) -> None:
        super().__init__(device, config, context)
        # The sensor is powered with the gateway: the agent's first open is the best estimate of power-up.
        self._powered_at: float | None = None

    def points(self) -> dict[str, PointSpec]:
        return {"co2": PointSpec("co2", "uint16", codec.UNIT)}

    async def open(self) -> None:
        await super().open()
        if self._powered_at is None:
            self._powered_at = asyncio.get_running_loop().time()

    def preheating(self) -> bool:
        if self._powered_at is None:
            return True
        return asyncio.get_running_loop().time() - self._powered_at < self.config.preheat

    async def read(self) -> list[Reading]:
        frame = await self.exchange(
            codec.read_co2_command(), self.frame_scan(codec.scan), _REPLY_TIMEOUT, "answer to read CO2"
        )
        ppm = self.decode(codec.parse_co2, frame, "answer to read CO2")
        quality = None
        if self.preheating():
            if self.config.during_preheat == "withhold":
                return []
            quality = "uncertain"
        return [Reading(self.device, "co2", now_ms(), ppm, codec.UNIT, quality)]
