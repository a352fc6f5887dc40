"""At most one write per command id, through the real `fieldgate run`: a lost MQTT session, a `kill -9`.

The lamp (the pymodbus simulator) sits behind tests/tcpproxy.py: `hold()` keeps the
gateway's bytes in the proxy, in order, so a Modbus write is "on the wire" for as long
as the test needs (a slow link that loses nothing). Writes are counted twice: every
write request the proxy sees leave the gateway, and every write the simulator serves.
The platform is an aiomqtt client; PlatformView records what the broker delivers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Daemon, fieldgate_cli, write_config
from tests.integration.test_commands_daemon import (
    PlatformView,
    ask,
    results_for,
    send,
    wait_subscribed,
)
from tests.integration.test_modbus_daemon import api_status
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

GATEWAY = "gw-cmd"  # the topic helpers imported above are for this gateway id
LAMP = 1
WRITE_CODES = (5, 6, 15, 16, 22, 23)  # every Modbus function code that changes a coil or a register
OUTCOME_UNKNOWN = "outcome unknown: not retried"


class WireWrites:
    """Modbus/TCP write requests seen leaving the gateway (MBAP frames parsed from the proxy's stream)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._buf = b""

    def __call__(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 8:
            length = int.from_bytes(self._buf[4:6], "big")
            if len(self._buf) < 6 + length:
                return
            frame, self._buf = self._buf[: 6 + length], self._buf[6 + length :]
            if frame[7] in WRITE_CODES:
                self.frames.append(frame)

    @property
    def count(self) -> int:
        return len(self.frames)


def served_writes(sim: ModbusSim) -> int:
    return sum(sim.count(LAMP, fc) for fc in WRITE_CODES)


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({LAMP: SimUnit()})
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
async def link(sim: ModbusSim) -> AsyncIterator[tuple[TcpProxy, WireWrites]]:
    proxy = await TcpProxy(sim.port).start()
    seen = WireWrites()
    proxy.on_upstream = seen
    try:
        yield proxy, seen
    finally:
        proxy.release()
        await proxy.aclose()


def lamp_config(tmp: Path, broker: Broker, proxy: TcpProxy, api: int) -> Path:
    """One lamp behind the proxy, polled once at start (then hourly) so that only commands use the link;
    the bus timeout and write_timeout are long enough for a write held through the whole scenario."""
    return write_config(
        tmp / "fieldgate.yaml",
        gateway=GATEWAY,
        broker_port=broker.port,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {proxy.port}, timeout: 60s}}",
        devices="  lamp-1: {bus: lan, unit_id: 1, profile: streetlamp-controller, poll: 1h}\n",
        extra="commands: {result_retention: 1h, write_timeout: 90s}\n",
        local=f"127.0.0.1:{api}",
    )


