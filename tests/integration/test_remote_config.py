"""Remote configuration over MQTT: applied, refused, rolled back; signatures; local secrets stay local."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Checker, Daemon, wait_all_received, write_config

pytestmark = pytest.mark.timeout(120)

GW = "gw-rc"
SET = f"fieldgate/{GW}/config/set"

METER = (
    "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 300ms\n"
    "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n"
)
LAMP = "  lamp:\n    bus: lan\n    unit_id: 2\n    poll: 300ms\n    points:\n      on: {table: coil, address: 0}\n"


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(persistence=True).start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(kind="energy-meter"), 2: SimUnit(kind="lamp-controller")})
    s.port = await s.start_tcp("127.0.0.1", 0)  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        await s.aclose()


def config_text(
    tmp: Path, broker_port: int, sim: ModbusSim, devices: str, remote: str, mqtt_extra: str = ""
) -> str:
    scratch = tmp / "scratch.yaml"
    write_config(
        scratch,
        gateway=GW,
        broker_port=broker_port,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",  # type: ignore[attr-defined]
        devices=devices,
        mqtt_extra=mqtt_extra,
        extra=f"remote_config: {{enabled: true, rollback_after: 3s{remote}}}\n",
    )
    text = scratch.read_text()
    scratch.unlink()
    return text


def states(checker: Checker) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in checker.data.other if t.endswith("/config/state")]


def state_of(checker: Checker, request_id: str) -> dict[str, Any] | None:
    found = [s for s in states(checker) if s.get("id") == request_id]
    return found[-1] if found else None


async def push(port: int, doc: dict[str, Any]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="platform") as client:
        await client.publish(SET, json.dumps(doc).encode(), qos=1)


async def wait_state(checker: Checker, request_id: str, timeout: float = 20) -> dict[str, Any]:
    await checker.wait_for(
        lambda: state_of(checker, request_id) is not None, timeout, f"state of {request_id}"
    )
    state = state_of(checker, request_id)
    assert state is not None
    return state


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count(checker: Checker, device: str) -> int:
    return sum(1 for r in checker.data.readings if r["device"] == device)


async def test_applied_refused_and_secrets_stay_local(tmp_path: Path, broker: Broker, sim: ModbusSim) -> None:
    original = config_text(tmp_path, broker.port, sim, METER, "")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            # the running config is announced at start
            await checker.wait_for(lambda: any(s["hash"] == sha(cfg.read_bytes()) for s in states(checker)))

            # 1. valid: a device added, applied without a restart and reported
            new = config_text(tmp_path, broker.port, sim, METER + LAMP, "")
            await push(broker.port, {"id": "c-1", "config": new})
            state = await wait_state(checker, "c-1")
            assert state["ok"] is True, state
            assert state["hash"] == sha(new.encode()) and state["version"] == 1 and state["applied_ts"] > 0
            assert cfg.read_text() == new
            assert (tmp_path / "fieldgate.yaml.previous").read_text() == original
            await checker.wait_for(lambda: count(checker, "lamp") >= 3, what="the pushed device's readings")

            # 2. invalid: refused with positioned errors, nothing changed
            bad = new.replace("unit_id: 2", "unit_id: 2\n    pol: 1s")
            await push(broker.port, {"id": "c-2", "config": bad})
            state = await wait_state(checker, "c-2")
            assert state["ok"] is False and state["hash"] == sha(new.encode())
            assert any(
                p.startswith("config:") and "devices.lamp.pol: unknown key" in p for p in state["problems"]
            )
            assert cfg.read_text() == new

            # 3. a secret file changed: refused
            secret = config_text(tmp_path, broker.port, sim, METER, "", "    password_file: /tmp/stolen\n")
            await push(broker.port, {"id": "c-3", "config": secret})
            state = await wait_state(checker, "c-3")
            assert state["ok"] is False and "upstream.mqtt.password_file" in state["error"], state
            # ... and remote_config itself
            off = new.replace("enabled: true", "enabled: false")
            await push(broker.port, {"id": "c-4", "config": off})
            state = await wait_state(checker, "c-4")
            assert state["ok"] is False and "remote_config.enabled" in state["error"], state

            # 4. a malformed request (the checker hears config/set too, so it stays JSON)
            await push(broker.port, {"id": "c-5", "config": 42})
            state = await wait_state(checker, "c-5")
            assert state["ok"] is False and "'config' is required" in state["error"]
            assert cfg.read_text() == new
            lamp_now = count(checker, "lamp")
            await checker.wait_for(lambda: count(checker, "lamp") > lamp_now + 3, what="still polling")
            await wait_all_received(checker, tmp_path / "buffer.db")  # up to the store's high-water mark
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    report = checker.data.report()
    assert report["first"] == 1 and report["duplicates"] == 0, report


async def test_unreachable_upstream_rolls_back(tmp_path: Path, broker: Broker, sim: ModbusSim) -> None:
    original = config_text(tmp_path, broker.port, sim, METER, "")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            closed = free_port()  # nothing listens there
            broken = config_text(tmp_path, closed, sim, METER + LAMP, "")
            await push(broker.port, {"id": "c-9", "config": broken})
            state = await wait_state(checker, "c-9", timeout=30)
            assert state["ok"] is False and state["rolled_back"] is True, state
            assert "upstream not reached within 3s" in state["error"]
            assert state["hash"] == sha(original.encode())
            assert cfg.read_text() == original
            assert (tmp_path / "fieldgate.yaml.rejected").read_text() == broken
            assert not (tmp_path / "fieldgate.yaml.probation").exists()
            meter_now = count(checker, "meter")
            await checker.wait_for(
                lambda: count(checker, "meter") > meter_now + 5, what="data after rollback"
            )
            # what the gateway polled while its link pointed nowhere came back from the buffer: every seq
            # up to the store's high-water mark
            await wait_all_received(checker, tmp_path / "buffer.db")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert checker.data.report()["first"] == 1
    assert count(checker, "lamp") > 0


async def test_signatures(tmp_path: Path, broker: Broker, sim: ModbusSim) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "platform.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    remote = f", public_key_file: {pub}"
    original = config_text(tmp_path, broker.port, sim, METER, remote)
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    new = config_text(tmp_path, broker.port, sim, METER + LAMP, remote)

    def sign(data: bytes, k: Ed25519PrivateKey = key) -> str:
        return base64.b64encode(k.sign(data)).decode()

    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            await push(broker.port, {"id": "s-1", "config": new})
            state = await wait_state(checker, "s-1")
            assert state["ok"] is False and "unsigned" in state["error"]
            await push(
                broker.port,
                {"id": "s-2", "config": new, "signature": sign(new.encode(), Ed25519PrivateKey.generate())},
            )
            state = await wait_state(checker, "s-2")
            assert state["ok"] is False and "bad signature" in state["error"]
            tampered = new.replace("poll: 300ms", "poll: 400ms", 1)
            await push(broker.port, {"id": "s-3", "config": tampered, "signature": sign(new.encode())})
            state = await wait_state(checker, "s-3")
            assert state["ok"] is False and "bad signature" in state["error"]
            assert cfg.read_text() == original

            # signed: applied. As a JSON object, the signature covers its canonical form (sorted, compact)
            import yaml

            obj = yaml.safe_load(new)
            canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            await push(broker.port, {"id": "s-4", "config": obj, "signature": sign(canonical)})
            state = await wait_state(checker, "s-4")
            assert state["ok"] is True, state
            assert state["hash"] == sha(canonical) and cfg.read_bytes() == canonical
            await checker.wait_for(lambda: count(checker, "lamp") >= 3, what="the signed config's device")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
