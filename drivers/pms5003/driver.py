"""PMS5003 driver: passive mode (ask for each frame) or active mode (take the latest pushed frame)."""

from __future__ import annotations

import asyncio

from agent.driver import PointSpec
from agent.errors import DecodeError, DeviceProtocolError
from agent.reading import Reading, now_ms
from drivers.pms5003 import codec
from drivers.pms5003.config import Pms5003DeviceConfig
from drivers.serialport.config import SerialSettings
from drivers.serialport.driver import SerialDriver

_REPLY_TIMEOUT = 3.0  # passive answers come within ~100 ms; active frames every 0.2-2.3 s


class Pms5003Driver(SerialDriver[Pms5003DeviceConfig]):
    name = "pms5003"
    default_settings = SerialSettings(9600, 8, "N", 1)

    def points(self) -> dict[str, PointSpec]:
        return {n: PointSpec(n, "uint16", unit) for n, unit in codec.FIELDS}

    async def open(self) -> None:
        await super().open()
        try:
            port = self._open_port()
            # The mode command's answer is not sent by every firmware: do not wait for it.
            await port.write(codec.sleep_command(False))
            await port.write(codec.passive_mode_command(self.config.reporting == "passive"))
        except BaseException:
            await self.close()
            raise

    async def read(self) -> list[Reading]:
        port = self._open_port()
        if self.config.sleep_between_reads:
            await port.write(codec.sleep_command(False))
            await asyncio.sleep(self.config.warmup)
        request = codec.read_command() if self.config.reporting == "passive" else None
        for attempt in range(3):
            frame = await self.exchange(request, self.frame_scan(codec.scan), _REPLY_TIMEOUT, "data frame")
            try:
                values = self.decode(codec.decode, frame, "data frame")
                break
            except DecodeError as exc:
                # Checksum-valid but implausible (warming up, glitch): never published; ask again.
                self.line.add("malformed", problem=str(exc))
                self.publish_line_summary()
                if attempt == 2:
                    raise DeviceProtocolError(f"{self.config.port}: {exc}") from exc
        ts = now_ms()
        if self.config.sleep_between_reads:
            await port.write(codec.sleep_command(True))
        return [Reading(self.device, name, ts, values[name], unit) for name, unit in codec.FIELDS]
