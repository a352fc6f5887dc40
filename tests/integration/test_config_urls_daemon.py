"""Credentials in URLs never reach the status API, the config state or the log (issue 17, item 3).

`url: mqtt://user:secret@host` once passed `check`, never connected (the userinfo went to DNS as part of the
host name) and showed the password on the unauthenticated /api/status and in the log. Now `check` refuses it
(pointing to username / password_file, token_file), a pushed config holding one is refused without echoing it,
and every URL the daemon renders goes through agent.urls.redact_url.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.urls import redact_url
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Checker, Daemon, write_config

pytestmark = pytest.mark.timeout(120)

GW = "gw-url"
SECRET = "S3cr3tPassw0rd"
DEVICES = "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 300ms\n    points:\n      v: {table: input, address: 0}\n"


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(persistence=True).start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[int]:
    s = ModbusSim({1: SimUnit(kind="energy-meter")})
    port = await s.start_tcp("127.0.0.1", 0)
    try:
        yield port
    finally:
        await s.aclose()


async def status(port: int) -> str | None:
    """The body of /api/status, or None when nothing listens."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    return raw.partition(b"\r\n\r\n")[2].decode()


def config(
    tmp: Path, broker: int, sim: int, api: int, url: str | None = None, extra: str = "", more: str = ""
) -> str:
    """The test config; `more` goes under `upstream:` after the mqtt section (e.g. `  extra: ...`)."""
    path = tmp / "scratch.yaml"
    write_config(
        path,
        gateway=GW,
        broker_port=broker,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim}, timeout: 1s}}",
        devices=DEVICES,
        local=f"127.0.0.1:{api}",
        url=url,
        extra=extra,
        mqtt_extra=more,
    )
    text = path.read_text()
    path.unlink()
    return text


async def test_a_url_with_credentials_is_refused_and_never_shown(
    tmp_path: Path, broker: Broker, sim: int
) -> None:
    api = free_port()
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        config(tmp_path, broker.port, sim, api, url=f"mqtt://{GW}:{SECRET}@127.0.0.1:{broker.port}")
    )
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.alive():
            body = await status(api)
            if body is not None:
                seen.append(body)
                if '"devices"' in body and len(seen) > 3:
                    break
            await asyncio.sleep(0.2)
    finally:
        code = daemon.stop()
    log = daemon.log_text()
    for body in seen:
        assert SECRET not in body, body[:2000]
    assert SECRET not in log, log[-3000:]
    assert not seen and code != 0  # refused before anything listens: the config is invalid
    assert "upstream.mqtt.url: credentials in the URL (mqtt://***@127.0.0.1" in log
    assert "use upstream.mqtt.username and password_file" in log


async def test_a_pushed_config_with_credentials_is_refused_without_echoing_them(
    tmp_path: Path, broker: Broker, sim: int
) -> None:
    api = free_port()
    remote = "remote_config: {enabled: true, rollback_after: 3s}\n"
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(config(tmp_path, broker.port, sim, api, extra=remote))
    ngsi = f"  extra:\n    city:\n      ngsi_ld: {{url: 'http://admin:{SECRET}@127.0.0.1:1'}}"
    pushed = config(
        tmp_path,
        broker.port,
        sim,
        api,
        url=f"mqtt://{GW}:{SECRET}@127.0.0.1:{broker.port}",
        extra=remote,
        more=ngsi,
    )
    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 2, what="first readings")
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="platform") as client:
                await client.publish(
                    f"fieldgate/{GW}/config/set", json.dumps({"id": "c-1", "config": pushed}).encode(), qos=1
                )

            def state() -> dict[str, Any] | None:
                found = [
                    json.loads(p)
                    for t, p in checker.data.other
                    if t.endswith("/config/state") and b'"c-1"' in p
                ]
                return found[-1] if found else None

            await checker.wait_for(lambda: state() is not None, what="the state of c-1")
            answer = state()
            assert answer is not None and answer["ok"] is False, answer
            assert SECRET not in json.dumps(answer)
            problems = "\n".join(answer["problems"])
            assert "upstream.mqtt.url: credentials in the URL (mqtt://***@127.0.0.1" in problems, answer
            assert (
                "upstream.extra.city.ngsi_ld.url: credentials in the URL (http://***@127.0.0.1:1)" in problems
            )
            # still running on the old config, readings flowing, nothing echoed anywhere
            before = len(checker.data.readings)
            await checker.wait_for(lambda: len(checker.data.readings) > before + 2, what="readings after")
            body = await status(api)
            assert body is not None and SECRET not in body
            shown = json.loads(body)["upstream"]["url"]
            assert shown == redact_url(f"mqtt://127.0.0.1:{broker.port}") == f"mqtt://127.0.0.1:{broker.port}"
        finally:
            code = daemon.stop()
    assert code == 0
    assert SECRET not in daemon.log_text()
