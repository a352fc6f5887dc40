"""Configuration of a Linky TIC device (no I/O imports)."""

from __future__ import annotations

from typing import Literal

from agent.modelkit import Field
from agent.units import Duration, duration_field
from drivers.serialport.config import SerialDeviceConfig


class TicDeviceConfig(SerialDeviceConfig):
    """A Linky (or older electronic) meter's customer output on a TIC-to-USB adapter."""

    driver: Literal["linky-tic"] = "linky-tic"
    mode: Literal["historic", "standard", "auto"] = Field(
        "historic",
        description="historic (1200 7E1, Linky default) | standard (9600 7E1) | auto (try 9600 then 1200)",
    )
    min_interval: Duration = duration_field(
        10.0,
        "0s",
        "1d",
        description="at most one reading per label per interval (the meter sends a frame every 1-2 s)",
    )
    labels: list[str] | Literal["all"] | None = Field(
        None,
        description="TIC labels to publish (e.g. [BASE, PAPP]); default: indexes, power, currents, "
        "voltages and the meter address; 'all' for every label",
    )
    silence_timeout: Duration = duration_field(
        30.0, "1s", "1h", description="no valid frame for this long => the device is reported unreachable"
    )
    detect_timeout: Duration = duration_field(
        5.0, "1s", "5m", description="mode auto: how long to listen at each speed"
    )
