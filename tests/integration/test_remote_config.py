"""Remote configuration over MQTT: applied, refused, rolled back; signatures; local secrets stay local."""

from __future__ import annotations

import base64
import hashlib
import json
import os
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
    tmp: Path,
    broker_port: int,
    sim: ModbusSim,
    devices: str,
    remote: str,
    mqtt_extra: str = "",
    rollback: str = "3s",
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
        extra=f"remote_config: {{enabled: true, rollback_after: {rollback}{remote}}}\n",
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


def envelope(data: bytes, gateway: str, serial: int) -> bytes:
    """What the platform signs (docs/CONFIG_LIFECYCLE.md), built here independently of agent/control/remoteconfig.py."""
    doc = {"config_sha256": sha(data), "gateway": gateway, "serial": serial, "type": "fieldgate.config.set/2"}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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

    def sign(data: bytes, k: Ed25519PrivateKey = key, serial: int = 1, gateway: str = GW) -> str:
        return base64.b64encode(k.sign(envelope(data, gateway, serial))).decode()

    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            await push(broker.port, {"id": "s-1", "config": new})
            state = await wait_state(checker, "s-1")
            assert state["ok"] is False and "unsigned" in state["error"]
            await push(
                broker.port,
                {
                    "id": "s-2",
                    "config": new,
                    "gateway": GW,
                    "serial": 1,
                    "signature": sign(new.encode(), Ed25519PrivateKey.generate()),
                },
            )
            state = await wait_state(checker, "s-2")
            assert state["ok"] is False and "bad signature" in state["error"]
            tampered = new.replace("poll: 300ms", "poll: 400ms", 1)
            await push(
                broker.port,
                {
                    "id": "s-3",
                    "config": tampered,
                    "gateway": GW,
                    "serial": 1,
                    "signature": sign(new.encode()),
                },
            )
            state = await wait_state(checker, "s-3")
            assert state["ok"] is False and "bad signature" in state["error"]
            assert cfg.read_text() == original

            # signed: applied. As a JSON object, the signature covers its canonical form (sorted, compact)
            import yaml

            obj = yaml.safe_load(new)
            canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            await push(
                broker.port,
                {"id": "s-4", "config": obj, "gateway": GW, "serial": 1, "signature": sign(canonical)},
            )
            state = await wait_state(checker, "s-4")
            assert state["ok"] is True, state
            assert state["hash"] == sha(canonical) and cfg.read_bytes() == canonical
            await checker.wait_for(lambda: count(checker, "lamp") >= 3, what="the signed config's device")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]


# --- issue 17: a remote config cannot brick, be replayed, or read files -----------------------------------


