"""BLE readings reach Mosquitto: the real runtime and BLE driver over bumble virtual controllers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import pytest

pytest.importorskip("bumble")
pytest.importorskip("bleak")

from bleak.exc import BleakDBusError
from bumble.gatt import Characteristic, Service

from agent.config.loader import load_config
from agent.runtime import Runtime
from drivers.ble.driver import BleDriver
from drivers.ble.gatt import SHARED_KEY as GATT_KEY
from drivers.ble.gatt import GattConnector
from drivers.ble.scanner import SHARED_KEY as SCANNER_KEY
from drivers.ble.scanner import BleScanner
from tests.blesim import (
    FailingScannerBackend,
    VirtualRadio,
    ad_manufacturer_data,
    ad_name,
    ad_service_data,
    bthome_encrypt,
    client_backend,
    scanner_backend,
)
from tests.broker import Broker
from tests.daemon import Checker, wait_all_received

GATEWAY = "F0:F0:F0:F0:F0:F0"
BTHOME = "A4:C1:38:00:00:01"
RUUVI = "C0:11:22:33:44:55"
ENCRYPTED = "54:48:E6:8F:80:A5"  # the address of the encrypted BTHome vector (part of the nonce)
GATT_SENSOR = "C0:00:00:00:00:02"
GW = "gw-ble"

BTHOME_25_06 = bytes.fromhex("4002CA0903BF13")  # 25.06 °C, 50.55 %
BTHOME_23_97 = bytes.fromhex("400009015D025D0903B718")  # 23.97 °C, 63.27 %, battery 93
RUUVI_VALID = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
ENCRYPTED_ADV = bytes.fromhex("41A47266C95F730011223378237214")  # counter 0x33221100: 25.06 °C, 50.55 %
BINDKEY = "231d39c1d7cc1ab1aee224cd096db932"
MIN_INTERVAL = 0.5
ADVERT_MS = 20.0


def write_config(tmp_path: Path, broker: Broker) -> Path:
    (tmp_path / "secret.key").write_text(BINDKEY + "\n")
    path = tmp_path / "fieldgate.yaml"
    path.write_text(
        f"""gateway: {{id: {GW}, clock: assume_synced}}
storage: {{path: {tmp_path / "buffer.db"}, max_size: 64MB}}
upstream:
  mqtt:
    url: {broker.url}
    batch_interval: 200ms
    keepalive: 5s
devices:
  thermo:
    driver: ble
    address: "{BTHOME}"
    decoder: bthome
    min_interval: {int(MIN_INTERVAL * 1000)}ms
    scanner_watchdog: 2s
  secret:
    driver: ble
    address: "{ENCRYPTED}"
    decoder: bthome
    bindkey_file: secret.key
    min_interval: 0s
  tag:
    driver: ble
    address: "{RUUVI.lower()}"
    decoder: ruuvi
    min_interval: {int(MIN_INTERVAL * 1000)}ms
  box:
    driver: ble
    address: "{GATT_SENSOR}"
    mode: gatt
    poll: 1s
    timeout: 5s
    connect_attempts: 2
    connect_timeout: 1s
    characteristics:
      temperature: {{uuid: "2a6e", format: int16le, scale: 0.01, unit: "°C"}}
      co2: {{uuid: "0000ff01-0000-1000-8000-00805f9b34fb", format: uint16le, unit: ppm}}
