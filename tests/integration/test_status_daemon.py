"""The status API and `fieldgate status` against the real daemon: a failing device, the upstream down then up."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Daemon, fieldgate_cli, write_config

pytestmark = pytest.mark.timeout(120)

TOKEN = "tech-token-4242"


async def http(
    port: int, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request to the local API (it answers with Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        payload = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(payload)}"]
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, content = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(content) if content else {}


async def wait_status(port: int, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll /api/status until `predicate` holds (generous timeout; no duration is asserted)."""
    deadline = time.monotonic() + 30
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            code, last = await http(port, "GET", "/api/status")
        except OSError:
            code = 0  # not listening yet
        if code == 200 and predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(last)[:2000]}")


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(), 2: SimUnit(dead=True)})
    await s.start_tcp("127.0.0.1", 0)
    s.units[1].set("holding", 0, [2301, 40])
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
def down_broker() -> Iterator[Broker]:
    """A broker whose port is chosen but which is not started yet: the upstream starts down."""
    b = Broker()
    try:
        yield b
    finally:
        b.cleanup()


def config_for(tmp: Path, broker: Broker, sim: ModbusSim, listen: str) -> Path:
    token = tmp / "local.token"
    token.write_text(TOKEN + "\n")
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-status",
        broker_port=broker.port,
        db=tmp / "buffer.db",
        local=f"{listen}, token_file: {token}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  meter:
    bus: lan
    unit_id: 1
    poll: 300ms
    points:
      voltage: {table: holding, address: 0, scale: 0.1, unit: V}
      dim: {table: holding, address: 1, writable: true, min: 0, max: 100, unit: "%"}
  ghost:
    bus: lan
    unit_id: 2
    poll: 300ms
    points:
      r0: {table: holding, address: 0}
