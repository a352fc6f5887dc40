"""Bleak backends over bumble's virtual controllers, so BLE tests run the real driver without a radio.

Bleak chooses its backend per platform but accepts a custom one
(`BleakScanner(backend=...)`, `BleakClient(backend=...)`): these classes
implement bleak's backend interfaces on top of a bumble `Device` whose
controller sits on a `LocalLink` with the simulated sensors. Everything
from `BleakScanner`/`BleakClient` up (our scanner, decoders, min_interval,
watchdog, GATT reads) is the production code.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError
from bleak.uuids import normalize_uuid_str
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from drivers.ble.advert import parse_ad_structures, uuid128_of


def ad_service_data(uuid16: int, payload: bytes) -> bytes:
    """One AD structure: service data with a 16-bit UUID (type 0x16)."""
    body = bytes([0x16]) + uuid16.to_bytes(2, "little") + payload
    return bytes([len(body)]) + body


def ad_manufacturer_data(company: int, payload: bytes) -> bytes:
    body = bytes([0xFF]) + company.to_bytes(2, "little") + payload
    return bytes([len(body)]) + body


def ad_name(name: str) -> bytes:
    body = bytes([0x09]) + name.encode()
    return bytes([len(body)]) + body


def bthome_encrypt(key: bytes, address: str, objects: bytes, counter: int, info: int = 0x41) -> bytes:
    """BTHome v2 service data encrypted as a sensor does (AES-CCM, 4-byte MIC), for fresh counters in tests.

    Nonce: the MAC (as written), the service UUID little-endian, the device information byte, the counter.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    counter_bytes = counter.to_bytes(4, "little")
    nonce = (
        bytes.fromhex(address.replace(":", ""))
        + (0xFCD2).to_bytes(2, "little")
        + bytes([info])
        + counter_bytes
    )
    sealed = AESCCM(key, tag_length=4).encrypt(nonce, objects, None)
    return bytes([info]) + sealed[:-4] + counter_bytes + sealed[-4:]


class VirtualRadio:
    """A LocalLink with one bumble device per address: advertising or GATT sensors, and the gateway."""

    def __init__(self) -> None:
        self.link = LocalLink()  # type: ignore[no-untyped-call]
        self.devices: dict[str, Device] = {}

    async def add(self, address: str) -> Device:
        controller = Controller(f"ctl-{address}", link=self.link, public_address=address)
        device = Device(address=Address(address), host=Host(controller, AsyncPipeSink(controller)))
        await device.power_on()
        self.devices[address] = device
        return device

    async def advertise(self, address: str, data: bytes, interval_ms: float = 20.0) -> None:
        device = self.devices[address]
        if device.is_advertising:
            await device.stop_advertising()
        # auto_restart: like a real sensor, advertise again once a connection ends.
        await device.start_advertising(
            auto_restart=True,
            advertising_data=data,
            advertising_interval_min=interval_ms,
            advertising_interval_max=interval_ms,
        )

    async def silence(self, address: str) -> None:
        await self.devices[address].stop_advertising()

    async def aclose(self) -> None:
        for device in self.devices.values():
            if device.is_advertising:
                await device.stop_advertising()
            if device.is_scanning:
                await device.stop_scanning()
            for connection in list(device.connections.values()):
                await connection.disconnect()


def bare_address(address: Address) -> str:
    return address.to_string(with_type_qualifier=False).upper()


class BumbleScannerBackend(BaseBleakScanner):
    """A bleak scanner backend on a bumble device; subclass with `device` set (see `scanner_backend`)."""

    device: ClassVar[Device]
    starts: ClassVar[int] = 0

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._active = scanning_mode == "active"
        self._running = False

    async def start(self) -> None:
        type(self).starts += 1
        self.seen_devices = {}
        self.device.on("advertisement", self._on_advertisement)
        await self.device.start_scanning(active=self._active, filter_duplicates=False)
        self._running = True

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self.device.remove_listener("advertisement", self._on_advertisement)
        await self.device.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        service, manufacturer, name = parse_ad_structures(advertisement.data_bytes)
        adv = AdvertisementData(
            local_name=name,
            manufacturer_data=manufacturer,
            service_data={uuid128_of(u): d for u, d in service.items()},
            service_uuids=[],
            tx_power=None,
            rssi=advertisement.rssi,
            platform_data=(advertisement,),
        )
        address = bare_address(advertisement.address)
        device = self.create_or_update_device(address, address, name, advertisement, adv)
        self.call_detection_callbacks(device, adv)


