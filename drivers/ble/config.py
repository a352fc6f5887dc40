"""BLE device configuration: advertisement decoders and GATT characteristics (no I/O imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from agent.config_base import DeviceConfigBase, Model
from agent.modelkit import Field, model_validator
from agent.units import Duration, duration_field

Decoder = Literal["bthome", "ruuvi", "pvvx", "atc"]
GattFormat = Literal[
    "uint8",
    "int8",
    "uint16le",
    "int16le",
    "uint16be",
    "int16be",
    "uint24le",
    "int24le",
    "uint32le",
    "int32le",
    "uint32be",
    "int32be",
    "float32le",
    "float32be",
    "utf8",
    "bool",
]
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"


class GattCharacteristic(Model):
    """One GATT characteristic read (or awaited as a notification) as one point."""

    uuid: str = Field(description="characteristic UUID: 16-bit ('2a6e') or 128-bit")
    format: GattFormat = "uint16le"
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    notify: bool = Field(
        False,
        description="subscribe and take the first notification instead of reading (notify-only sensors)",
    )

    @model_validator(mode="after")
    def _rules(self) -> GattCharacteristic:
        u = self.uuid.lower()
        hexdigits = u.replace("-", "")
        if not (
            (len(u) == 4 and all(c in "0123456789abcdef" for c in u))
            or (len(u) == 36 and len(hexdigits) == 32 and all(c in "0123456789abcdef" for c in hexdigits))
        ):
            raise ValueError(f"'{self.uuid}' is not a 16-bit ('2a6e') or 128-bit characteristic UUID")
        if self.format in ("utf8", "bool") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset do not apply to format {self.format}")
        return self


class BleDeviceConfig(DeviceConfigBase):
    """A BLE sensor: decoded from its advertisements (default) or polled over GATT (`mode: gatt`)."""

    driver: Literal["ble"]
    address: str = Field(pattern=MAC_PATTERN, description="the sensor's MAC address, e.g. A4:C1:38:12:34:56")
    mode: Literal["advertisement", "gatt"] = "advertisement"
    decoder: Decoder | None = Field(None, description="advertisement format: bthome | ruuvi | pvvx | atc")
    bindkey_file: Path | None = Field(None, description="file holding the 32-hex-digit BTHome bindkey")
    min_interval: Duration = duration_field(
        30.0,
        "0s",
        "1d",
        description="at most one batch per interval: the latest advertisement of each interval is kept",
    )
    rssi: bool = Field(True, description="add an `rssi` point (dBm) to each batch")
    scanner_watchdog: Duration = duration_field(
        300.0,
        "0s",
        "1d",
        description="restart the shared scanner when no advertisement at all arrived for this long",
    )
    adapter: str = Field("hci0", pattern=r"^hci\d+$")
    scanning_mode: Literal["passive", "active"] = Field(
        "passive",
        description="passive needs BlueZ >= 5.56 with advertisement monitors; active works everywhere",
    )
    characteristics: dict[str, GattCharacteristic] = Field(
        default_factory=dict, description="mode gatt: point name -> characteristic"
    )
    connect_attempts: int = Field(3, ge=1, le=10, description="mode gatt: connection attempts per read")
    connect_timeout: Duration = duration_field(
        10.0, "100ms", "5m", description="mode gatt: bound on one connection attempt"
    )

    @model_validator(mode="after")
    def _rules(self) -> BleDeviceConfig:
        if self.mode == "advertisement":
            if self.decoder is None:
                raise ValueError("an advertisement device needs 'decoder' (bthome, ruuvi, pvvx or atc)")
            if self.characteristics:
                raise ValueError("'characteristics' apply to mode gatt only")
            if self.bindkey_file is not None and self.decoder != "bthome":
                raise ValueError("'bindkey_file' applies to decoder bthome only")
        else:
            if not self.characteristics:
                raise ValueError("mode gatt needs 'characteristics' (point name -> uuid, format...)")
            if self.decoder is not None or self.bindkey_file is not None:
                raise ValueError("'decoder' and 'bindkey_file' apply to mode advertisement only")
        if self.min_interval < 0:
            raise ValueError("min_interval cannot be negative")
        if self.scanner_watchdog != 0 and self.scanner_watchdog < 1:
            raise ValueError("scanner_watchdog below 1s would restart a healthy scanner; use 0 to disable")
        return self
