"""Two upstreams at once through the real daemon (`fieldgate run`), one of them down for a while.

Variant 1: `upstream.mqtt` (fieldgate JSON, Mosquitto) and an `upstream.extra` NGSI-LD context broker (the
strict local stub of tests/integration/test_upstreams.py, refusing connections while "down"). Variant 2: two
MQTT upstreams on two Mosquitto brokers, the second stopped then restarted. In both, the healthy side keeps
receiving live data during the outage, the other catches up with every reading, and `/api/status` shows each
upstream's `connected` and `pending`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.upstream.formats.ngsild import iso
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Checker, Daemon, write_config
from tests.integration.test_modbus_daemon import wait_api
from tests.integration.test_upstreams import NgsiLdStub

pytestmark = pytest.mark.timeout(120)

GATEWAY = "gw-two"
OUTAGE_S = 3.0


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit()})
    s.units[1].set("holding", 0, [1234, 42])
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def config(tmp: Path, broker: Broker, sim: ModbusSim, api: int, upstreams: str) -> Path:
    return write_config(
        tmp / "fieldgate.yaml",
        gateway=GATEWAY,
        broker_port=broker.port,
        db=tmp / "buffer.db",
        mqtt_extra=f"    health_interval: 1s\n{upstreams}",
        local=f"127.0.0.1:{api}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  meter:
    bus: lan
    unit_id: 1
    poll: 200ms
    points:
      r0: {table: holding, address: 0}
      r1: {table: holding, address: 1}
""",
    )


def live_count(checker: Checker) -> int:
    return sum(1 for b in checker.data.backlog_flags if not b)


def upstream(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = doc["upstreams"][name]
    return found


async def test_mqtt_keeps_live_while_ngsild_is_down_and_ngsild_catches_up(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    api, port = free_port(), free_port()
    stub = NgsiLdStub(port)  # not started: connections to its port are refused
    cfg = config(
        tmp_path,
        broker,
        sim,
        api,
        f"""  extra:
    city:
      ngsi_ld: {{url: "http://127.0.0.1:{port}", batch_max: 50, batch_interval: 100ms, timeout: 2s}}
""",
    )
    async with Checker(broker.port, GATEWAY) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 4, what="first readings")
            down = await wait_api(
                api,
                lambda d: upstream(d, "city")["pending"] >= 10 and upstream(d, "city")["last_error"],
                "the NGSI-LD lane to grow while its broker is down",
            )
            assert upstream(down, "city")["connected"] is False
            assert upstream(down, "city")["format"] == "ngsi-ld"
            assert (
                upstream(down, "mqtt")["connected"] is True
                and upstream(down, "mqtt")["format"] == "fieldgate"
            )
            # the MQTT side keeps receiving live data during the outage
            before = live_count(checker)
            await asyncio.sleep(OUTAGE_S)
            assert live_count(checker) - before >= 5
            assert not checker.data.backlog_once_live(), "the healthy upstream never fell behind"
            outage_readings = {(r["point"], r["ts"]) for r in checker.data.readings}

            await stub.start()  # the context broker is back

            def ngsi_seen() -> set[tuple[str, str]]:
                return {
                    (e["controlledProperty"]["value"], e["numValue"]["observedAt"]) for e in stub.entities
                }

            expected = {(point, iso(ts)) for point, ts in outage_readings}
            await checker.wait_for(
                lambda: expected <= ngsi_seen(), timeout=30, what="the NGSI-LD side to catch up"
            )
            caught_up = await wait_api(
                api,
                lambda d: upstream(d, "city")["connected"] and upstream(d, "city")["pending"] < 20,
                "the NGSI-LD lane to drain",
            )
            assert upstream(caught_up, "city")["last_error"] is None
            assert upstream(caught_up, "city")["sent"] >= len(expected)
        finally:
            code = daemon.stop()
            await stub.aclose()
    assert code == 0, daemon.log_text()[-3000:]
    assert stub.problems == []
    # every reading the MQTT platform saw reached the context broker, with its value, entity per observedAt
    mqtt_values = {(r["point"], iso(r["ts"])): r["value"] for r in checker.data.readings}
    ngsi_values = {(e["controlledProperty"]["value"], e["numValue"]["observedAt"]): e["numValue"]["value"]
                   for e in stub.entities}  # fmt: skip
    # (readings of the last instants before the stop may have reached only one side: they stay in the
    # other's lane for the next start)
    last_mqtt = max(iso(r["ts"]) for r in checker.data.readings)
    assert {k for k in ngsi_values if k[1] <= last_mqtt} <= set(mqtt_values)
    assert {k: mqtt_values[k] for k in expected} == {k: ngsi_values[k] for k in expected}
    assert {e["id"] for e in stub.entities} == {
        f"urn:ngsi-ld:DeviceMeasurement:{GATEWAY}:meter:r0",
        f"urn:ngsi-ld:DeviceMeasurement:{GATEWAY}:meter:r1",
    }
    assert checker.data.report()["lost"] == []


async def test_two_mqtt_brokers_one_stopped_then_restarted(
    tmp_path: Path, broker: Broker, pbroker: Broker, sim: ModbusSim
) -> None:
    api = free_port()
    cfg = config(
        tmp_path,
        broker,
        sim,
        api,
        f"""  extra:
    backup:
      mqtt: {{url: "{pbroker.url}", batch_interval: 200ms, keepalive: 5s}}
""",
    )
    async with Checker(broker.port, GATEWAY) as main, Checker(pbroker.port, GATEWAY) as backup:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await backup.wait_for(lambda: len(backup.data.readings) >= 4, what="first readings on the backup")
            await wait_api(api, lambda d: upstream(d, "backup")["connected"], "the backup upstream up")
            pbroker.stop()
            down = await wait_api(
                api,
                lambda d: not upstream(d, "backup")["connected"] and upstream(d, "backup")["pending"] >= 10,
                "the backup lane to grow while its broker is down",
            )
            assert upstream(down, "mqtt")["connected"] is True
            assert upstream(down, "backup")["last_error"]
            before = live_count(main)
            await asyncio.sleep(OUTAGE_S)
            assert live_count(main) - before >= 5, "the main upstream keeps receiving live"
            snapshot = set(main.data.seqs())

            pbroker.start()
            await backup.wait_for(
                lambda: snapshot <= set(backup.data.seqs()), timeout=30, what="the backup to catch up"
            )
            assert any(backup.data.backlog_flags), "the outage was replayed from the buffer"
            await wait_api(api, lambda d: upstream(d, "backup")["connected"], "the backup upstream back")
        finally:
            code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
    assert backup.data.report()["lost"] == [] and main.data.report()["lost"] == []
    assert not main.data.backlog_once_live(), "the main upstream never went down"
    # the same readings, seq for seq, on both platforms
    by_seq = {r["seq"]: r for r in main.data.readings}
    assert all(by_seq[r["seq"]] == r for r in backup.data.readings if r["seq"] in by_seq)
