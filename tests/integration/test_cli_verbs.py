"""The technician's one-shot verbs as a subprocess: read, write, decode, scan, schema, check (SPEC §1)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import free_port
from tests.daemon import fieldgate_cli, write_config
from tests.vectors import load_vectors

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(), 3: SimUnit(), 4: SimUnit(dead=True)})
    await s.start_tcp("127.0.0.1", 0)
    s.units[1].set("holding", 0, [2301, 40, 7])
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
def cfg(tmp_path: Path, sim: ModbusSim) -> Path:
    return write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-cli",
        broker_port=free_port(),
        db=tmp_path / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  lamp:
    bus: lan
    unit_id: 1
    points:
      voltage: {table: holding, address: 0, scale: 0.1, unit: V}
      dim: {table: holding, address: 1, writable: true, min: 0, max: 100, unit: "%"}
      mode: {table: holding, address: 2}
  ghost:
    bus: lan
    unit_id: 4
    timeout: 300ms
    points:
      r0: {table: holding, address: 0}
""",
    )


async def test_read(cfg: Path) -> None:
    res = await fieldgate_cli("read", "lamp", "-c", str(cfg))
    assert res.code == 0, res.err
    lines = {line.split()[0]: line.split()[1:] for line in res.out.splitlines()}
    assert lines["voltage"] == ["230.1", "V"] and lines["dim"] == ["40", "%"] and lines["mode"] == ["7"]

    some = await fieldgate_cli("read", "lamp", "dim", "-c", str(cfg), "--json")
    assert some.code == 0
    doc = json.loads(some.out)
    assert doc == {"device": "lamp", "ok": True, "values": {"dim": 40}, "units": {"dim": "%"}, "errors": {}}

    full = json.loads((await fieldgate_cli("read", "lamp", "-c", str(cfg), "--json")).out)
    assert full["values"]["voltage"] == pytest.approx(230.1) and full["units"]["voltage"] == "V"


async def test_read_failures(cfg: Path) -> None:
    dead = await fieldgate_cli("read", "ghost", "-c", str(cfg))
    assert dead.code == 1 and "ghost" in dead.err and dead.out == ""
    dead_json = await fieldgate_cli("read", "ghost", "-c", str(cfg), "--json")
    assert dead_json.code == 1 and json.loads(dead_json.out)["ok"] is False
    unknown = await fieldgate_cli("read", "nope", "-c", str(cfg))
    assert unknown.code == 1 and "unknown device 'nope'" in unknown.err


async def test_write_reads_back_and_refusals_write_nothing(cfg: Path, sim: ModbusSim) -> None:
    res = await fieldgate_cli("write", "lamp", "dim", "65", "-c", str(cfg))
    assert res.code == 0, res.err
    assert res.out.strip() == "lamp.dim = 65 % (read back)"
    assert sim.units[1].get("holding", 1) == [65]

    writes = sim.count(1, 6) + sim.count(1, 16)
    for point, value, reason in (
        ("mode", "3", "writable"),
        ("dim", "150", "100"),
        ("voltage", "1", "writable"),
    ):
        refused = await fieldgate_cli("write", "lamp", point, value, "-c", str(cfg))
        assert refused.code == 1, (point, refused.out)
        assert "refused" in refused.err and reason in refused.err, refused.err
    assert sim.units[1].get("holding", 0, 3) == [2301, 65, 7]
    assert sim.count(1, 6) + sim.count(1, 16) == writes  # nothing went on the wire


