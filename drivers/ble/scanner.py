"""The one shared BLE scanner: bleak scanning, dispatch by address, supervision (watchdog restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from bleak import BleakScanner
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakDBusError,
    BleakError,
)

from agent.aio import settled
from agent.errors import DeviceUnreachable
from drivers.ble.advert import (
    BTHOME_UUID16,
    ENVIRONMENTAL_SENSING_UUID16,
    RUUVI_COMPANY_ID,
    Advertisement,
    normalize_address,
    uuid16_of,
)

log = logging.getLogger(__name__)

SHARED_KEY = ("ble-scanner",)
DEFAULT_WATCHDOG = 300.0

AdvertCallback = Callable[[Advertisement], None]
FailureCallback = Callable[[DeviceUnreachable], None]

# Passive scanning on BlueZ goes through advertisement monitors, which need at
# least one pattern: these match every payload our decoders understand.
PASSIVE_PATTERNS: list[tuple[int, AdvertisementDataType, bytes]] = [
    (0, AdvertisementDataType.SERVICE_DATA_UUID16, BTHOME_UUID16.to_bytes(2, "little")),
    (0, AdvertisementDataType.SERVICE_DATA_UUID16, ENVIRONMENTAL_SENSING_UUID16.to_bytes(2, "little")),
    (0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, RUUVI_COMPANY_ID.to_bytes(2, "little")),
]


def explain(exc: BaseException, adapter: str) -> DeviceUnreachable:
    """Bleak/D-Bus failures in the words a technician needs: which part of the Bluetooth stack is missing."""
    if isinstance(exc, DeviceUnreachable):
        return exc
    if isinstance(exc, BleakBluetoothNotAvailableError):
        reason = exc.reason
        if reason in (
            BleakBluetoothNotAvailableReason.NO_BLUETOOTH,
            BleakBluetoothNotAvailableReason.NO_BLE_CENTRAL_ROLE,
        ):
            return DeviceUnreachable(f"no Bluetooth adapter ({adapter}) found")
        if reason == BleakBluetoothNotAvailableReason.POWERED_OFF:
            return DeviceUnreachable(f"Bluetooth adapter ({adapter}) is powered off (bluetoothctl power on)")
        return DeviceUnreachable(
            "access to BlueZ denied on D-Bus: the service needs D-Bus access to org.bluez (see docs/BLE.md)"
        )
    if isinstance(exc, BleakDBusError) and exc.dbus_error in (
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    ):
        return DeviceUnreachable("BlueZ (bluetoothd) is not running on D-Bus")
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return DeviceUnreachable(f"BlueZ (bluetoothd) is not running on D-Bus (no system bus: {exc})")
    if isinstance(exc, BleakError) and "not found" in str(exc) and adapter in str(exc):
        return DeviceUnreachable(f"no Bluetooth adapter ({adapter}) found")
    return DeviceUnreachable(f"Bluetooth scanner failed on {adapter}: {exc}")


def advertisement_of(device: BLEDevice, adv: AdvertisementData) -> Advertisement:
    """Our view of a bleak advertisement: 16-bit service data keys, upper-case address."""
    service: dict[int, bytes] = {}
    for uuid, data in adv.service_data.items():
        uuid16 = uuid16_of(uuid)
        if uuid16 is not None:
            service[uuid16] = bytes(data)
    return Advertisement(
        address=normalize_address(device.address),
        rssi=adv.rssi,
        name=adv.local_name or device.name,
        service_data=service,
        manufacturer_data={k: bytes(v) for k, v in adv.manufacturer_data.items()},
    )


class BleScanner:
    """One bleak scanner for every BLE device of the gateway, restarted when the radio falls silent.

    Devices `register` an address with a callback; `ensure_running()` starts
    scanning (raising DeviceUnreachable with the reason when it cannot).
    The watchdog restarts the scanner when no advertisement at all arrived
    for `watchdog` seconds while devices are registered: BlueZ scans are
    known to stop silently after hours or days.
    """

    def __init__(
        self,
        *,
        adapter: str = "hci0",
        scanning_mode: str = "passive",
        backend: type[BaseBleakScanner] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.adapter = adapter
        self.scanning_mode = scanning_mode
        self.backend = backend
        self.clock = clock
        self.restarts = 0  # watchdog restarts since the gateway started
        self.received = 0  # advertisements received, all senders
        self.last_error: str | None = None
        self._subscribers: dict[str, dict[object, tuple[AdvertCallback, FailureCallback, float]]] = {}
        self._bleak: BleakScanner | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._last_advert = clock()

    # -- registration ---------------------------------------------------------------------------------

    def register(
        self,
        address: str,
        on_advert: AdvertCallback,
        on_failure: FailureCallback,
        watchdog: float = DEFAULT_WATCHDOG,
    ) -> Callable[[], None]:
        """Receive the advertisements of `address`; returns the function that unregisters."""
        key = normalize_address(address)
        token = object()
        self._subscribers.setdefault(key, {})[token] = (on_advert, on_failure, watchdog)

        def unregister() -> None:
            subs = self._subscribers.get(key)
            if subs is not None:
                subs.pop(token, None)
                if not subs:
                    del self._subscribers[key]

        return unregister

    @property
    def watchdog(self) -> float:
        """The shortest watchdog asked by a registered device (0 = disabled)."""
        values = [w for subs in self._subscribers.values() for (_, _, w) in subs.values() if w > 0]
        return min(values) if values else 0.0

    @property
    def running(self) -> bool:
        return self._supervisor is not None and not self._supervisor.done()

    # -- life cycle -----------------------------------------------------------------------------------

    async def ensure_running(self) -> None:
        async with self._lock:
            if self.running:
                return
            await self._start()
            self._supervisor = asyncio.create_task(self._supervise(), name="ble-scanner-watchdog")

    async def _start(self) -> None:
        kwargs: dict[str, Any] = {"bluez": {"adapter": self.adapter}}
        if self.scanning_mode == "passive":
            kwargs["bluez"]["or_patterns"] = PASSIVE_PATTERNS
        scanner = BleakScanner(
            self._on_detection,
            None,
            "passive" if self.scanning_mode == "passive" else "active",
            backend=self.backend,
            **kwargs,
        )
        try:
            await scanner.start()
        except (BleakError, OSError) as exc:
            err = explain(exc, self.adapter)
            self.last_error = str(err)
            raise err from exc
        self._bleak = scanner
        self._last_advert = self.clock()
        self.last_error = None
        log.info("BLE scanner started on %s (%s)", self.adapter, self.scanning_mode)

    async def _stop(self) -> None:
        scanner, self._bleak = self._bleak, None
        if scanner is not None:
            try:
                await scanner.stop()
            except (BleakError, OSError) as exc:
                # A scanner that died under us cannot be stopped cleanly; the restart goes on.
                log.warning("BLE scanner did not stop cleanly: %s", exc)

    async def _supervise(self) -> None:
        while True:
            watchdog = self.watchdog
            await asyncio.sleep(max(watchdog / 5, 0.05) if watchdog else 1.0)
            watchdog = self.watchdog
            if not watchdog or not self._subscribers:
                continue
            silent = self.clock() - self._last_advert
            if silent < watchdog:
                continue
            self.restarts += 1
            log.warning(
                "no BLE advertisement for %.0fs: restarting the scanner (restart #%d)", silent, self.restarts
            )
            async with self._lock:
                await self._stop()
                try:
                    await settled(self._start())
                except DeviceUnreachable as err:
                    self._fail(err)
                    return

    def _fail(self, err: DeviceUnreachable) -> None:
        for subs in list(self._subscribers.values()):
            for _, on_failure, _ in list(subs.values()):
                on_failure(err)

    async def aclose(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop()

    # -- dispatch -------------------------------------------------------------------------------------

    def _on_detection(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self._last_advert = self.clock()
        self.received += 1
        subs = self._subscribers.get(normalize_address(device.address))
        if not subs:
            return
        advert = advertisement_of(device, adv)
        for on_advert, _, _ in list(subs.values()):
            on_advert(advert)
