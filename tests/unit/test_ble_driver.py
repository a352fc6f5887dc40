"""BLE config rules, Bluetooth error wording, and the driver's dispatch and min_interval (no radio)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

pytest.importorskip("bleak")

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakBluetoothNotAvailableReason, BleakDBusError

from agent import registry
from agent.driver import DriverContext, SharedResources
from agent.errors import DeviceError, DeviceUnreachable
from drivers.ble.config import BleDeviceConfig
from drivers.ble.driver import BleDriver
from drivers.ble.scanner import SHARED_KEY, BleScanner, explain


def config(**fields: Any) -> BleDeviceConfig:
    return BleDeviceConfig.model_validate({"driver": "ble", "address": "A4:C1:38:12:34:56", **fields})


def test_registry_entry() -> None:
    assert registry.config_class("ble") is BleDeviceConfig
    assert registry.driver_class("ble") is BleDriver


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs 'decoder'"),
        ({"decoder": "ruuvi", "bindkey_file": "k"}, "bthome only"),
        ({"mode": "gatt"}, "needs 'characteristics'"),
        (
            {"mode": "gatt", "decoder": "bthome", "characteristics": {"t": {"uuid": "2a6e"}}},
            "advertisement only",
        ),
        ({"decoder": "bthome", "address": "A4:C1:38:12:34"}, "pattern"),
        ({"decoder": "bthome", "scanner_watchdog": "500ms"}, "below 1s"),
        ({"mode": "gatt", "characteristics": {"t": {"uuid": "xyz"}}}, "not a 16-bit"),
        ({"decoder": "bthome", "min_interval": "30"}, "not a duration"),
    ],
)
def test_config_rules(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**fields)


def test_config_defaults() -> None:
    c = config(decoder="bthome")
    assert (c.min_interval, c.scanner_watchdog, c.adapter, c.rssi) == (30.0, 300.0, "hci0", True)


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (
            BleakBluetoothNotAvailableError(
                "No Bluetooth adapters found.", BleakBluetoothNotAvailableReason.NO_BLUETOOTH
            ),
            "no Bluetooth adapter (hci0) found",
        ),
        (BleakBluetoothNotAvailableError("off", BleakBluetoothNotAvailableReason.POWERED_OFF), "powered off"),
        (
            BleakBluetoothNotAvailableError("denied", BleakBluetoothNotAvailableReason.DENIED_BY_SYSTEM),
            "D-Bus access to org.bluez",
        ),
        (
            BleakDBusError(
                "org.freedesktop.DBus.Error.ServiceUnknown", ["The name org.bluez was not provided"]
            ),
            "BlueZ (bluetoothd) is not running on D-Bus",
        ),
        (FileNotFoundError(2, "No such file or directory"), "BlueZ (bluetoothd) is not running on D-Bus"),
    ],
)
def test_bluetooth_errors_in_words(exc: BaseException, words: str) -> None:
    assert words in str(explain(exc, "hci0"))


async def test_missing_adapter_makes_the_device_unreachable(tmp_path: Path) -> None:
    from tests.blesim import FailingScannerBackend

    backend = type(
        "NoAdapter",
        (FailingScannerBackend,),
        {
            "error": BleakBluetoothNotAvailableError(
                "No Bluetooth adapters found.", BleakBluetoothNotAvailableReason.NO_BLUETOOTH
            )
        },
    )
    shared = SharedResources()
    shared.get(SHARED_KEY, lambda: BleScanner(backend=backend))
    driver = BleDriver("t", config(decoder="bthome"), DriverContext(shared, {}, tmp_path))
    stream = driver.stream()
    assert stream is not None
    with pytest.raises(DeviceUnreachable, match=r"no Bluetooth adapter \(hci0\) found"):
        await anext(stream)
    await shared.aclose()


async def test_missing_bindkey_file_is_a_device_error(tmp_path: Path) -> None:
    driver = BleDriver(
        "t",
        config(decoder="bthome", bindkey_file="absent.key"),
        DriverContext(SharedResources(), {}, tmp_path),
    )
    with pytest.raises(DeviceError, match=r"absent\.key"):
        await driver.open()
    (tmp_path / "bad.key").write_text("not hex\n")
    driver = BleDriver(
        "t", config(decoder="bthome", bindkey_file="bad.key"), DriverContext(SharedResources(), {}, tmp_path)
    )
    with pytest.raises(DeviceError, match="not hexadecimal"):
        await driver.open()
    os.mkfifo(tmp_path / "fifo.key")  # nobody writes to it: a blocking read would hang the test
    driver = BleDriver(
        "t", config(decoder="bthome", bindkey_file="fifo.key"), DriverContext(SharedResources(), {}, tmp_path)
    )
    with pytest.raises(DeviceError, match="FIFO, not a regular file"):
        await driver.open()


def _adv(service: dict[str, bytes], rssi: int = -70) -> AdvertisementData:
    return AdvertisementData(None, {}, service, [], None, rssi, ())


async def test_dispatch_by_address_and_latest_per_interval(tmp_path: Path) -> None:
    scanner = BleScanner()
    shared = SharedResources()
    shared.get(SHARED_KEY, lambda: scanner)
    driver = BleDriver("t", config(decoder="bthome", min_interval="0s"), DriverContext(shared, {}, tmp_path))
    await driver.open()
    bthome_uuid = "0000fcd2-0000-1000-8000-00805f9b34fb"
    me = BLEDevice("a4:c1:38:12:34:56", None, None)
    other = BLEDevice("A4:C1:38:00:00:00", None, None)
    scanner._on_detection(other, _adv({bthome_uuid: bytes.fromhex("4012E204")}))
    assert driver.accepted == 0 and scanner.received == 1
    scanner._on_detection(me, _adv({bthome_uuid: bytes.fromhex("4012E204")}, rssi=-80))
    scanner._on_detection(me, _adv({bthome_uuid: bytes.fromhex("4012E804")}, rssi=-60))
    scanner._on_detection(me, _adv({bthome_uuid: bytes.fromhex("4002CA")}))  # garbage: counted, skipped
    assert driver.accepted == 2 and driver.decode_errors == 1
    assert "needs 2 bytes" in driver.point_errors["advertisement"]
    batch = {r.point: r for r in await asyncio.wait_for(driver._next_batch(), 1)}
    assert batch["co2"].value == 1256 and batch["rssi"].value == -60  # the latest one
    await driver.close()
    scanner._on_detection(me, _adv({bthome_uuid: bytes.fromhex("4012E204")}))
    assert driver.accepted == 2  # unregistered


async def test_unknown_bthome_object_keeps_the_readings_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An object id this decoder lacks ends decoding there: the objects before it are published,
    the rest counted as `unknown_object`, and the id logged once (it dropped the whole advert before)."""
    scanner = BleScanner()
    shared = SharedResources()
    shared.get(SHARED_KEY, lambda: scanner)
    driver = BleDriver("t", config(decoder="bthome", min_interval="0s"), DriverContext(shared, {}, tmp_path))
    await driver.open()
    bthome_uuid = "0000fcd2-0000-1000-8000-00805f9b34fb"
    me = BLEDevice("a4:c1:38:12:34:56", None, None)
    # co2 1250 ppm, then 0xEE (no such id), then bytes that cannot be located
    for _ in range(3):
        scanner._on_detection(me, _adv({bthome_uuid: bytes.fromhex("4012E204EE0102")}))
    assert driver.accepted == 3 and driver.decode_errors == 0
    assert driver.counters["unknown_object"] == 3
    assert "0xEE at byte 3" in driver.point_errors["unknown_object"]
    assert [r.message for r in caplog.records].count(
        "t: unknown BTHome object id 0xEE at byte 3: 3 byte(s) from there on not decoded (logged once per id)"
    ) == 1
    # An unknown id first: nothing decoded, no reading; the latest readings stay those of before.
    scanner._on_detection(me, _adv({bthome_uuid: bytes.fromhex("40EE0102")}))
    assert driver.accepted == 3 and driver.counters["unknown_object"] == 4
    batch = {r.point: r.value for r in await asyncio.wait_for(driver._next_batch(), 1)}
    assert batch["co2"] == 1250
    await driver.close()


