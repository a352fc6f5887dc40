"""Serial line settings shared by the serial protocol drivers' config models (no I/O imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config_base import DeviceConfigBase
from agent.modelkit import Field

Parity = Literal["N", "E", "O"]


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """What termios needs to know of a line: the protocol's defaults, possibly overridden by the config."""

    baudrate: int
    bytesize: int = 8
    parity: Parity = "N"
    stopbits: int = 1

    def describe(self) -> str:
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


class SerialDeviceConfig(DeviceConfigBase):
    """A device that owns a serial port. Unset line settings take the protocol's defaults."""

    port: str = Field(
        description="serial device path; prefer /dev/serial/by-id/... (stable across reboots, re-plugging)",
        min_length=1,
        pattern=r"^[^\x00]+$",
    )
    baudrate: int | None = Field(None, ge=50, le=4_000_000, description="default: the protocol's")
    bytesize: Literal[7, 8] | None = Field(None, description="data bits; default: the protocol's")
    parity: Parity | None = Field(None, description="N, E or O; default: the protocol's")
    stopbits: Literal[1, 2] | None = Field(None, description="default: the protocol's")

    def serial_settings(self, defaults: SerialSettings) -> SerialSettings:
        """The line settings: each field from the config when given, else the protocol default."""
        return SerialSettings(
            baudrate=self.baudrate if self.baudrate is not None else defaults.baudrate,
            bytesize=self.bytesize if self.bytesize is not None else defaults.bytesize,
            parity=self.parity if self.parity is not None else defaults.parity,
            stopbits=self.stopbits if self.stopbits is not None else defaults.stopbits,
        )
