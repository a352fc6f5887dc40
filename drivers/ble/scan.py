"""`fieldgate scan ble`: list the advertisers around the gateway, decoded when a decoder recognises them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from agent.errors import DecodeError
from agent.pipeline.reading import Value
from drivers.ble import bthome
from drivers.ble.advert import BTHOME_UUID16, Advertisement
from drivers.ble.driver import decode_advertisement
from drivers.ble.scanner import advertisement_of, explain


def describe(advert: Advertisement) -> dict[str, Any]:
    """One advertiser as `scan` prints it: address, name, rssi, and the decoder and values when known."""
    entry: dict[str, Any] = {"address": advert.address, "name": advert.name, "rssi": advert.rssi}
    bthome_data = advert.service_data.get(BTHOME_UUID16)
    if bthome_data and bthome_data[0] & 0x01:
        # Without its bindkey an encrypted sensor can only be named, not read.
        entry["decoder"] = "bthome"
        entry["encrypted"] = True
        return entry
    for decoder in ("bthome", "ruuvi", "pvvx", "atc"):
        try:
            values = decode_advertisement(decoder, advert, bthome.BTHomeReceiver())
        except DecodeError as exc:
            entry.setdefault("errors", {})[decoder] = str(exc)
            continue
        if values is not None:
            decoded: dict[str, Value] = {name: m.value for name, m in values.items()}
            entry["decoder"] = decoder
            entry["values"] = decoded
            entry.pop("errors", None)
            break
    return entry


async def scan_ble(
    seconds: float,
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    adapter: str = "hci0",
    backend: type[BaseBleakScanner] | None = None,
) -> list[dict[str, Any]]:
    """Scan actively for `seconds`; one entry per address (its latest advertisement), strongest first.

    `progress` is called with each advertiser's entry the first time it is heard.
    Raises DeviceUnreachable (adapter missing, BlueZ not running) in words.
    """
    found: dict[str, Advertisement] = {}

    def on_detection(device: BLEDevice, adv: AdvertisementData) -> None:
        advert = advertisement_of(device, adv)
        previous = found.get(advert.address)
        if previous is not None:
            # Scan responses carry the name, adverts the data: keep both.
            advert.name = advert.name or previous.name
            advert.service_data = {**previous.service_data, **advert.service_data}
            advert.manufacturer_data = {**previous.manufacturer_data, **advert.manufacturer_data}
        found[advert.address] = advert
        if previous is None and progress is not None:
            progress(describe(advert))

    scanner = BleakScanner(on_detection, None, "active", bluez={"adapter": adapter}, backend=backend)
    try:
        await scanner.start()
    except (BleakError, OSError) as exc:
        raise explain(exc, adapter) from exc
    try:
        await asyncio.sleep(seconds)
    finally:
        await scanner.stop()
    entries = [describe(a) for a in found.values()]
    entries.sort(key=lambda e: -(e["rssi"] if e["rssi"] is not None else -999))
    return entries
