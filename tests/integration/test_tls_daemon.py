"""The real daemon over mqtts:// against a TLS Mosquitto: delivers with the right material; with the wrong
CA, name or an expired broker certificate it keeps running and buffering, and says why on its status API.
The MQTT password comes from password_file and never shows in logs, `fieldgate check` or /api/status."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.upstream.tls import build_ssl_context
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import free_port
from tests.daemon import Daemon, fieldgate_cli, write_config
from tests.integration.test_status_daemon import http
from tests.integration.test_tls import TlsBroker, collect_leaked_sockets
from tests.tlsca import Issued, Pki, make_pki

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed"),
]

USER = "gw-tls"
PASSWORD = "Sup3r-s3cret-pw-8841"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class PasswordTlsBroker(TlsBroker):
    """The TLS broker of test_tls.py, also demanding a username and password (mosquitto_passwd -b)."""

    def __init__(self, pki: Pki, server: Issued) -> None:
        super().__init__(pki, server)
        passwd = self.broker.dir / "tls" / "passwd"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), USER, PASSWORD], check=True)
        os.chmod(passwd, 0o644)  # mosquitto started as root reads it as its own user
        self.broker.extra_conf += f"\npassword_file {passwd}\nallow_anonymous false\n"


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit()})
    await s.start_tcp("127.0.0.1", 0)
    s.units[1].set("holding", 0, [77])
    try:
        yield s
    finally:
        await s.aclose()


def config_for(tmp: Path, port: int, sim: ModbusSim, listen: int, ca: Path, client: Issued) -> Path:
    secret = tmp / "mqtt.password"
    secret.write_text(PASSWORD + "\n")
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-tls",
        broker_port=port,
        url=f"mqtts://127.0.0.1:{port}",
        mqtt_extra=f"""    username: {USER}
    password_file: {secret}
    tls: {{ca_file: {ca}, cert_file: {client.cert}, key_file: {client.key}}}""",
        db=tmp / "buffer.db",
        local=f"127.0.0.1:{listen}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  regs:
    bus: lan
    unit_id: 1
    poll: 200ms
    points:
      r0: {table: holding, address: 0, unit: V}
""",
    )


async def wait_status(port: int, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            code, last = await http(port, "GET", "/api/status")
        except OSError:
            code = 0
        if code == 200 and predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(last)[:2000]}")


async def first_telemetry(port: int, ctx: ssl.SSLContext, got: asyncio.Future[dict[str, Any]]) -> None:
    """A platform-side subscriber over TLS, with the same client certificate and password."""
    async with aiomqtt.Client(
        "127.0.0.1", port, tls_context=ctx, username=USER, password=PASSWORD, identifier="tls-checker"
    ) as client:
        await client.subscribe("fieldgate/gw-tls/telemetry", qos=1)
        async for msg in client.messages:
            assert isinstance(msg.payload, bytes)
            got.set_result(json.loads(msg.payload))
            return


async def test_delivers_with_the_right_material(tmp_path: Path, pki: Pki, sim: ModbusSim) -> None:
    listen = free_port()
    with PasswordTlsBroker(pki, pki.server) as broker:
        cfg = config_for(tmp_path, broker.port, sim, listen, pki.ca, pki.client)
        checked = await fieldgate_cli("check", "-c", str(cfg))
        assert checked.code == 0, checked.out + checked.err
        ctx = build_ssl_context(pki.ca, pki.client.cert, pki.client.key)
        with pytest.raises(aiomqtt.MqttError):  # the broker really demands the password
            async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx, username=USER, timeout=5):
                pass
        collect_leaked_sockets()
        got: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        sub = asyncio.create_task(first_telemetry(broker.port, ctx, got))
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            doc = await asyncio.wait_for(got, 30)
            assert doc["readings"][0]["device"] == "regs" and doc["readings"][0]["value"] == 77
            status = await wait_status(listen, lambda d: d["upstream"]["connected"], "connected")
            assert status["upstream"]["url"] == f"mqtts://127.0.0.1:{broker.port}"
            assert status["upstream"]["last_error"] is None
            text = await fieldgate_cli("status", "-c", str(cfg), "--json")
            assert text.code == 0
        finally:
            sub.cancel()
            await asyncio.gather(sub, return_exceptions=True)
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    for where, content in (
        ("the daemon's log", daemon.log_text()),
        ("fieldgate check", checked.out + checked.err),
        ("/api/status", json.dumps(status)),
        ("fieldgate status --json", text.out + text.err),
    ):
        assert PASSWORD not in content, f"the password leaked into {where}"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-ca", "not signed by a CA in ca_file"),
        ("wrong-name", "not valid for the name 127.0.0.1"),
        ("expired", "has expired"),
    ],
)
async def test_broken_tls_keeps_buffering_and_says_why(
    tmp_path: Path, pki: Pki, sim: ModbusSim, case: str, expected: str
) -> None:
    server = {"wrong-ca": pki.server, "wrong-name": pki.server_other_name, "expired": pki.server_expired}[
        case
    ]
    ca = pki.other_ca if case == "wrong-ca" else pki.ca
    listen = free_port()
    with PasswordTlsBroker(pki, server) as broker:
        cfg = config_for(tmp_path, broker.port, sim, listen, ca, pki.client)
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            first = await wait_status(
                listen,
                lambda d: d["buffer"]["pending"] > 0 and bool(d["upstream"]["last_error"]),
                "buffering with an upstream error",
            )
            assert first["upstream"]["connected"] is False
            assert expected in first["upstream"]["last_error"], first["upstream"]
            later = await wait_status(
                listen, lambda d: d["buffer"]["pending"] > first["buffer"]["pending"], "still buffering"
            )
            assert later["upstream"]["connected"] is False and later["upstream"]["sent"] == 0
            assert later["devices"]["regs"]["state"] == "ok"
            assert daemon.alive()
            text = await fieldgate_cli("status", "-c", str(cfg))
            assert text.code == 0 and expected in text.out
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert PASSWORD not in daemon.log_text() and PASSWORD not in json.dumps(later)