def keypair(tmp: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pub = tmp / "platform.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


def signed(
    key: Ed25519PrivateKey, request_id: str, text: str, serial: int, gateway: str = GW
) -> dict[str, Any]:
    """A bound push: the signature covers the config's digest, the target gateway and the serial."""
    signature = base64.b64encode(key.sign(envelope(text.encode(), gateway, serial))).decode()
    return {"id": request_id, "config": text, "gateway": gateway, "serial": serial, "signature": signature}


async def test_kill9_during_probation_rolls_back_at_next_start(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    """The daemon dies (SIGKILL: no handler, no cleanup) while a pushed config is on probation: the next
    start runs the previous file, not the unconfirmed one, and says so on the retained config/state."""
    original = config_text(tmp_path, broker.port, sim, METER, "", rollback="10m")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    broken = config_text(tmp_path, free_port(), sim, METER + LAMP, "", rollback="10m")  # nobody listens
    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            await push(broker.port, {"id": "k-1", "config": broken})
            # on probation: the new file has taken over, the marker is on disk, the verdict is 10 minutes away
            await checker.wait_for(
                lambda: cfg.read_text() == broken and "applied" in daemon.log_text(), what="k-1 applied"
            )
            assert (tmp_path / "fieldgate.yaml.probation").exists()
            daemon.kill9()
            assert cfg.read_text() == broken  # what a dead daemon leaves behind

            daemon = Daemon(cfg, tmp_path / "daemon.log").start()
            state = await wait_state(checker, "k-1", timeout=30)
            assert state["ok"] is False and state["rolled_back"] is True, state
            assert "stopped during the probation" in state["error"], state
            assert state["hash"] == sha(original.encode())
            assert cfg.read_text() == original
            assert (tmp_path / "fieldgate.yaml.rejected").read_text() == broken
            assert not (tmp_path / "fieldgate.yaml.probation").exists()
            meter_now = count(checker, "meter")
            await checker.wait_for(lambda: count(checker, "meter") > meter_now + 3, what="data after restart")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]


async def test_pushes_are_bound_to_the_gateway_and_a_rising_serial(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    key, pub = keypair(tmp_path)
    remote = f", public_key_file: {pub}"
    original = config_text(tmp_path, broker.port, sim, METER, remote)
    with_lamp = config_text(tmp_path, broker.port, sim, METER + LAMP, remote)
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            await push(broker.port, signed(key, "b-1", with_lamp, serial=5))
            state = await wait_state(checker, "b-1")
            assert state["ok"] is True and state["hash"] == sha(with_lamp.encode()), state

            # the same signed push again under a new id: a replay
            await push(broker.port, {**signed(key, "b-1", with_lamp, serial=5), "id": "b-2"})
            state = await wait_state(checker, "b-2")
            assert state["ok"] is False and "not newer than the last accepted (5)" in state["error"], state
            # an older signed push (the original config, serial 3): a downgrade
            await push(broker.port, signed(key, "b-3", original, serial=3))
            state = await wait_state(checker, "b-3")
            assert state["ok"] is False and "downgrade" in state["error"], state
            # signed for another gateway: refused, whatever the serial
            await push(broker.port, signed(key, "b-4", original, serial=9, gateway="gw-other"))
            state = await wait_state(checker, "b-4")
            assert state["ok"] is False and "addressed to gateway 'gw-other'" in state["error"], state
            # ... and relabelled for this one: the signature does not cover that
            relabelled = {**signed(key, "b-5", original, serial=9, gateway="gw-other"), "gateway": GW}
            await push(broker.port, relabelled)
            state = await wait_state(checker, "b-5")
            assert state["ok"] is False and "bad signature" in state["error"], state
            # the old form, signed over the config bytes only: refused unless accept_unbound is set
            legacy = {
                "id": "b-6",
                "config": original,
                "signature": base64.b64encode(key.sign(original.encode())).decode(),
            }
            await push(broker.port, legacy)
            state = await wait_state(checker, "b-6")
            assert state["ok"] is False and "unbound push refused" in state["error"], state
            # a config written for another gateway, properly signed for this one: it may not rename it
            other = with_lamp.replace(f"id: {GW}", "id: gw-other", 1)
            await push(broker.port, signed(key, "b-7", other, serial=10))
            state = await wait_state(checker, "b-7")
            assert state["ok"] is False and "gateway.id" in state["error"], state
            assert cfg.read_text() == with_lamp
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
        assert json.loads((tmp_path / "fieldgate.yaml.serial").read_text())["serial"] == 5

        # the last accepted serial survives a restart
        lamp_before = count(checker, "lamp")
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            # readings flow only once the link is up and config/set subscribed
            await checker.wait_for(lambda: count(checker, "lamp") > lamp_before + 1, what="restarted")
            await push(broker.port, {**signed(key, "b-1", with_lamp, serial=5), "id": "b-8"})
            state = await wait_state(checker, "b-8")
            assert state["ok"] is False and "not newer" in state["error"], state
            await push(broker.port, signed(key, "b-9", original, serial=6))
            state = await wait_state(checker, "b-9")
            assert state["ok"] is True and state["hash"] == sha(original.encode()), state
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]


async def test_a_remote_config_reads_no_file_outside_the_profile_directories(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    """`profile:` in a pushed config is a name: a path to a secret, a FIFO or a device is refused at once,
    and nothing of any file but the pushed config goes upstream."""
    original = config_text(tmp_path, broker.port, sim, METER, "")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SECRET-HASH-4242:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "broken.yaml").write_text("points:\n  SECRET-KEY-4343: {address: nope}\n")

    def with_profile(profile: str) -> str:
        device = f"  other:\n    bus: lan\n    unit_id: 2\n    poll: 300ms\n    profile: {profile}\n"
        return config_text(tmp_path, broker.port, sim, METER + device, "")

    async with Checker(broker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            for n, profile in enumerate([str(secret), "../shadow", str(fifo), "/dev/zero", "shadow.yaml"]):
                await push(broker.port, {"id": f"f-{n}", "config": with_profile(profile)})
                state = await wait_state(checker, f"f-{n}", timeout=15)  # a FIFO would stall it for ever
                assert state["ok"] is False, state
                assert any(
                    "devices.other.profile: a remote config names a profile by its name only" in p
                    for p in state["problems"]
                ), state
                assert "SECRET" not in json.dumps(state)
            # a profile of the profile directory with a problem: its position goes up, not its text
            await push(broker.port, {"id": "f-9", "config": with_profile("broken")})
            state = await wait_state(checker, "f-9")
            assert state["ok"] is False and state["problems"], state
            assert "SECRET" not in json.dumps(state), state
            assert any(
                p.startswith(f"{tmp_path / 'profiles' / 'broken.yaml'}:2:") for p in state["problems"]
            ), state
            assert "SECRET-KEY-4343" in daemon.log_text()  # the technician sees the details on the gateway
            assert cfg.read_text() == original
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]


class TolerantChecker(Checker):
    """The platform also hears what is published on config/set: a hostile payload is not its JSON."""

    def _record(self, topic: str, payload: bytes) -> None:
        if not topic.endswith("/config/set"):
            super()._record(topic, payload)


async def test_hostile_json_is_refused_and_the_session_stays_up(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    original = config_text(tmp_path, broker.port, sim, METER, "")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(original)
    log = tmp_path / "daemon.log"
    connected = "upstream mqtt (fieldgate) connected"
    async with TolerantChecker(broker.port, GW) as checker:
        daemon = Daemon(cfg, log).start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            assert daemon.log_text().count(connected) == 1
            hostile = [
                b"[" * 200_000,
                b'{"id": "h-1", "config": ' + b"[" * 100_000,
                b'{"id": "h-2", "config": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_001,
                b"\xff\xfe not even text",
                b'{"id": "h-3", "config": "\\ud800"}',
            ]
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="attacker") as client:
                for n, payload in enumerate(hostile, 1):
                    await client.publish(SET, payload, qos=1)
                    await checker.wait_for(
                        lambda n=n: daemon.log_text().count("remote config refused") >= n,
                        what=f"hostile message {n} refused",
                    )
            # each was refused in words (the retained state keeps the latest)
            await checker.wait_for(lambda: state_of(checker, "h-3") is not None, what="the last refusal")
            last = state_of(checker, "h-3")
            assert last is not None and last["ok"] is False and "not valid Unicode" in last["error"], last
            text = daemon.log_text()
            assert text.count("nested deeper than 64 levels") >= 3, text[-3000:]
            # then a valid push, on the same session
            new = config_text(tmp_path, broker.port, sim, METER + LAMP, "")
            await push(broker.port, {"id": "h-9", "config": new})
            state = await wait_state(checker, "h-9")
            assert state["ok"] is True, state
            await checker.wait_for(lambda: count(checker, "lamp") >= 3, what="the pushed device's readings")
            assert daemon.log_text().count(connected) == 1, "the MQTT session was dropped"
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