async def test_decoder_bug_is_counted_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in a decoder is a bug: counted, its traceback logged once, the device goes on."""
    from drivers.ble import ruuvi

    def broken(data: bytes) -> Any:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(ruuvi, "decode", broken)
    scanner = BleScanner()
    shared = SharedResources()
    shared.get(SHARED_KEY, lambda: scanner)
    driver = BleDriver("t", config(decoder="ruuvi", min_interval="0s"), DriverContext(shared, {}, tmp_path))
    await driver.open()
    me = BLEDevice("a4:c1:38:12:34:56", None, None)
    adv = AdvertisementData(None, {0x0499: bytes(24)}, {}, [], None, -70, ())
    scanner._on_detection(me, adv)
    scanner._on_detection(me, adv)
    assert driver.counters["codec_bugs"] == 2 and driver.decode_errors == 2
    assert "ZeroDivisionError" in driver.point_errors["advertisement"]
    assert sum(1 for r in caplog.records if r.exc_info) == 1
    await driver.close()


async def test_unreadable_bthome_object_is_counted_and_the_others_published(tmp_path: Path) -> None:
    scanner = BleScanner()
    shared = SharedResources()
    shared.get(SHARED_KEY, lambda: scanner)
    driver = BleDriver("t", config(decoder="bthome", min_interval="0s"), DriverContext(shared, {}, tmp_path))
    await driver.open()
    me = BLEDevice("a4:c1:38:12:34:56", None, None)
    scanner._on_detection(
        me, _adv({"0000fcd2-0000-1000-8000-00805f9b34fb": bytes.fromhex("4002CA095302FFFE")})
    )
    assert driver.accepted == 1 and driver.counters["skipped_objects"] == 1
    assert "not valid UTF-8" in driver.point_errors["skipped_object"]
    batch = {r.point: r.value for r in await asyncio.wait_for(driver._next_batch(), 1)}
    assert batch["temperature"] == 25.06
    await driver.close()
