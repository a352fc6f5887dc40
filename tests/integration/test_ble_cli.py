"""The technician's BLE verbs: `scan ble` output over bumble, `decode bthome --key --address` on the vectors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("bumble")
pytest.importorskip("bleak")

from agent.verbs.scan import format_ble
from drivers.ble.scan import scan_ble
from tests.blesim import VirtualRadio, ad_manufacturer_data, ad_name, ad_service_data, scanner_backend
from tests.daemon import fieldgate_cli
from tests.vectors import load_vectors

GATEWAY = "F0:F0:F0:F0:F0:F0"
BTHOME = "A4:C1:38:00:00:01"
RUUVI = "C0:11:22:33:44:55"
ENCRYPTED = "54:48:E6:8F:80:A5"
OTHER = "C0:00:00:00:00:02"

BTHOME_VECTORS = {v["id"]: v for v in load_vectors("ble_sensors.json")["bthome_vectors"]}


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    radio = VirtualRadio()
    for address in (GATEWAY, BTHOME, RUUVI, ENCRYPTED, OTHER):
        await radio.add(address)
    yield radio
    await radio.aclose()


async def test_scan_ble_output_lists_and_decodes(radio: VirtualRadio) -> None:
    await radio.advertise(
        BTHOME, ad_service_data(0xFCD2, bytes.fromhex("4002CA0903BF13")) + ad_name("thermo")
    )
    ruuvi = load_vectors("ble_sensors.json")["ruuvi_vectors"][0]
    await radio.advertise(
        RUUVI, ad_manufacturer_data(0x0499, bytes.fromhex(ruuvi["manufacturer_data_payload_hex"]))
    )
    encrypted = BTHOME_VECTORS["bthome-encrypted"]["service_data_hex"]
    await radio.advertise(ENCRYPTED, ad_service_data(0xFCD2, bytes.fromhex(encrypted)))
    await radio.advertise(OTHER, ad_name("box"))
    found = await scan_ble(0.5, backend=scanner_backend(radio.devices[GATEWAY]))
    lines = {line.split()[0]: line for line in format_ble(found).splitlines()}
    assert set(lines) == {BTHOME, RUUVI, ENCRYPTED, OTHER}
    thermo = lines[BTHOME]
    assert "thermo" in thermo and " dBm" in thermo
    assert "bthome: temperature=25.06, humidity=50.55" in thermo
    assert f"temperature={ruuvi['expected']['temperature_c']}" in lines[RUUVI] and "ruuvi:" in lines[RUUVI]
    assert "bthome: encrypted (needs its bindkey)" in lines[ENCRYPTED]
    assert lines[OTHER].split()[-1] == "box"  # heard, named, no decoder recognised it
    # Every address once, strongest first: the RSSI column is in order.
    rssis = [e["rssi"] for e in found]
    assert rssis == sorted(rssis, reverse=True)


def test_scan_ble_output_edge_cases() -> None:
    assert "no BLE advertiser heard" in format_ble([])
    entry: dict[str, Any] = {"address": BTHOME, "name": None, "rssi": None}
    line = format_ble([entry])
    assert line.split() == [BTHOME, "?", "dBm", "-"]


async def test_decode_encrypted_bthome_with_key_and_address() -> None:
    v = BTHOME_VECTORS["bthome-encrypted"]
    args = ("decode", "bthome", v["service_data_hex"], "--key", v["bindkey_hex"])
    res = await fieldgate_cli(*args, "--address", v["ble_address"], "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["temperature"] == v["expected"]["temperature"]
    assert doc["humidity"] == v["expected"]["humidity"]
    assert doc["encryption_counter"] == 0x33221100
    # Without the address there is no nonce: refused in words, not decoded wrongly.
    no_address = await fieldgate_cli(*args)
    assert no_address.code == 1 and "MAC address is needed" in no_address.err
    no_key = await fieldgate_cli("decode", "bthome", v["service_data_hex"])
    assert no_key.code == 1 and "no bindkey" in no_key.err
    text = await fieldgate_cli(*args, "--address", v["ble_address"])
    assert text.code == 0 and any(line.split() == ["temperature", "25.06"] for line in text.out.splitlines())


async def test_decode_encrypted_bthome_with_the_mac_in_the_payload() -> None:
    v = BTHOME_VECTORS["bthome-encrypted-mac-in-payload"]
    res = await fieldgate_cli("decode", "bthome", v["service_data_hex"], "--key", v["bindkey_hex"], "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["temperature"] == v["expected"]["temperature"] and doc["humidity"] == v["expected"]["humidity"]
    assert doc["mac"] == ENCRYPTED


@pytest.mark.parametrize(
    ("vector_id", "address", "reason"),
    [
        ("bthome-wrong-bindkey", "A4:C1:38:8D:18:B2", "MIC check failed"),
        ("bthome-unencrypted-with-bindkey-downgrade", None, "downgrade"),
    ],
)
async def test_decode_bthome_refusals(vector_id: str, address: str | None, reason: str) -> None:
    v = BTHOME_VECTORS[vector_id]
    extra = ["--address", address] if address else []
    res = await fieldgate_cli("decode", "bthome", v["service_data_hex"], "--key", v["bindkey_hex"], *extra)
    assert res.code == 1 and res.out == "" and reason in res.err, res.err
    bad_key = await fieldgate_cli("decode", "bthome", v["service_data_hex"], "--key", "1234")
    assert bad_key.code == 1 and "32 hex digits" in bad_key.err
