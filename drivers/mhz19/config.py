"""Configuration of a Winsen MH-Z19(B) CO2 sensor (no I/O imports)."""

from __future__ import annotations

from typing import Literal

from agent.modelkit import Field
from agent.units import Duration, duration_field
from drivers.serialport.config import SerialDeviceConfig


class Mhz19DeviceConfig(SerialDeviceConfig):
    """An MH-Z19/MH-Z19B on a UART (9600 8N1)."""

    driver: Literal["mhz19"] = "mhz19"
    preheat: Duration = duration_field(
        180.0, "0s", "1h", description="pre-heat time after power-up (datasheet: 3 minutes)"
    )
    during_preheat: Literal["uncertain", "withhold"] = Field(
        "uncertain", description="readings during pre-heat: published with quality uncertain, or not at all"
    )
