"""Configuration of a Plantower PMS5003 particulate sensor (no I/O imports)."""

from __future__ import annotations

from typing import Literal

from agent.modelkit import Field
from agent.units import Duration, duration_field
from drivers.serialport.config import SerialDeviceConfig


class Pms5003DeviceConfig(SerialDeviceConfig):
    """A PMS5003 (or PMS7003/PMSA003, same protocol) on a 3.3 V UART (9600 8N1)."""

    driver: Literal["pms5003"] = "pms5003"
    poll: Duration = duration_field(60.0, "10ms", "1d", description="time between two measurements")
    reporting: Literal["passive", "active"] = Field(
        "passive", description="passive: the gateway asks for each frame; active: the sensor pushes ~1/s"
    )
    sleep_between_reads: bool = Field(False, description="sleep between reads (fan off, longer sensor life)")
    warmup: Duration = duration_field(
        30.0, "0s", "10m", description="after waking, how long the fan runs before a value is taken"
    )

    def cycle_timeout(self) -> float:
        extra = self.warmup if self.sleep_between_reads else 0.0
        return super().cycle_timeout() + extra
