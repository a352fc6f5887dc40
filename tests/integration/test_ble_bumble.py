"""End-to-end BLE tests over bumble virtual controllers: the real driver, bleak and our bumble backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("bumble")
pytest.importorskip("bleak")

from bumble.gatt import Characteristic, Service

from agent.driver import DriverContext, SharedResources
from agent.errors import DeviceUnreachable
from agent.pipeline.reading import Reading
from drivers.ble.config import BleDeviceConfig
from drivers.ble.driver import BleDriver
from drivers.ble.gatt import SHARED_KEY as GATT_KEY
from drivers.ble.gatt import GattConnector
from drivers.ble.scan import scan_ble
from drivers.ble.scanner import SHARED_KEY as SCANNER_KEY
from drivers.ble.scanner import BleScanner
from tests.blesim import (
    VirtualRadio,
    ad_manufacturer_data,
    ad_name,
    ad_service_data,
    client_backend,
    scanner_backend,
)

GATEWAY = "F0:F0:F0:F0:F0:F0"
BTHOME = "A4:C1:38:00:00:01"
RUUVI = "C0:11:22:33:44:55"
ENCRYPTED = "54:48:E6:8F:80:A5"  # the address of the encrypted BTHome vector (part of the nonce)
GATT_SENSOR = "C0:00:00:00:00:02"

BTHOME_25_06 = bytes.fromhex("4002CA0903BF13")  # 25.06 °C, 50.55 %
BTHOME_23_97 = bytes.fromhex("400009015D025D0903B718")  # 23.97 °C, 63.27 %, battery 93
RUUVI_VALID = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
ENCRYPTED_ADV = bytes.fromhex("41A47266C95F730011223378237214")
BINDKEY = "231d39c1d7cc1ab1aee224cd096db932"


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    radio = VirtualRadio()
    for address in (GATEWAY, BTHOME, RUUVI, ENCRYPTED, GATT_SENSOR):
        await radio.add(address)
    yield radio
    await radio.aclose()


@pytest.fixture
async def shared(radio: VirtualRadio) -> AsyncIterator[SharedResources]:
    shared = SharedResources()
    # The seam: the shared resources hold the scanner the drivers will find, on the bumble backend.
    shared.get(SCANNER_KEY, lambda: BleScanner(backend=scanner_backend(radio.devices[GATEWAY])))
    yield shared
    await shared.aclose()


def make_driver(name: str, shared: SharedResources, config_dir: Path = Path("."), **fields: Any) -> BleDriver:
    config = BleDeviceConfig.model_validate({"driver": "ble", **fields})
    return BleDriver(name, config, DriverContext(shared=shared, buses={}, config_dir=config_dir))


async def eventually(condition: Callable[[], bool], wait: float) -> None:
    """Poll a condition the radio makes true (counters have no event to await); fail after `wait` seconds."""
    for _ in range(int(wait / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def next_batch(stream: AsyncIterator[list[Reading]], wait: float = 5.0) -> dict[str, Reading]:
    async with asyncio.timeout(wait):
        batch = await anext(stream)
    return {r.point: r for r in batch}


async def test_advertisements_decoded_with_rssi_and_min_interval(
    radio: VirtualRadio, shared: SharedResources
) -> None:
    await radio.advertise(BTHOME, ad_service_data(0xFCD2, BTHOME_25_06) + ad_name("thermo"))
    await radio.advertise(RUUVI, ad_manufacturer_data(0x0499, RUUVI_VALID))
    thermo = make_driver("thermo", shared, address=BTHOME, decoder="bthome", min_interval="200ms")
    tag = make_driver("tag", shared, address=RUUVI.lower(), decoder="ruuvi", min_interval="200ms")
    thermo_stream, tag_stream = thermo.stream(), tag.stream()
    assert thermo_stream is not None and tag_stream is not None
    try:
        first = await next_batch(thermo_stream)
        assert first["temperature"].value == 25.06 and first["temperature"].unit == "°C"
        assert first["humidity"].value == 50.55
        assert first["rssi"].unit == "dBm" and isinstance(first["rssi"].value, int)
        ruuvi = await next_batch(tag_stream)
        assert ruuvi["temperature"].value == 24.3 and ruuvi["pressure"].value == 100044
        # The sensor changes its reading: the next batch carries the latest value.
        await radio.advertise(BTHOME, ad_service_data(0xFCD2, BTHOME_23_97))
        for _ in range(10):
            later = await next_batch(thermo_stream)
            if later["temperature"].value == 23.97:
                break
        assert later["battery"].value == 93
        # Advertisements every 20 ms, batches at most every 200 ms: most advertisements were merged.
        batches = 2 + sum([1 for _ in range(2) if await next_batch(thermo_stream)])
        assert thermo.accepted > batches * 2
        scanner = shared.get(SCANNER_KEY, BleScanner)
        assert scanner.received >= thermo.accepted + tag.accepted
    finally:
        await thermo_stream.aclose()  # type: ignore[attr-defined]
        await tag_stream.aclose()  # type: ignore[attr-defined]
        await thermo.close()
        await tag.close()


async def test_encrypted_bthome_and_replayed_counter(
    radio: VirtualRadio, shared: SharedResources, tmp_path: Path
) -> None:
    (tmp_path / "thermo.key").write_text(BINDKEY + "\n")
    # The encrypted vector re-sent again and again: a replay after the first one.
    await radio.advertise(ENCRYPTED, ad_service_data(0xFCD2, ENCRYPTED_ADV))
    driver = make_driver(
        "secret",
        shared,
        tmp_path,
        address=ENCRYPTED,
        decoder="bthome",
        bindkey_file="thermo.key",
        min_interval="0s",
    )
    stream = driver.stream()
    assert stream is not None
    try:
        batch = await next_batch(stream)
        assert batch["temperature"].value == 25.06 and batch["humidity"].value == 50.55
        await eventually(lambda: driver.decode_errors >= 3, 5)
        assert "replayed" in driver.point_errors["advertisement"]
        assert driver.accepted == 1
        # A plain advertisement from the keyed device is refused too (downgrade).
        await radio.advertise(ENCRYPTED, ad_service_data(0xFCD2, BTHOME_25_06))
        await eventually(lambda: "downgrade" in driver.point_errors.get("advertisement", ""), 5)
        assert driver.accepted == 1
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await driver.close()


async def test_watchdog_restarts_a_silent_scanner(radio: VirtualRadio, shared: SharedResources) -> None:
    await radio.advertise(BTHOME, ad_service_data(0xFCD2, BTHOME_25_06))
    driver = make_driver(
        "thermo", shared, address=BTHOME, decoder="bthome", min_interval="0s", scanner_watchdog="1s"
    )
    stream = driver.stream()
    assert stream is not None
    scanner = shared.get(SCANNER_KEY, BleScanner)
    backend = scanner.backend
    assert backend is not None
    try:
        await next_batch(stream)
        assert scanner.restarts == 0
        await radio.silence(BTHOME)
        await eventually(lambda: scanner.restarts >= 1, 10)
        # The restart is counted before the scanner is stopped and started again: wait for the new start.
        await eventually(lambda: backend.starts >= 2, 10)  # type: ignore[attr-defined]
        await radio.advertise(BTHOME, ad_service_data(0xFCD2, BTHOME_23_97))
        batch = await next_batch(stream)
        assert batch["temperature"].value in (23.97, 25.06)
        assert "restarted" in driver.point_errors["scanner"]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await driver.close()


async def test_scan_lists_and_decodes_advertisers(radio: VirtualRadio) -> None:
    await radio.advertise(BTHOME, ad_service_data(0xFCD2, BTHOME_25_06) + ad_name("thermo"))
    await radio.advertise(RUUVI, ad_manufacturer_data(0x0499, RUUVI_VALID))
    seen: list[dict[str, Any]] = []
    entries = await scan_ble(0.3, seen.append, backend=scanner_backend(radio.devices[GATEWAY]))
    by_address = {e["address"]: e for e in entries}
    assert by_address[BTHOME]["decoder"] == "bthome"
    assert by_address[BTHOME]["name"] == "thermo"
    assert by_address[BTHOME]["values"]["temperature"] == 25.06
    assert by_address[RUUVI]["values"]["humidity"] == 53.49
    assert {e["address"] for e in seen} == set(by_address)


def gatt_service(server: Any) -> Characteristic[bytes]:
    notify_char: Characteristic[bytes] = Characteristic(
        "0000ff01-0000-1000-8000-00805f9b34fb",
        Characteristic.Properties.NOTIFY,
        Characteristic.READABLE,
        b"\x00\x00",
    )
    server.add_service(
        Service(
            "181A",
            [
                Characteristic(
                    "2A6E",
                    Characteristic.Properties.READ,
                    Characteristic.READABLE,
                    (2345).to_bytes(2, "little", signed=True),
                ),
                Characteristic(
                    "2A6F",
                    Characteristic.Properties.READ,
                    Characteristic.READABLE,
                    (5120).to_bytes(2, "little"),
                ),
                Characteristic(
                    "12345678-1234-5678-1234-56789abcdef0",
                    Characteristic.Properties.READ,
                    Characteristic.READABLE,
                    b"fw-1.2\x00",
                ),
                notify_char,
            ],
        )
    )
    return notify_char


async def test_gatt_read_over_a_virtual_link(radio: VirtualRadio) -> None:
    server = radio.devices[GATT_SENSOR]
    notify_char = gatt_service(server)
    await radio.advertise(GATT_SENSOR, ad_name("gatt-sensor"), interval_ms=20)

    pending: set[asyncio.Task[None]] = set()

    def on_subscription(connection: Any, notify_enabled: bool, *_: Any) -> None:
        # The sensor notifies as soon as the gateway subscribes, as notify-only sensors do.
        if notify_enabled:
            task = asyncio.create_task(
                server.notify_subscriber(connection, notify_char, (777).to_bytes(2, "little"))
            )
            pending.add(task)
            task.add_done_callback(pending.discard)

    notify_char.on(notify_char.EVENT_SUBSCRIPTION, on_subscription)
    shared = SharedResources()

    async def no_wait(_: float) -> None:
        return None

    shared.get(GATT_KEY, lambda: GattConnector(client_backend(radio.devices[GATEWAY]), sleep=no_wait))
    driver = make_driver(
        "co2-box",
        shared,
        address=GATT_SENSOR,
        mode="gatt",
        poll="30s",
        timeout="5s",
        characteristics={
            "temperature": {"uuid": "2a6e", "format": "int16le", "scale": 0.01, "unit": "°C"},
            "humidity": {"uuid": "2A6F", "format": "uint16le", "scale": 0.01, "unit": "%"},
            "firmware": {"uuid": "12345678-1234-5678-1234-56789abcdef0", "format": "utf8"},
            "co2": {
                "uuid": "0000ff01-0000-1000-8000-00805f9b34fb",
                "format": "uint16le",
                "unit": "ppm",
                "notify": True,
            },
            "missing": {"uuid": "2a19", "format": "uint8"},
        },
    )
    try:
        assert driver.stream() is None
        readings = {r.point: r for r in await driver.read()}
        assert readings["temperature"].value == 23.45 and readings["temperature"].unit == "°C"
        assert readings["humidity"].value == 51.2
        assert readings["firmware"].value == "fw-1.2"
        assert readings["co2"].value == 777
        assert "missing" not in readings and "not found" in driver.point_errors["missing"]
        assert driver.points()["temperature"].unit == "°C"
        # A second cycle reconnects: the connection was released after the first.
        again = {r.point: r for r in await driver.read()}
        assert again["temperature"].value == 23.45
        connector = shared.get(GATT_KEY, GattConnector)
        assert connector.connections == 2
    finally:
        await asyncio.gather(*pending)
        await shared.aclose()


async def test_gatt_unreachable_after_bounded_attempts(radio: VirtualRadio) -> None:
    shared = SharedResources()
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    shared.get(GATT_KEY, lambda: GattConnector(client_backend(radio.devices[GATEWAY]), sleep=record))
    driver = make_driver(
        "away",
        shared,
        address="C0:00:00:00:00:99",
        mode="gatt",
        connect_attempts=3,
        connect_timeout="300ms",
        characteristics={"temperature": {"uuid": "2a6e", "format": "int16le"}},
    )
    with pytest.raises(DeviceUnreachable, match="no GATT connection after 3 attempts"):
        await driver.read()
    assert pauses == [0.5, 1.0]
    assert shared.get(GATT_KEY, GattConnector).failed_attempts == 3
