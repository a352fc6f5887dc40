"""Configuration of a Nova SDS011 particulate sensor (no I/O imports)."""

from __future__ import annotations

from typing import Literal

from agent.modelkit import Field
from agent.units import Duration, duration_field
from drivers.serialport.config import SerialDeviceConfig


class Sds011DeviceConfig(SerialDeviceConfig):
    """An SDS011 on a USB-serial adapter (9600 8N1)."""

    driver: Literal["sds011"] = "sds011"
    poll: Duration = duration_field(
        300.0, "10ms", "1d", description="time between two measurements (default 5m saves the laser)"
    )
    reporting: Literal["query", "active"] = Field(
        "query", description="query: the gateway asks for each value; active: the sensor sends every second"
    )
    sleep_between_reads: bool = Field(
        True, description="put the sensor to sleep between reads (laser and fan last ~8000 h of work)"
    )
    warmup: Duration = duration_field(
        30.0, "0s", "10m", description="after waking, how long the fan runs before a value is taken"
    )
    device_id: str | None = Field(
        None, pattern=r"^[0-9A-Fa-f]{4}$", description="4 hex digits (ID1 ID2); default: any sensor (FFFF)"
    )

    def cycle_timeout(self) -> float:
        # The warm-up happens inside the read cycle, so the cycle may take that much longer.
        extra = self.warmup if self.sleep_between_reads else 0.0
        return super().cycle_timeout() + extra