""",
    )


async def test_status_api_and_cli_follow_the_gateway(
    tmp_path: Path, sim: ModbusSim, down_broker: Broker
) -> None:
    port = free_port()
    cfg = config_for(tmp_path, down_broker, sim, f"127.0.0.1:{port}")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        # Upstream down: readings buffer, the failing device says why in words.
        doc = await wait_status(
            port,
            lambda d: (
                d["buffer"]["pending"] > 0
                and d["devices"]["ghost"]["state"] == "failing"
                and "voltage" in d["devices"]["meter"]["readings"]
            ),
            "buffering with the ghost device failing",
        )
        assert doc["gateway"]["id"] == "gw-status"
        up = doc["upstream"]
        assert up["connected"] is False and up["url"] == f"mqtt://127.0.0.1:{down_broker.port}"
        assert up["last_error"] and "refused" in up["last_error"], up
        ghost = doc["devices"]["ghost"]
        assert "no answer" in ghost["last_error"] and ghost["errors"] >= 1 and ghost["last_ok_ts"] is None
        meter = doc["devices"]["meter"]
        assert meter["state"] == "ok" and meter["last_error"] is None
        assert meter["readings"]["voltage"]["value"] == pytest.approx(230.1)
        assert meter["readings"]["voltage"]["unit"] == "V" and meter["readings"]["dim"]["unit"] == "%"

        text = await fieldgate_cli("status", "-c", str(cfg))
        assert text.code == 0, text.err
        assert "upstream  DISCONNECTED" in text.out and "refused" in text.out
        assert "ghost" in text.out and "FAILING" in text.out and "no answer" in text.out
        assert "voltage 230.1 V" in text.out
        as_json = await fieldgate_cli("status", "-c", str(cfg), "--json")
        assert as_json.code == 0
        parsed = json.loads(as_json.out)
        assert parsed["upstream"]["connected"] is False and parsed["buffer"]["pending"] > 0

        # Upstream up: connected, readings sent, the backlog drains.
        down_broker.start()
        doc = await wait_status(
            port,
            lambda d: d["upstream"]["connected"] and d["upstream"]["sent"] > 0,
            "the upstream connected and sending",
        )
        assert doc["upstream"]["last_error"] is None or isinstance(doc["upstream"]["last_error"], str)
        await wait_status(port, lambda d: d["buffer"]["pending"] < 10, "the backlog drained")
        text = await fieldgate_cli("status", "-c", str(cfg))
        assert text.code == 0 and "upstream  connected to mqtt://127.0.0.1" in text.out
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]

    gone = await fieldgate_cli("status", "-c", str(cfg))
    assert gone.code == 1 and "no fieldgate daemon answers" in gone.err
    assert (await fieldgate_cli("status", "-c", str(cfg), "--json")).code == 1


async def test_write_actions_need_the_token(tmp_path: Path, sim: ModbusSim, broker: Broker) -> None:
    port = free_port()
    cfg = config_for(tmp_path, broker, sim, f"127.0.0.1:{port}")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        await wait_status(port, lambda d: d["devices"]["meter"]["state"] == "ok", "the meter polled")
        polls_before = sim.count(1, 3)
        for token in (None, "", "wrong-token"):
            code, doc = await http(
                port, "POST", "/api/devices/meter/write", {"point": "dim", "value": 90}, token
            )
            assert code in (401, 403), (token, code, doc)
            assert "token" in doc["error"]
            code, doc = await http(port, "POST", "/api/devices/meter/poll", None, token)
            assert code in (401, 403)
        assert sim.units[1].get("holding", 1) == [40]  # nothing written
        assert sim.count(1, 6) == 0 and sim.count(1, 16) == 0  # not even attempted on the wire
        assert sim.count(1, 3) >= polls_before

        # With the token the same request goes through: the refusals above were about the token.
        code, doc = await http(port, "POST", "/api/devices/meter/write", {"point": "dim", "value": 90}, TOKEN)
        assert code == 200 and doc["ok"] is True, doc
        assert sim.units[1].get("holding", 1) == [90]
        code, doc = await http(
            port, "POST", "/api/devices/meter/write", {"point": "dim", "value": 900}, TOKEN
        )
        assert code == 200 and doc["ok"] is False and doc["error"], doc  # out of range, refused in words
        assert sim.units[1].get("holding", 1) == [90]
        code, doc = await http(port, "GET", "/api/status")
        assert code == 200 and TOKEN not in json.dumps(doc)
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert TOKEN not in daemon.log_text()


async def test_idle_connections_do_not_lock_the_technician_out(
    tmp_path: Path, sim: ModbusSim, broker: Broker
) -> None:
    """Any local user can open connections to the local API and send nothing: they hold a slot for at
    most the head deadline, and a new client takes the slot of an idle one, so `fieldgate status` answers."""
    port = free_port()
    cfg = config_for(tmp_path, broker, sim, f"127.0.0.1:{port}")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await wait_status(port, lambda d: d["devices"]["meter"]["state"] == "ok", "the meter polled")
        for n in range(48):  # more than the 32 slots, all from 127.0.0.1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if n % 2:
                writer.write(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # a head never finished
                await writer.drain()
            idle.append((reader, writer))
        text = await fieldgate_cli("status", "-c", str(cfg), "--json")
        assert text.code == 0, text.err
        assert json.loads(text.out)["devices"]["meter"]["state"] == "ok"
        code, doc = await http(port, "GET", "/api/status")
        assert code == 200 and doc["gateway"]["id"] == "gw-status"

        async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
            try:
                return await asyncio.wait_for(reader.read(), 30)
            except ConnectionResetError:
                return b""

        # every idle connection is let go by the server (evicted, or 408 at the head deadline)
        answers = await asyncio.gather(*(closed_by_server(r) for r, _ in idle))
        assert all(a == b"" or a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) for a in answers), answers
        assert "idle ones from 127.0.0.1 closed" in daemon.log_text()
    finally:
        for _, writer in idle:
            writer.close()
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


async def test_history_carries_the_last_hour(tmp_path: Path, sim: ModbusSim, broker: Broker) -> None:
    """GET /api/history (docs/STATUS_API.md, "The last hour") from the real daemon; /api/status stays lean."""
    port = free_port()
    cfg = config_for(tmp_path, broker, sim, f"127.0.0.1:{port}")
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        await wait_status(
            port,
            lambda d: d["devices"]["meter"]["state"] == "ok" and d["devices"]["ghost"]["state"] == "failing",
            "the meter read and the ghost failing",
        )
        deadline = time.monotonic() + 30
        while True:
            code, hist = await http(port, "GET", "/api/history")
            assert code == 200, hist
            if (hist["connected"][-1] or 0) > 0 or time.monotonic() > deadline:  # the minute it connected in
                break
            await asyncio.sleep(0.2)
        end_minute = hist["ts"] // 60_000
        assert hist["step_s"] == 60 and hist["end_ts"] == (end_minute + 1) * 60_000
        assert len(hist["pending"]) == len(hist["connected"]) == 60
        assert hist["pending"][-1] is not None and hist["pending"][-1] >= 0
        assert (hist["connected"][-1] or 0) > 0
        meter = hist["devices"]["meter"]
        voltage = meter["points"]["voltage"]
        assert len(voltage) == 60 and voltage[-1] == pytest.approx(230.1)  # the sim's constant value
        assert all(v is None for v in voltage[:-2])  # the daemon has run for a minute at most
        assert set(meter["points"]) == {"voltage", "dim"}
        assert sum(meter["activity"]["ok"]) >= 1 and sum(meter["activity"]["errors"]) == 0
        ghost = hist["devices"]["ghost"]
        assert sum(ghost["activity"]["ok"]) == 0 and sum(ghost["activity"]["errors"]) >= 1
        assert ghost["points"] == {}
        code, status = await http(port, "GET", "/api/status")
        assert code == 200 and "history" not in status
        assert "history" not in status["devices"]["meter"]["readings"]["voltage"]
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
