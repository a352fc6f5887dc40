"""`fieldgate fleet push|status` against four real daemons on one broker (remote configuration, signed).

The new config adds a device to every gateway; gw-c's new config names a profile that does not exist, so gw-c
refuses it. With stages 1,50%,100% the rollout confirms gw-a, then gw-b, then fails in the last stage (gw-c
refused while gw-d confirmed): it halts, and gw-a, gw-b and gw-d get their previous config back.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.control.fleet import parse_stages
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import REPO, Daemon, fieldgate_cli, fieldgate_exe, write_config

pytestmark = pytest.mark.timeout(180)

GATEWAYS = ["gw-a", "gw-b", "gw-c", "gw-d"]
METER = (
    "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 500ms\n"
    "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n"
)
LAMP = "  lamp:\n    bus: lan\n    unit_id: 2\n    poll: 500ms\n    points:\n      on: {table: coil, address: 0}\n"
BROKEN = "  lamp:\n    bus: lan\n    unit_id: 2\n    profile: no-such-profile\n"


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
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def gateway_config(tmp: Path, gw: str, broker: Broker, sim: ModbusSim, devices: str, pub: Path) -> str:
    scratch = tmp / f"scratch-{gw}.yaml"
    write_config(
        scratch,
        gateway=gw,
        broker_port=broker.port,
        db=tmp / gw / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices=devices,
        mqtt_extra="    health_interval: 1s",
        extra=f"remote_config: {{enabled: true, rollback_after: 5s, public_key_file: {pub}}}\n",
    )
    text = scratch.read_text()
    scratch.unlink()
    return text


def test_stages_parse() -> None:
    assert parse_stages("1,10%,100%", 25) == [1, 3, 25]
    assert parse_stages("1,10%,100%", 4) == [1, 4]  # 10 % of 4 rounds up to 1: that stage adds nobody
    assert parse_stages("1,50%,100%", 4) == [1, 2, 4]
    assert parse_stages("2,5", 3) == [2, 3]
    assert parse_stages("1,50%", 10) == [1, 5]  # a rollout may stop short of the fleet
    for bad in ("0", "1,0%", "x", "1,150%", "5,2", ""):
        with pytest.raises(Exception, match="--stages"):
            parse_stages(bad, 10)


def key_pair(tmp: Path) -> tuple[Ed25519PrivateKey, Path, Path]:
    """A fresh platform key: the key, its private PEM (what `fleet push --key` reads) and the public PEM the
    gateways are configured with."""
    key = Ed25519PrivateKey.generate()
    keyfile, pub = tmp / "platform.key", tmp / "platform.pub"
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, keyfile, pub


async def test_push_in_stages_halts_on_a_refusal_and_rolls_back(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    _, keyfile, pub = key_pair(tmp_path)
    current, new = tmp_path / "current", tmp_path / "new"
    current.mkdir()
    new.mkdir()
    daemons: list[Daemon] = []
    try:
        for gw in GATEWAYS:
            (tmp_path / gw).mkdir()
            text = gateway_config(tmp_path, gw, broker, sim, METER, pub)
            (current / f"{gw}.yaml").write_text(text)
            (tmp_path / gw / "fieldgate.yaml").write_text(text)
            devices = METER + (BROKEN if gw == "gw-c" else LAMP)
            (new / f"{gw}.yaml").write_text(gateway_config(tmp_path, gw, broker, sim, devices, pub))
            daemons.append(Daemon(tmp_path / gw / "fieldgate.yaml", tmp_path / gw / "daemon.log").start())

        link = ["--broker", broker.url]
        # Every gateway online, its running config confirmed (config/state published at start).
        for _ in range(100):
            st = await fieldgate_cli("fleet", "status", *link, "--listen", "1.5s")
            rows = [line for line in st.out.splitlines() if line.startswith("gw-")]
            if len(rows) == 4 and all(" online " in r and " yes " in r for r in rows):
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"gateways not all online and confirmed:\n{st.out}{st.err}")

        res = await fieldgate_cli(
            "fleet", "push", str(new), "--previous", str(current), *link, "--key", str(keyfile),
            "--stages", "1,50%,100%", "--timeout", "30s", "--id", "roll-1", timeout=150,
        )  # fmt: skip
        out = res.out
        print(f"\n{out}")  # the example of docs/FLEET.md
        assert res.code == 1, out + res.err
        assert "stage 1/3: 1 gateways (1 of 4): 1 confirmed, 0 failed" in out, out
        assert "stage 2/3: 1 gateways (2 of 4): 1 confirmed, 0 failed" in out, out
        assert "stage 3/3: 2 gateways (4 of 4): 1 confirmed, 1 failed" in out, out
        assert "gw-c: refused: invalid configuration" in out and "no-such-profile" in out, out
        assert "halted at stage 3: rolling back 3 gateways" in out, out
        table = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith("gw-")}
        assert table["gw-a"] == ["confirmed", "confirmed"], out
        assert table["gw-b"] == ["confirmed", "confirmed"], out
        assert table["gw-c"] == ["refused", "-"], out
        assert table["gw-d"] == ["confirmed", "confirmed"], out
        # Every gateway runs its previous config again (the file on disk is the one it started with).
        for gw in GATEWAYS:
            assert (tmp_path / gw / "fieldgate.yaml").read_bytes() == (current / f"{gw}.yaml").read_bytes(), (
                gw
            )

        # Without the broken one, the same rollout goes through every stage.
        res = await fieldgate_cli(
            "fleet", "push", str(new), "--previous", str(current), *link, "--key", str(keyfile),
            "--gateways", "gw-a,gw-b,gw-d", "--stages", "1,100%", "--timeout", "30s", "--id", "roll-2",
            timeout=150,
        )  # fmt: skip
        assert res.code == 0, res.out + res.err
        assert "every stage confirmed" in res.out
        for gw in ("gw-a", "gw-b", "gw-d"):
            assert (tmp_path / gw / "fieldgate.yaml").read_bytes() == (new / f"{gw}.yaml").read_bytes(), gw
        st = await fieldgate_cli("fleet", "status", *link, "--listen", "2.5s")
        print(f"\n{st.out}")
        assert st.code == 0, st.err
        rows = {line.split()[0]: line for line in st.out.splitlines() if line.startswith("gw-")}
        assert set(rows) == set(GATEWAYS), st.out
        assert all(" yes " in r for r in rows.values()), st.out
        assert "roll-2 confirmed" in rows["gw-a"] and "roll-1 refused" in rows["gw-c"], st.out
        assert all(r.split()[-1].isdigit() for r in rows.values()), f"buffer pending from health: {st.out}"
    finally:
        for d in daemons:
            assert d.stop() == 0, d.log_text()[-3000:]


def test_envelope_signature_is_what_the_gateway_checks(tmp_path: Path) -> None:
    """The message of `fleet push` verifies with the gateway's own check (agent/control/remoteconfig.py)."""
    from agent.control.fleet import envelope
    from agent.control.remoteconfig import PushRefused, parse_request, signed_message, verify_signature

    key, _, pub = key_pair(tmp_path)
    config = "gateway: {id: gw-a}\n# é\n".encode()
    request = parse_request(json.dumps(envelope("gw-a", config, "r-1", key, serial=7)).encode())
    assert request.id == "r-1" and request.data == config
    assert (request.gateway, request.serial) == ("gw-a", 7)
    verify_signature(pub, signed_message(config, "gw-a", 7), request.signature)
    for other in (signed_message(config + b"x", "gw-a", 7), signed_message(config, "gw-b", 7)):
        with pytest.raises(PushRefused, match="bad signature"):
            verify_signature(pub, other, request.signature)
    later = parse_request(json.dumps(envelope("gw-a", config, "r-3", key)).encode())
    assert later.serial is not None and later.serial > 7  # default serial: now in ms, rising
    assert "signature" not in envelope("gw-a", config, "r-2", None)