def scanner_backend(device: Device) -> type[BumbleScannerBackend]:
    return type("BumbleScanner", (BumbleScannerBackend,), {"device": device, "starts": 0})


class FailingScannerBackend(BaseBleakScanner):
    """A backend whose start fails as bleak does on a machine without adapter (or BlueZ); set `error`."""

    error: ClassVar[BaseException]

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)

    async def start(self) -> None:
        raise self.error

    async def stop(self) -> None:
        return None


def _bleak_uuid(uuid: Any) -> str:
    hexstr: str = uuid.to_hex_str()
    if len(hexstr) == 32:
        hexstr = f"{hexstr[:8]}-{hexstr[8:12]}-{hexstr[12:16]}-{hexstr[16:20]}-{hexstr[20:]}"
    return normalize_uuid_str(hexstr.lower())


class BumbleClientBackend(BaseBleakClient):
    """A bleak client backend on a bumble device: connect over the LocalLink, discover, read, subscribe."""

    device: ClassVar[Device]
    connect_delay: ClassVar[float] = 0.0

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=kwargs.get("disconnected_callback"),
            timeout=kwargs.get("timeout", 10.0),
        )
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._proxies: dict[int, Any] = {}
        self._subscribers: dict[int, Any] = {}

    @property
    def mtu_size(self) -> int:
        return 23

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if self.connect_delay:
            await asyncio.sleep(self.connect_delay)
        try:
            self._connection = await self.device.connect(Address(self.address), timeout=self._timeout)
        except Exception as exc:
            raise BleakError(f"bumble connection to {self.address} failed: {exc}") from exc
        self._peer = Peer(self._connection)
        await self._peer.discover_services()
        collection = BleakGATTServiceCollection()
        for service in self._peer.services:
            await self._peer.discover_characteristics(service=service)
            bleak_service = BleakGATTService(service, service.handle, _bleak_uuid(service.uuid))
            collection.add_service(bleak_service)
            for ch in service.characteristics:
                props = [n for n, bit in (("read", 0x02), ("notify", 0x10)) if ch.properties & bit]
                collection.add_characteristic(
                    BleakGATTCharacteristic(
                        ch,
                        ch.handle,
                        _bleak_uuid(ch.uuid),
                        props,  # type: ignore[arg-type]  # bleak types the names as Literals
                        lambda: 20,
                        bleak_service,
                    )
                )
                self._proxies[ch.handle] = ch
        self.services = collection

    async def disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    async def unpair(self) -> None:
        raise NotImplementedError

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, **kwargs: Any) -> bytearray:
        assert self._peer is not None
        return bytearray(await self._peer.read_value(self._proxies[characteristic.handle]))

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, **kwargs: Any) -> bytearray:
        raise NotImplementedError

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        raise NotImplementedError

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        raise NotImplementedError

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        assert self._peer is not None
        proxy = self._proxies[characteristic.handle]

        def subscriber(value: bytes) -> None:
            callback(bytearray(value))

        self._subscribers[characteristic.handle] = subscriber
        await self._peer.subscribe(proxy, subscriber)

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        assert self._peer is not None
        subscriber = self._subscribers.pop(characteristic.handle, None)
        if subscriber is not None and self._connection is not None:
            await self._peer.unsubscribe(self._proxies[characteristic.handle], subscriber)


def client_backend(device: Device, connect_delay: float = 0.0) -> type[BumbleClientBackend]:
    return type("BumbleClient", (BumbleClientBackend,), {"device": device, "connect_delay": connect_delay})