async def wait_until(predicate: Any, what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


async def polled_once(checker: PlatformView) -> None:
    await checker.wait_for(
        lambda: any(r["device"] == "lamp-1" and r["point"] == "dim" for r in checker.data.readings),
        what="the first poll of lamp-1",
    )


async def audit(cfg: Path) -> list[dict[str, Any]]:
    out = await fieldgate_cli("commands", "-c", str(cfg), "--json", "--limit", "200")
    assert out.code == 0, out.err
    entries: list[dict[str, Any]] = json.loads(out.out)["commands"]
    return entries


async def test_a_write_held_across_a_broker_restart_is_written_once_and_answered_once(
    tmp_path: Path, sim: ModbusSim, link: tuple[TcpProxy, WireWrites], pbroker: Broker
) -> None:
    proxy, wire = link
    api = free_port()
    cfg = lamp_config(tmp_path, pbroker, proxy, api)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    command = {"id": "held-1", "device": "lamp-1", "point": "dim", "value": 40}
    try:
        async with PlatformView(pbroker.port, GATEWAY) as checker:
            async with aiomqtt.Client(pbroker.host, pbroker.port, identifier="platform-a") as platform:
                await wait_subscribed(platform, checker, "a")
                await polled_once(checker)
                proxy.hold()
                await send(platform, command)
                await wait_until(lambda: wire.count == 1, "the write request on the wire")
            # The MQTT session drops while the write is held on the slow link.
            await asyncio.to_thread(pbroker.restart)
            async with aiomqtt.Client(pbroker.host, pbroker.port, identifier="platform-b") as platform:
                await wait_subscribed(platform, checker, "b")  # the gateway is back and subscribed
                # The platform, having no result, sends the same id again.
                await send(platform, command)
                await wait_subscribed(platform, checker, "c")  # handled in order: the repeat was seen
                assert wire.count == 1 and served_writes(sim) == 0 and results_for(checker, "held-1") == []
                proxy.release()
                await checker.wait_for(
                    lambda: bool(results_for(checker, "held-1")) or wire.count > 1, what="the result"
                )
                assert wire.count == 1, "a second write of the same id went on the wire"
                await wait_subscribed(platform, checker, "d")  # anything more would have come by now
                results = results_for(checker, "held-1")
                assert len(results) == 1, results
                assert results[0]["ok"] is True and results[0]["value"] == 40, results
                assert sim.units[LAMP].get("holding", 0) == [40]
                assert wire.count == 1 and served_writes(sim) == 1
                status = await api_status(api)
                assert status["upstream"]["connections"] == 2  # the restart, and nothing else
                # Done: a repeat now gets the stored result again, with no write.
                again = await ask(platform, checker, command)
                assert again == results[0]
                assert wire.count == 1 and served_writes(sim) == 1
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    mine = [(e["outcome"], e["error"]) for e in await audit(cfg) if e["id"] == "held-1"]
    assert list(reversed(mine)) == [
        ("duplicate", "already executing: answered by the first attempt's result"),
        ("executed", None),
        ("duplicate", None),
    ], mine


async def test_a_result_ready_while_the_broker_is_down_is_published_when_it_is_back(
    tmp_path: Path, sim: ModbusSim, link: tuple[TcpProxy, WireWrites], pbroker: Broker
) -> None:
    proxy, wire = link
    api = free_port()
    cfg = lamp_config(tmp_path, pbroker, proxy, api)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    command = {"id": "late-result", "device": "lamp-1", "point": "dim", "value": 25}
    try:
        async with PlatformView(pbroker.port, GATEWAY) as checker:
            async with aiomqtt.Client(pbroker.host, pbroker.port, identifier="platform-a") as platform:
                await wait_subscribed(platform, checker, "a")
                await polled_once(checker)
                proxy.hold()
                await send(platform, command)
                await wait_until(lambda: wire.count == 1, "the write request on the wire")
            await asyncio.to_thread(pbroker.stop)
            proxy.release()  # the write completes while the gateway has no MQTT session

            async def executed() -> bool:
                return any(e["id"] == "late-result" and e["outcome"] == "executed" for e in await audit(cfg))

            async with asyncio.timeout(30):
                while not await executed():
                    await asyncio.sleep(0.1)
            await asyncio.to_thread(pbroker.start)
            await checker.wait_for(lambda: bool(results_for(checker, "late-result")), what="the kept result")
            async with aiomqtt.Client(pbroker.host, pbroker.port, identifier="platform-b") as platform:
                await wait_subscribed(platform, checker, "b")
            results = results_for(checker, "late-result")
            assert len(results) == 1 and results[0]["ok"] is True and results[0]["value"] == 25, results
            assert wire.count == 1 and served_writes(sim) == 1
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


async def test_kill_9_during_a_held_write_then_the_same_id_is_never_written_again(
    tmp_path: Path, sim: ModbusSim, link: tuple[TcpProxy, WireWrites], broker: Broker
) -> None:
    proxy, wire = link
    api = free_port()
    cfg = lamp_config(tmp_path, broker, proxy, api)
    log = tmp_path / "daemon.log"
    sim.units[LAMP].set("holding", 0, [5])
    daemon = Daemon(cfg, log).start()
    command = {"id": "crash-1", "device": "lamp-1", "point": "dim", "value": 70}
    try:
        async with (
            PlatformView(broker.port, GATEWAY) as checker,
            aiomqtt.Client(broker.host, broker.port, identifier="platform") as platform,
        ):
            await wait_subscribed(platform, checker, "a")
            await polled_once(checker)
            proxy.hold()
            await send(platform, command)
            await wait_until(lambda: wire.count == 1, "the write request on the wire")
            daemon.kill9()  # the gateway dies with the write on the wire
            # The bytes already sent go on to the lamp: the write did happen, the gateway never learnt it.
            proxy.release()
            await wait_until(lambda: served_writes(sim) == 1, "the held write reaching the lamp")
            assert sim.units[LAMP].get("holding", 0) == [70]
            daemon = Daemon(cfg, log).start()
            await wait_subscribed(platform, checker, "b")
            answer = await ask(platform, checker, command)
            assert answer["ok"] is False and answer["error"] == OUTCOME_UNKNOWN, answer
            assert answer["value"] == 70 and isinstance(answer["ts"], int), answer  # read back now
            assert wire.count == 1 and served_writes(sim) == 1  # never written a second time
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    mine = [(e["source"], e["outcome"]) for e in await audit(cfg) if e["id"] == "crash-1"]
    assert list(reversed(mine)) == [("gateway", "interrupted"), ("mqtt", "duplicate")], mine


async def test_hostile_json_is_refused_counted_and_the_session_stays_up(
    tmp_path: Path, sim: ModbusSim, link: tuple[TcpProxy, WireWrites], broker: Broker
) -> None:
    proxy, wire = link
    api = free_port()
    cfg = lamp_config(tmp_path, broker, proxy, api)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    deep_value = b'{"id": "deep-1", "device": "lamp-1", "point": "dim", "value": ' + b"[" * 1000 + b"]" * 1000
    hostile = [
        b"[" * 100_000,  # 100 000 levels, past the size limit
        b"[" * 16_000,  # within the size limit, past the parser's depth limit
        b"[" * 1000 + b"]" * 1000,  # within both: an array, not a command
        deep_value + b"}",  # a command whose value nests 1000 deep (it has an id: answered)
        b'{"id": "deep-2", "x": ' + b"{" + b'"a":{' * 1000 + b"}" * 1001 + b"}",
    ]
    try:
        async with (
            PlatformView(broker.port, GATEWAY) as checker,
            aiomqtt.Client(broker.host, broker.port, identifier="platform") as platform,
        ):
            await wait_subscribed(platform, checker, "a")
            await polled_once(checker)
            for payload in hostile:
                await send(platform, payload)
            await checker.wait_for(lambda: bool(results_for(checker, "deep-1")), what="deep-1")
            refused = results_for(checker, "deep-1")[0]
            assert refused == {
                "id": "deep-1",
                "ok": False,
                "error": "'value' must be a number, a boolean or a string, got an array",
            }
            await checker.wait_for(lambda: bool(results_for(checker, "deep-2")), what="deep-2")
            assert results_for(checker, "deep-2")[0]["error"].startswith("unknown field 'x'")
            # A normal command on the same session still works.
            ok = await ask(
                platform, checker, {"id": "after", "device": "lamp-1", "point": "dim", "value": 33}
            )
            assert ok["ok"] is True and ok["value"] == 33
            status = await api_status(api)
            assert status["upstream"]["connections"] == 1, status["upstream"]  # never reconnected
            assert status["commands"]["malformed"] == 3, status.get("commands")
            assert wire.count == 1 and served_writes(sim) == 1
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    text = daemon.log_text()
    assert "command from mqtt ignored: payload of 100000 bytes is larger than 16384" in text
    assert "command from mqtt ignored: not JSON: depth limit exceeded" in text
    assert "command from mqtt ignored: expected a JSON object, got an array" in text
    assert "Traceback" not in text