def _decode_cases() -> list[tuple[str, list[str], str, Any]]:
    """(codec, extra args, hex, (key, expected value)) from the shared vectors, one per codec."""
    tic = load_vectors("linky_tic.json")["frame_vectors"][0]
    aq = load_vectors("air_quality_serial.json")
    sds, pms = aq["sds011_vectors"][0], aq["pms5003_vectors"][0]
    mhz = next(v for v in aq["mhz19_vectors"] if v["id"] == "mhz19-resp-01F4")
    mbus = load_vectors("mbus_water_meters.json")["vectors"][0]
    ble = load_vectors("ble_sensors.json")
    bthome = next(v for v in ble["bthome_vectors"] if v["id"] == "bthome-temp-hum")
    ruuvi = ble["ruuvi_vectors"][0]
    atc = next(v for v in ble["xiaomi_vectors"] if v["expected"]["format"] == "atc1441")
    pvvx = next(v for v in ble["xiaomi_vectors"] if v["expected"]["format"] == "pvvx_custom")
    volume = next(r["value"] for r in mbus["records_expected_libmbus_norm_xml"] if r["quantity"] == "Volume")
    return [
        ("tic", ["--mode", tic["mode"]], tic["frame_hex"], ("ADSC", tic["expected"]["ADSC"])),
        ("sds011", [], sds["input_hex"], ("pm2_5", sds["expected"]["pm2_5_ugm3"])),
        ("pms5003", [], pms["input_hex"], ("pm10", pms["expected"]["pm10_atm"])),
        ("mhz19", [], mhz["input_hex"], ("co2", mhz["expected"]["co2_ppm"])),
        ("mbus", [], mbus["frame_hex"], ("volume", volume)),
        ("bthome", [], bthome["service_data_hex"], ("temperature", bthome["expected"]["temperature"])),
        (
            "ruuvi",
            [],
            ruuvi["manufacturer_data_payload_hex"],
            ("temperature", ruuvi["expected"]["temperature_c"]),
        ),
        ("atc", [], atc["service_data_hex"], ("temperature", atc["expected"]["temperature_c"])),
        ("pvvx", [], pvvx["service_data_hex"], ("humidity", pvvx["expected"]["humidity_pct"])),
    ]


@pytest.mark.parametrize(("codec", "extra", "hex_data", "check"), _decode_cases(), ids=lambda c: str(c)[:12])
async def test_decode_each_codec(codec: str, extra: list[str], hex_data: str, check: tuple[str, Any]) -> None:
    res = await fieldgate_cli("decode", codec, hex_data, *extra, "--json")
    assert res.code == 0, res.err
    key, expected = check
    got = json.loads(res.out)[key]
    assert got == (pytest.approx(expected) if isinstance(expected, float) else expected), (got, expected)
    text = await fieldgate_cli("decode", codec, hex_data, *extra)
    assert text.code == 0 and any(line.split()[0] == key for line in text.out.splitlines())


async def test_decode_rejects_a_bad_frame_with_the_reason() -> None:
    bad = next(
        v for v in load_vectors("air_quality_serial.json")["mhz19_vectors"] if v["id"] == "mhz19-bad-checksum"
    )
    res = await fieldgate_cli("decode", "mhz19", bad["input_hex"])
    assert res.code == 1 and "checksum" in res.err and res.out == ""
    as_json = await fieldgate_cli("decode", "mhz19", bad["input_hex"], "--json")
    assert as_json.code == 1 and "checksum" in json.loads(as_json.out)["error"]
    short = await fieldgate_cli("decode", "sds011", "AAC0D404")
    assert short.code == 1 and short.err.startswith("rejected: ")
    nothex = await fieldgate_cli("decode", "ruuvi", "zz")
    assert nothex.code == 1 and "not hexadecimal" in nothex.err


async def test_scan_modbus_finds_the_units(sim: ModbusSim) -> None:
    res = await fieldgate_cli(
        "scan", "modbus", "--host", f"127.0.0.1:{sim.port}", "--units", "1-5", "--timeout", "300ms", "--json"
    )
    assert res.code == 0, res.err
    found = [hit["unit_id"] for hit in json.loads(res.out)["found"]]
    assert found == [1, 3]  # 4 is dead, 2 and 5 do not exist
    assert {u for u, _ in sim.requests} >= {1, 2, 3, 4, 5}  # each id was really probed


async def test_scan_serial_schema_and_check(cfg: Path, tmp_path: Path) -> None:
    serial = await fieldgate_cli("scan", "serial", "--json")
    assert serial.code == 0
    ports = json.loads(serial.out)["found"]
    assert isinstance(ports, list) and all("device" in p for p in ports)

    schema = await fieldgate_cli("schema")
    assert schema.code == 0
    doc = json.loads(schema.out)
    assert doc["type"] == "object" and {"gateway", "upstream", "devices"} <= set(doc["properties"])

    ok = await fieldgate_cli("check", "-c", str(cfg))
    assert ok.code == 0 and "ok (2 devices, 1 buses)" in ok.out
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("unit_id: 1", "unit_idd: 1"))
    refused = await fieldgate_cli("check", "-c", str(bad))
    assert refused.code == 1
    assert f"{bad}:" in refused.out and "unit_idd" in refused.out and "did you mean" in refused.out
