"""Active BLE devices: connect, read (or await one notification of) GATT characteristics, disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.exc import BleakCharacteristicNotFoundError, BleakError

from agent.errors import DeviceUnreachable
from drivers.ble.advert import uuid128_of
from drivers.ble.config import GattCharacteristic

log = logging.getLogger(__name__)

SHARED_KEY = ("ble-gatt",)

# Backoff between connection attempts. On a Raspberry Pi, BlueZ often aborts a
# first LE connection ("le-connection-abort-by-local") and succeeds a moment
# later; past a few attempts the sensor is away and the scheduler's own,
# longer backoff takes over. So: few attempts, short doubling pauses.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 4.0


def full_uuid(uuid: str) -> str:
    u = uuid.lower()
    return uuid128_of(int(u, 16)) if len(u) == 4 else u


class GattConnector:
    """Shared by the GATT devices: one connection at a time, because adapters handle concurrent
    LE connection attempts badly (BlueZ answers "Operation already in progress")."""

    def __init__(
        self,
        backend: type[BaseBleakClient] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.sleep = sleep
        self.connections = 0
        self.failed_attempts = 0
        self._lock = asyncio.Lock()

    async def read(
        self,
        address: str,
        characteristics: dict[str, GattCharacteristic],
        *,
        attempts: int = 3,
        connect_timeout: float = 10.0,
        notify_timeout: float = 10.0,
    ) -> tuple[dict[str, bytes], dict[str, str]]:
        """Raw values by point name, and per-point errors; DeviceUnreachable when no connection is made."""
        async with self._lock:
            client = await self._connect(address, attempts, connect_timeout)
            try:
                values: dict[str, bytes] = {}
                errors: dict[str, str] = {}
                for name, spec in characteristics.items():
                    try:
                        if spec.notify:
                            values[name] = await self._first_notification(client, spec.uuid, notify_timeout)
                        else:
                            values[name] = bytes(await client.read_gatt_char(full_uuid(spec.uuid)))
                    except BleakCharacteristicNotFoundError:
                        errors[name] = f"characteristic {spec.uuid} not found on the device"
                    except TimeoutError:
                        errors[name] = f"no notification from {spec.uuid} within {notify_timeout:g}s"
                    except BleakError as exc:
                        errors[name] = f"reading {spec.uuid} failed: {exc}"
                if not values and errors and not client.is_connected:
                    raise DeviceUnreachable(f"{address}: connection lost while reading characteristics")
                return values, errors
            finally:
                try:
                    await client.disconnect()
                except (BleakError, OSError) as exc:
                    log.debug("disconnect from %s: %s", address, exc)

    async def _connect(self, address: str, attempts: int, connect_timeout: float) -> BleakClient:
        last: BaseException | None = None
        delay = BACKOFF_FIRST
        for attempt in range(1, attempts + 1):
            client = BleakClient(address, timeout=connect_timeout, backend=self.backend)
            try:
                async with asyncio.timeout(connect_timeout):
                    await client.connect()
                self.connections += 1
                return client
            except (BleakError, TimeoutError, OSError) as exc:
                last = exc
                self.failed_attempts += 1
                log.debug("connection %d/%d to %s failed: %s", attempt, attempts, address, exc)
                # Nothing to release after a failed connection, but bleak may hold a half-open one.
                with contextlib.suppress(BleakError, OSError):
                    await client.disconnect()
            if attempt < attempts:
                await self.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        reason = "timed out" if isinstance(last, TimeoutError) else str(last)
        raise DeviceUnreachable(f"{address}: no GATT connection after {attempts} attempts ({reason})")

    @staticmethod
    async def _first_notification(client: BleakClient, uuid: str, wait: float) -> bytes:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_notify(_: BleakGATTCharacteristic, data: bytearray) -> None:
            if not got.done():
                got.set_result(bytes(data))

        target = full_uuid(uuid)
        await client.start_notify(target, on_notify)
        try:
            async with asyncio.timeout(wait):
                return await got
        finally:
            try:
                await client.stop_notify(target)
            except BleakError as exc:
                log.debug("stop_notify %s: %s", uuid, exc)