async def test_broker_lost_during_a_rollout_rolls_back_every_gateway_pushed(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    """Found at N = 200 in bench_fleet: a NATS node closed the tool's connection in the middle of a stage
    (*JetStream failed a pipelined QoS1/2 operation*) and the tool exited with 20 gateways on the new config.
    Here the broker restarts while stage 2 waits on gw-z (no daemon: silent); gw-a had confirmed stage 1.
    The tool reconnects and gives both their previous config back; gw-a confirms it."""
    current, new = tmp_path / "current", tmp_path / "new"
    current.mkdir()
    new.mkdir()
    _, keyfile, pub = key_pair(tmp_path)
    for gw in ("gw-a", "gw-z"):
        (tmp_path / gw).mkdir()
        (current / f"{gw}.yaml").write_text(gateway_config(tmp_path, gw, broker, sim, METER, pub))
        (new / f"{gw}.yaml").write_text(gateway_config(tmp_path, gw, broker, sim, METER + LAMP, pub))
    cfg = tmp_path / "gw-a" / "fieldgate.yaml"
    cfg.write_bytes((current / "gw-a.yaml").read_bytes())
    daemon = Daemon(cfg, tmp_path / "gw-a" / "daemon.log").start()
    try:
        for _ in range(100):
            st = await fieldgate_cli("fleet", "status", "--broker", broker.url, "--listen", "1s")
            if any(line.startswith("gw-a ") and " online " in line for line in st.out.splitlines()):
                break
        else:
            raise AssertionError(f"gw-a not online:\n{st.out}{st.err}")
        proc = await asyncio.create_subprocess_exec(
            *fieldgate_exe(), "fleet", "push", str(new), "--previous", str(current), "--broker", broker.url,
            "--key", str(keyfile), "--stages", "1,100%", "--timeout", "15s", "--id", "roll-lost",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(120):
            async for raw in proc.stdout:
                lines.append(raw.decode().rstrip("\n"))
                if lines[-1].startswith("stage 1/2:"):
                    assert "1 confirmed" in lines[-1], lines
                    broker.restart()  # stage 2 is waiting on gw-z: the tool's connection is lost
            code = await proc.wait()
        out = "\n".join(lines)
        assert code == 1, out
        assert "broker lost during the rollout: rolling back the 2 gateways pushed" in out, out
        rows = {ln.split()[0]: ln.split()[1] for ln in lines if ln.startswith("gw-")}
        assert rows == {"gw-a": "confirmed", "gw-z": "silent"}, out
        assert "ROLLBACK NOT CONFIRMED on gw-z" in out, out
        assert cfg.read_bytes() == (current / "gw-a.yaml").read_bytes()
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
