"""Configuration of a wired M-Bus meter read by fieldgate as bus master (no I/O imports)."""

from __future__ import annotations

from typing import Literal

from agent.modelkit import Field
from agent.units import Duration, duration_field
from drivers.serialport.config import SerialDeviceConfig


class MbusDeviceConfig(SerialDeviceConfig):
    """One meter (primary address) behind an M-Bus level converter. Meters on one port share it."""

    driver: Literal["mbus"] = "mbus"
    poll: Duration = duration_field(
        900.0, "10ms", "1d", description="time between two readouts (meters are battery-powered: 15m)"
    )
    address: int = Field(ge=0, le=250, description="primary address of the meter (0-250)")
    reset: bool = Field(
        True, description="send SND_NKE before each readout (link reset, most meters need it)"
    )
    reply_timeout: Duration = duration_field(
        1.0, "10ms", "1m", description="how long to wait for the meter's answer (EN 13757-2: 330 bits+50ms)"
    )
    retries: int = Field(2, ge=0, le=5, description="repeats of REQ_UD2 after a missing or bad answer")
    max_telegrams: int = Field(
        4, ge=1, le=16, description="multi-telegram readouts: at most this many frames"
    )
    points: list[str] | None = Field(
        None, description="point names to publish (e.g. [volume, datetime]); default: every decoded record"
    )
