"""Commands and schedules end to end: the real `fieldgate run`, Mosquitto and the Modbus lamp simulator.

The platform side is an aiomqtt client publishing on `{p}/commands`; the
Checker records what the broker delivers on `{p}/commands/result`. The
simulator's request counters prove which commands reached the lamp.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import orjson
import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Checker, Daemon, fieldgate_cli, write_config

pytestmark = pytest.mark.timeout(120)

GATEWAY = "gw-cmd"
TOPIC = f"fieldgate/{GATEWAY}/commands"
ZONE = ZoneInfo("Europe/Paris")
LAMP, DEAD = 1, 2  # Modbus unit ids: a working lamp controller and one that never answers
HOLDING_WRITES = (6, 16)  # dim is a holding register
COIL_WRITES = (5, 15)  # "on" is a coil
SCHEDULE_AHEAD = 12.0  # seconds between the test's start and the schedule's next step


def count(sim: ModbusSim, unit: int, codes: tuple[int, ...]) -> int:
    return sum(sim.count(unit, fc) for fc in codes)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({LAMP: SimUnit(), DEAD: SimUnit(dead=True)})
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def config_for(tmp: Path, broker: Broker, sim: ModbusSim, step_at: datetime) -> Path:
    """Two lamps and a schedule on lamp-1's coil: on since an hour ago, off at `step_at` (local time)."""
    an_hour_ago = (step_at - timedelta(hours=1)).strftime("%H:%M:%S")
    path = write_config(
        tmp / "fieldgate.yaml",
        gateway=GATEWAY,
        broker_port=broker.port,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=f"""  lamp-1: {{bus: lan, unit_id: {LAMP}, profile: streetlamp-controller, poll: 500ms}}
  lamp-2: {{bus: lan, unit_id: {DEAD}, profile: streetlamp-controller, poll: 300ms}}
""",
        extra=f"""commands: {{result_retention: 1h}}
schedules:
  switching:
    device: lamp-1
    point: "on"
    steps:
      - {{at: "{an_hour_ago}", value: true}}
      - {{at: "{step_at.strftime("%H:%M:%S")}", value: false}}
""",
    )
    text = path.read_text()
    located = text.replace(
        "clock: assume_synced}",
        "clock: assume_synced, location: {latitude: 48.8566, longitude: 2.3522, timezone: Europe/Paris}}",
    )
    assert located != text
    path.write_text(located)
    return path


class PlatformView(Checker):
    """The Checker, minus our own `{p}/commands` messages (some of them are deliberately not JSON)."""

    def _record(self, topic: str, payload: bytes) -> None:
        if not topic.endswith("/commands"):
            super()._record(topic, payload)


def results_for(checker: Checker, command_id: str) -> list[dict[str, Any]]:
    return [r for r in checker.data.results if r.get("id") == command_id]


async def send(platform: aiomqtt.Client, payload: bytes | dict[str, Any]) -> None:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await platform.publish(TOPIC, raw, qos=1)


async def ask(platform: aiomqtt.Client, checker: Checker, doc: dict[str, Any]) -> dict[str, Any]:
    """Publish one command and wait for its result on `{p}/commands/result`."""
    before = len(results_for(checker, doc["id"]))
    await send(platform, doc)
    await checker.wait_for(lambda: len(results_for(checker, doc["id"])) > before, what=f"result {doc['id']}")
    return results_for(checker, doc["id"])[-1]


async def wait_subscribed(platform: aiomqtt.Client, checker: Checker, tag: str) -> None:
    """Probe with refused commands until the gateway answers (it subscribes once connected)."""
    for n in range(200):
        probe = {"id": f"probe-{tag}-{n}", "device": "nowhere", "point": "dim", "value": 1}
        await send(platform, probe)
        try:
            await checker.wait_for(lambda p=probe: bool(results_for(checker, p["id"])), timeout=0.3)
            return
        except AssertionError:
            continue
    raise AssertionError("the gateway never answered a command")