"""
    )
    return path


def serve_gatt(radio: VirtualRadio) -> None:
    radio.devices[GATT_SENSOR].add_service(
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
                    "0000ff01-0000-1000-8000-00805f9b34fb",
                    Characteristic.Properties.READ,
                    Characteristic.READABLE,
                    (612).to_bytes(2, "little"),
                ),
            ],
        )
    )


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    radio = VirtualRadio()
    for address in (GATEWAY, BTHOME, RUUVI, ENCRYPTED, GATT_SENSOR):
        await radio.add(address)
    yield radio
    await radio.aclose()


async def advertise_all(radio: VirtualRadio, thermo_payload: bytes = BTHOME_25_06) -> None:
    await radio.advertise(BTHOME, ad_service_data(0xFCD2, thermo_payload) + ad_name("thermo"), ADVERT_MS)
    await radio.advertise(RUUVI, ad_manufacturer_data(0x0499, RUUVI_VALID), ADVERT_MS)
    await radio.advertise(GATT_SENSOR, ad_name("box"), ADVERT_MS)


def points(checker: Checker, device: str, point: str) -> list[dict[str, Any]]:
    return [r for r in checker.data.readings if r["device"] == device and r["point"] == point]


async def eventually(condition: Callable[[], bool], wait: float, what: str) -> None:
    """Poll a condition the radio makes true (counters have no event to await)."""
    deadline = time.monotonic() + wait
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def runtime(tmp_path: Path, broker: Broker) -> Runtime:
    path = write_config(tmp_path, broker)
    return Runtime(load_config(path), path)


async def test_ble_readings_reach_mosquitto(radio: VirtualRadio, broker: Broker, runtime: Runtime) -> None:
    serve_gatt(radio)
    await advertise_all(radio)
    await radio.advertise(ENCRYPTED, ad_service_data(0xFCD2, ENCRYPTED_ADV), ADVERT_MS)
    # The seam: the runtime's shared resources already hold the scanner and the GATT connector the
    # BLE drivers will find, on bleak backends over the virtual controllers. Everything else is production.
    gateway = radio.devices[GATEWAY]
    scanner = runtime.context.shared.get(SCANNER_KEY, lambda: BleScanner(backend=scanner_backend(gateway)))
    runtime.context.shared.get(GATT_KEY, lambda: GattConnector(client_backend(gateway)))
    async with Checker(broker.port, GW) as checker:
        run = asyncio.create_task(runtime.run())
        try:
            await checker.wait_for(
                lambda: all(
                    points(checker, d, p)
                    for d, p in (
                        ("thermo", "temperature"),
                        ("tag", "pressure"),
                        ("secret", "temperature"),
                        ("box", "co2"),
                    )
                ),
                what="the first readings of the four BLE devices",
            )
            by_point = {r["point"]: r for r in checker.data.readings if r["device"] == "thermo"}
            assert by_point["temperature"]["value"] == 25.06 and by_point["temperature"]["unit"] == "°C"
            assert by_point["humidity"]["value"] == 50.55 and by_point["humidity"]["unit"] == "%"
            assert by_point["rssi"]["unit"] == "dBm" and isinstance(by_point["rssi"]["value"], int)
            tag = {r["point"]: r for r in checker.data.readings if r["device"] == "tag"}
            assert tag["temperature"]["value"] == 24.3 and tag["pressure"]["value"] == 100044
            assert tag["humidity"]["value"] == 53.49 and "rssi" in tag
            secret = {r["point"]: r for r in checker.data.readings if r["device"] == "secret"}
            assert secret["temperature"]["value"] == 25.06 and secret["humidity"]["value"] == 50.55
            box = {r["point"]: r for r in checker.data.readings if r["device"] == "box"}
            assert box["temperature"]["value"] == 23.45 and box["temperature"]["unit"] == "°C"
            assert box["co2"]["value"] == 612 and box["co2"]["unit"] == "ppm"

            # Encryption: the same advertisement re-sent every 20 ms is a replay; a fresh counter is new data.
            drivers = {name: cast(BleDriver, d) for name, d in runtime.drivers.items() if name != "box"}
            await eventually(lambda: drivers["secret"].counters["adverts_rejected"] >= 5, 10, "replays")
            assert len(points(checker, "secret", "temperature")) == 1
            fresh = bthome_encrypt(bytes.fromhex(BINDKEY), ENCRYPTED, BTHOME_23_97[1:], 0x33221101)
            await radio.advertise(ENCRYPTED, ad_service_data(0xFCD2, fresh), ADVERT_MS)
            await checker.wait_for(
                lambda: len(points(checker, "secret", "temperature")) == 2, what="the fresh encrypted advert"
            )
            assert points(checker, "secret", "temperature")[-1]["value"] == 23.97
            assert points(checker, "secret", "battery")[-1]["value"] == 93
            await radio.silence(ENCRYPTED)

            # min_interval: at most one batch per interval, although the sensor advertises every 20 ms. Counted
            # on the readings' own ts (not the test's wall clock): the interval is measured when an advert is
            # handled and ts stamps the advert, so one gap may be short by the jitter of the loop (two advert
            # periods allowed); on average batches are min_interval apart. Catches a min_interval ignored
            # (batches 20 ms apart) or measured per point.
            await checker.wait_for(
                lambda: len(points(checker, "thermo", "temperature")) >= 4, what="four thermo batches"
            )
            ts = [r["ts"] for r in points(checker, "thermo", "temperature")]
            assert all(b - a >= MIN_INTERVAL * 1000 - 2 * ADVERT_MS for a, b in pairwise(ts)), ts
            assert (ts[-1] - ts[0]) / (len(ts) - 1) >= MIN_INTERVAL * 1000 - ADVERT_MS, ts
            batches = len(ts)
            assert drivers["thermo"].counters["adverts_decoded"] > 3 * batches

            # Supervision: silence every advertiser, the scanner is restarted; readings resume afterwards.
            assert scanner.restarts == 0
            for address in (BTHOME, RUUVI, GATT_SENSOR):
                await radio.silence(address)
            await eventually(lambda: scanner.restarts >= 1, 15, "a scanner restart")
            heard_before = len(points(checker, "thermo", "temperature"))
            await advertise_all(radio, BTHOME_23_97)
            await checker.wait_for(
                lambda: any(r["value"] == 23.97 for r in points(checker, "thermo", "temperature")),
                what="thermo readings after the restart",
            )
            assert len(points(checker, "thermo", "temperature")) > heard_before
            await checker.wait_for(
                lambda: runtime.status()["devices"]["thermo"]["counters"].get("scanner_restarts", 0) >= 1,
                what="the restart in /api/status",
            )
            thermo_status = runtime.status()["devices"]["thermo"]
            assert "restarted" in thermo_status["point_errors"]["scanner"]
            assert thermo_status["state"] == "ok"
            assert thermo_status["readings"]["battery"]["value"] == 93
            # Nothing lost: every seq up to the store's own high-water mark reached the platform.
            await wait_all_received(checker, runtime.config.storage.path)
        finally:
            runtime.request_stop()
            await asyncio.wait_for(run, 30)
        report = checker.data.report()
        assert report["first"] == 1 and report["duplicates"] == 0, report


async def test_bluez_missing_is_said_in_words_while_the_rest_runs(
    radio: VirtualRadio, broker: Broker, runtime: Runtime
) -> None:
    serve_gatt(radio)
    await radio.advertise(GATT_SENSOR, ad_name("box"), ADVERT_MS)
    no_bluez = type(
        "NoBlueZ",
        (FailingScannerBackend,),
        {
            "error": BleakDBusError(
                "org.freedesktop.DBus.Error.ServiceUnknown", ["The name org.bluez was not provided"]
            )
        },
    )
    runtime.context.shared.get(SCANNER_KEY, lambda: BleScanner(backend=no_bluez))
    runtime.context.shared.get(GATT_KEY, lambda: GattConnector(client_backend(radio.devices[GATEWAY])))
    async with Checker(broker.port, GW) as checker:
        run = asyncio.create_task(runtime.run())
        try:
            await checker.wait_for(
                lambda: len(points(checker, "box", "co2")) >= 2, what="the GATT device polling on"
            )
            for device in ("thermo", "secret", "tag"):
                await checker.wait_for(
                    lambda d=device: bool(points(checker, d, "_error")),
                    what=f"{device}'s failure event",
                )
                (event,) = points(checker, device, "_error")
                assert event["value"] == "BlueZ (bluetoothd) is not running on D-Bus", event
                status = runtime.status()["devices"][device]
                assert status["state"] == "failing"
                assert status["last_error"] == "BlueZ (bluetoothd) is not running on D-Bus"
            assert runtime.status()["devices"]["box"]["state"] == "ok"
        finally:
            runtime.request_stop()
            await asyncio.wait_for(run, 30)
