"""The BLE driver: advertisement devices fed by the shared scanner, GATT devices polled by connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from agent.driver import Driver, DriverContext, PointSpec
from agent.errors import DecodeError, DeviceError, DeviceUnreachable
from agent.pipeline.reading import Reading, now_ms
from agent.safefiles import read_regular
from drivers.ble import bthome, ruuvi, xiaomi
from drivers.ble.advert import (
    BTHOME_UUID16,
    ENVIRONMENTAL_SENSING_UUID16,
    RUUVI_COMPANY_ID,
    Advertisement,
    Measurement,
    Measurements,
)
from drivers.ble.characteristic import decode_value
from drivers.ble.config import BleDeviceConfig
from drivers.ble.gatt import SHARED_KEY as GATT_KEY
from drivers.ble.gatt import GattConnector
from drivers.ble.scanner import SHARED_KEY as SCANNER_KEY
from drivers.ble.scanner import BleScanner

log = logging.getLogger(__name__)

# How long `fieldgate read` waits for an advertisement when the device sets no timeout:
# battery sensors commonly advertise every 10 to 60 seconds.
DEFAULT_ONE_SHOT_WAIT = 60.0


def decode_advertisement(
    decoder: str,
    advert: Advertisement,
    receiver: bthome.BTHomeReceiver | None = None,
    unknown: Callable[[bthome.UnknownObject | str], None] | None = None,
) -> Measurements | None:
    """The measurements of an advertisement for `decoder`, or None when it carries no such payload.

    `unknown` is told of a BTHome object id the decoder does not know (the objects before it are kept),
    and of each object located but unreadable (a string: why; the other objects are kept).
    """
    if decoder == "bthome":
        data = advert.service_data.get(BTHOME_UUID16)
        if data is None:
            return None
        packet = (receiver or bthome.BTHomeReceiver()).receive(data, advert.address)
        if unknown is not None:
            if packet.unknown is not None:
                unknown(packet.unknown)
            for reason in packet.skipped:
                unknown(reason)
        return packet.values
    if decoder == "ruuvi":
        data = advert.manufacturer_data.get(RUUVI_COMPANY_ID)
        # Ruuvi tags also send other formats (e.g. data format 3 on old firmware) under the same id.
        return None if data is None else ruuvi.decode(data)
    data = advert.service_data.get(ENVIRONMENTAL_SENSING_UUID16)
    if data is None:
        return None
    # A pvvx firmware may alternate its own, ATC1441 and BTHome formats: take only the configured one.
    if decoder == "atc":
        return xiaomi.decode_atc(data) if len(data) == xiaomi.ATC1441_LENGTH else None
    return xiaomi.decode_pvvx(data) if len(data) == xiaomi.PVVX_LENGTH else None


class BleDriver(Driver[BleDeviceConfig]):
    """One BLE sensor. Advertisement devices are push devices (`stream()`); GATT devices are polled."""

    name = "ble"

    def __init__(
        self,
        device: str,
        config: BleDeviceConfig,
        context: DriverContext,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device, config, context)
        self.clock = clock
        self.decode_errors = 0  # advertisements of this device rejected by its decoder
        self.accepted = 0  # advertisements decoded
        self.unknown_objects = 0  # BTHome adverts cut short by an object id the decoder does not know
        self._unknown_ids: set[int] = set()  # each logged once
        self.skipped_objects = 0  # BTHome objects located but unreadable (e.g. text not UTF-8), left out
        self.codec_bugs = 0  # unexpected exceptions in a decoder (a bug: logged with traceback once)
        self._receiver: bthome.BTHomeReceiver | None = None
        self._scanner: BleScanner | None = None
        self._unregister: Callable[[], None] | None = None
        self._latest: list[Reading] | None = None
        self._wake = asyncio.Event()
        self._failure: DeviceUnreachable | None = None

    @property
    def counters(self) -> dict[str, int]:
        """Health counters (the scheduler copies them into /api/status): what the radio brought this device."""
        if self.config.mode == "gatt":
            return {}
        out = {
            "adverts_decoded": self.accepted,
            "adverts_rejected": self.decode_errors,
            "unknown_object": self.unknown_objects,
            "skipped_objects": self.skipped_objects,
            "codec_bugs": self.codec_bugs,
        }
        scanner = self._scanner
        if scanner is not None:
            # Shared by every advertisement device: the scanner's own figures, repeated on each.
            out["scanner_restarts"] = scanner.restarts
            out["scanner_adverts"] = scanner.received
        return out

    # -- life cycle -----------------------------------------------------------------------------------

    async def open(self) -> None:
        if self.config.mode == "gatt":
            return
        if self._receiver is None and self.config.decoder == "bthome":
            self._receiver = bthome.BTHomeReceiver(self._load_bindkey())
        if self._unregister is None:
            scanner = self.context.shared.get(
                SCANNER_KEY,
                lambda: BleScanner(adapter=self.config.adapter, scanning_mode=self.config.scanning_mode),
            )
            if scanner.adapter != self.config.adapter:
                raise DeviceError(
                    f"all BLE devices share one scanner on {scanner.adapter}; this device asks for "
                    f"{self.config.adapter}"
                )
            self._scanner = scanner
            self._unregister = scanner.register(
                self.config.address, self._on_advert, self._on_failure, self.config.scanner_watchdog
            )
        self._failure = None

    async def close(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None

    def _load_bindkey(self) -> bytes | None:
        path = self.config.bindkey_file
        if path is None:
            return None
        if not path.is_absolute():
            path = Path(self.context.config_dir) / path
        try:
            text = read_regular(path, 64 << 10).decode("utf-8", "replace")  # never a FIFO or /dev/zero
        except OSError as exc:
            raise DeviceError(f"bindkey_file {path}: {exc.strerror or exc}") from None
        try:
            return bthome.parse_key(text)
        except DecodeError as exc:
            # The message names the problem, never the key itself.
            raise DeviceError(f"bindkey_file {path}: {exc}") from None

    # -- advertisements -------------------------------------------------------------------------------

    def _on_advert(self, advert: Advertisement) -> None:
        assert self.config.decoder is not None
        try:
            values = decode_advertisement(self.config.decoder, advert, self._receiver, self._on_unknown)
        except DecodeError as exc:
            self.decode_errors += 1
            self.point_errors["advertisement"] = str(exc)
            log.debug("%s: advertisement rejected: %s", self.device, exc)
            return
        except Exception as exc:  # a decoder bug: counted and reported, never the end of the device
            self.codec_bugs += 1
            self.decode_errors += 1
            self.point_errors["advertisement"] = f"decoder bug: {type(exc).__name__}: {exc}"
            if self.codec_bugs == 1:
                log.exception(
                    "%s: the %s decoder failed on an advertisement (a bug)", self.device, self.config.decoder
                )
            return
        if values is None:
            return
        self.point_errors.pop("advertisement", None)
        if not values:
            return  # nothing decoded (e.g. an unknown object id first): the last readings stay the latest
        self.accepted += 1
        self._latest = self._readings(values, advert.rssi)
        self._wake.set()

    def _on_unknown(self, unknown: bthome.UnknownObject | str) -> None:
        if isinstance(unknown, str):
            self.skipped_objects += 1
            self.point_errors["skipped_object"] = unknown
            return
        self.unknown_objects += 1
        self.point_errors["unknown_object"] = str(unknown)
        if unknown.object_id not in self._unknown_ids:
            self._unknown_ids.add(unknown.object_id)
            log.warning("%s: %s (logged once per id)", self.device, unknown)

    def _on_failure(self, err: DeviceUnreachable) -> None:
        self._failure = err
        self._wake.set()

    def _readings(self, values: Measurements, rssi: int | None) -> list[Reading]:
        ts = now_ms()
        items = dict(values)
        if self.config.rssi and rssi is not None:
            items["rssi"] = Measurement(rssi, "dBm")
        return [Reading(self.device, name, ts, m.value, m.unit) for name, m in items.items()]

    def _scanner_health(self) -> None:
        scanner = self._scanner
        if scanner is not None and scanner.restarts:
            self.point_errors["scanner"] = (
                f"scanner restarted {scanner.restarts} time(s) after {self.config.scanner_watchdog:g}s "
                "without any advertisement"
            )

    async def _next_batch(self) -> list[Reading]:
        while True:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if self._latest is not None:
                batch, self._latest = self._latest, None
                self._wake.clear()
                return batch
            self._wake.clear()
            await self._wake.wait()

    async def _stream(self) -> AsyncIterator[list[Reading]]:
        await self.open()
        assert self._scanner is not None
        await self._scanner.ensure_running()
        last_emit: float | None = None
        while True:
            batch = await self._next_batch()
            if last_emit is not None:
                wait = self.config.min_interval - (self.clock() - last_emit)
                if wait > 0:
                    # Keep collecting during the interval: the latest advertisement wins.
                    self._latest = batch
                    await asyncio.sleep(wait)
                    batch = await self._next_batch()
            last_emit = self.clock()
            self._scanner_health()
            yield batch

    def stream(self) -> AsyncIterator[list[Reading]] | None:
        if self.config.mode == "gatt":
            return None
        return self._stream()

    # -- polled reads ---------------------------------------------------------------------------------

    async def read(self) -> list[Reading]:
        if self.config.mode == "gatt":
            return await self._read_gatt()
        # One-shot (`fieldgate read`): the next advertisement of the device.
        await self.open()
        assert self._scanner is not None
        await self._scanner.ensure_running()
        wait = self.config.timeout if self.config.timeout is not None else DEFAULT_ONE_SHOT_WAIT
        try:
            async with asyncio.timeout(wait):
                return await self._next_batch()
        except TimeoutError:
            raise DeviceUnreachable(
                f"no {self.config.decoder} advertisement from {self.config.address} within {wait:g}s"
            ) from None

    async def _read_gatt(self) -> list[Reading]:
        connector = self.context.shared.get(GATT_KEY, GattConnector)
        raw, errors = await connector.read(
            self.config.address,
            self.config.characteristics,
            attempts=self.config.connect_attempts,
            connect_timeout=self.config.connect_timeout,
            notify_timeout=self.config.cycle_timeout(),
        )
        self.point_errors = dict(errors)
        ts = now_ms()
        readings: list[Reading] = []
        for name, data in raw.items():
            spec = self.config.characteristics[name]
            try:
                value = decode_value(spec.format, data, spec.scale, spec.offset)
            except DecodeError as exc:
                self.point_errors[name] = str(exc)
                continue
            except Exception as exc:  # a decoder bug: this characteristic only, counted and logged once
                self.codec_bugs += 1
                self.point_errors[name] = f"decoder bug: {type(exc).__name__}: {exc}"
                if self.codec_bugs == 1:
                    log.exception("%s: decoding characteristic %s failed (a bug)", self.device, name)
                continue
            readings.append(Reading(self.device, name, ts, value, spec.unit))
        if not readings and self.point_errors:
            raise DeviceUnreachable("; ".join(f"{k}: {v}" for k, v in self.point_errors.items()))
        return readings

    def points(self) -> dict[str, PointSpec]:
        if self.config.mode != "gatt":
            return {}

        def point_type(fmt: str, scaled: bool) -> str:
            if fmt in ("utf8", "bool"):
                return "string" if fmt == "utf8" else "bool"
            return "float64" if scaled else fmt.removesuffix("le").removesuffix("be")

        return {
            name: PointSpec(name, point_type(spec.format, spec.scale != 1.0 or spec.offset != 0.0), spec.unit)
            for name, spec in self.config.characteristics.items()
        }