def lamp(**fields: Any) -> dict[str, Any]:
    return {"device": "lamp-1", "point": "dim", "value": 40, **fields}


async def test_commands_and_schedule_through_the_daemon(
    tmp_path: Path, sim: ModbusSim, broker: Broker
) -> None:
    step_at = datetime.now(ZONE).replace(microsecond=0) + timedelta(seconds=SCHEDULE_AHEAD)
    cfg = config_for(tmp_path, broker, sim, step_at)
    log = tmp_path / "daemon.log"
    daemon = Daemon(cfg, log).start()
    try:
        async with (
            PlatformView(broker.port, GATEWAY) as checker,
            aiomqtt.Client(broker.host, broker.port, identifier="platform") as platform,
        ):
            await wait_subscribed(platform, checker, "a")
            # At start the schedule applies the step that holds now ("on" since an hour ago).
            await checker.wait_for(lambda: sim.units[LAMP].get("coil", 0) == [True], what="lamp switched on")

            # A dim command: the register changes, the result carries the value read back.
            first = await ask(platform, checker, lamp(id="dim-1", value=40))
            assert first["ok"] is True and first["value"] == 40 and isinstance(first["ts"], int), first
            assert sim.units[LAMP].get("holding", 0) == [40]
            assert count(sim, LAMP, HOLDING_WRITES) == 1

            # Refusals: precise errors, and nothing written.
            refusals = {
                "range": (lamp(value=101), "point 'dim': 101 is above the maximum 100 %"),
                "unknown-point": (lamp(point="dimm"), "unknown point 'dimm' on device 'lamp-1'"),
                "not-writable": (lamp(point="power", value=5), "point 'power' of 'lamp-1' is not writable"),
                "unknown-device": (lamp(device="lamp-9"), "unknown device 'lamp-9'"),
                "expired": (lamp(expires_ts=1), "expired: expires_ts 1 is "),
                "bad-shape": ({"device": "lamp-1", "point": "dim"}, "missing field 'value'"),
                "bad-value": (lamp(value={"level": 3}), "'value' must be a number, a boolean or a string"),
            }
            for name, (doc, error) in refusals.items():
                result = await ask(platform, checker, {"id": f"bad-{name}", **doc})
                assert result["ok"] is False and result["error"].startswith(error), (name, result)
            # Malformed payloads without a usable id: no result (nothing to answer to), a log line.
            ids_before = {r.get("id") for r in checker.data.results}
            for garbage in (b'{"id": "cut-short", "device": ', b"[1, 2]", b'{"device": "lamp-1"}', b"\xff"):
                await send(platform, garbage)
            marker = await ask(platform, checker, lamp(id="after-garbage", value=41))
            assert marker["ok"] is True and marker["value"] == 41
            assert {r.get("id") for r in checker.data.results} == ids_before | {"after-garbage"}
            assert count(sim, LAMP, HOLDING_WRITES) == 2  # dim-1 and the marker, nothing else
            assert sim.units[LAMP].get("holding", 0) == [41]

            # The same id again once done: one write, the same result. (Again while the first still runs:
            # tests/integration/test_commands_at_most_once.py.)
            first_dim2 = await ask(platform, checker, lamp(id="dim-2", value=55))
            again = await ask(platform, checker, lamp(id="dim-2", value=55))
            assert again == first_dim2 and again["value"] == 55
            assert count(sim, LAMP, HOLDING_WRITES) == 3

            # Polling went on through all this.
            polled = len([r for r in checker.data.readings if r["device"] == "lamp-1"])
            await checker.wait_for(
                lambda: len([r for r in checker.data.readings if r["device"] == "lamp-1"]) > polled,
                what="lamp-1 still polled",
            )

            # A failing device: a prompt refusal in words, the lamp not even tried.
            await checker.wait_for(
                lambda: any(
                    r["device"] == "lamp-2" and r["point"] == "_state" and r["value"] == "failing"
                    for r in checker.data.readings
                ),
                what="lamp-2 failing",
            )
            dead = await ask(
                platform, checker, {"id": "dead-1", "device": "lamp-2", "point": "dim", "value": 30}
            )
            assert dead["ok"] is False and dead["error"].startswith("device 'lamp-2' is failing: "), dead
            assert count(sim, DEAD, HOLDING_WRITES + COIL_WRITES) == 0

            # The schedule's next step comes (fixed time, gateway's timezone) and is reported upstream.
            def scheduled_off() -> list[dict[str, Any]]:
                return [
                    r
                    for r in checker.data.results
                    if r.get("source") == "schedule" and r.get("value") is False
                ]

            await checker.wait_for(
                lambda: bool(scheduled_off()), timeout=SCHEDULE_AHEAD + 20, what="step off"
            )
            off = scheduled_off()[0]
            assert off["ok"] is True and off["device"] == "lamp-1" and off["point"] == "on", off
            assert off["schedule"] == "switching" and off["step"] == step_at.strftime("%H:%M:%S")
            assert sim.units[LAMP].get("coil", 0) == [False]
            # The action taken at start (maybe before the upstream was connected) was reported too.
            scheduled = [r["value"] for r in checker.data.results if r.get("source") == "schedule"]
            assert scheduled[:2] == [True, False], scheduled
            assert count(sim, LAMP, COIL_WRITES) == 2  # on at start, off at the step

        # The technician's one-shot write beside the running daemon: same checks, same audit trail.
        by_hand = await fieldgate_cli("write", "lamp-1", "dim", "33", "-c", str(cfg))
        assert by_hand.code == 0 and by_hand.out.strip() == "lamp-1.dim = 33 % (read back)", by_hand.err
        refused = await fieldgate_cli("write", "lamp-1", "dim", "333", "-c", str(cfg))
        assert refused.code == 1 and "above the maximum 100" in refused.err, refused.err
        assert sim.units[LAMP].get("holding", 0) == [33]

        audit = await fieldgate_cli("commands", "-c", str(cfg), "--json", "--limit", "200")
        assert audit.code == 0, audit.err
        entries = json.loads(audit.out)["commands"]
        sources = {e["source"] for e in entries}
        assert {"mqtt", "schedule", "cli"} <= sources, sources
        cli = [(e["outcome"], e["value"], e["result_value"]) for e in entries if e["source"] == "cli"]
        assert cli == [("refused", 333, None), ("executed", 33, 33)], cli
        by_id = {(e["source"], e["outcome"], json.dumps(e["id"])) for e in entries}
        assert ("mqtt", "executed", '"dim-1"') in by_id and ("mqtt", "duplicate", '"dim-2"') in by_id
        assert ("mqtt", "refused", '"bad-range"') in by_id
        assert any(e["source"] == "mqtt" and e["outcome"] == "refused" and e["id"] is None for e in entries)
        schedule = [e for e in entries if e["source"] == "schedule" and e["outcome"] == "executed"]
        assert [e["value"] for e in reversed(schedule)] == [True, False]
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert "command from mqtt ignored: not JSON" in daemon.log_text()

    # Restarted: a repeated id is answered from commands.db, without a write.
    writes_before = count(sim, LAMP, HOLDING_WRITES)
    daemon = Daemon(cfg, log).start()
    try:
        async with (
            PlatformView(broker.port, GATEWAY) as checker,
            aiomqtt.Client(broker.host, broker.port, identifier="platform-2") as platform,
        ):
            await wait_subscribed(platform, checker, "b")
            repeat = await ask(platform, checker, lamp(id="dim-1", value=90))
            assert repeat == first
            assert count(sim, LAMP, HOLDING_WRITES) == writes_before
            assert sim.units[LAMP].get("holding", 0) == [33]
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
