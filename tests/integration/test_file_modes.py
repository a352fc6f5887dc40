"""File modes (issue 17): what the daemon writes is 0600 / 0700 whatever the umask; loose secrets are warned.

The buffer and its -wal/-shm, commands.db, the pid file, a config written by a remote push and its
.previous, and the snapshot cache directory (docs/SECURITY.md). The umask is the daemon's own (inherited at
fork from this process, set around the start only).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Checker, Daemon, write_config

pytestmark = pytest.mark.timeout(120)

GW = "gw-modes"
METER = (
    "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 300ms\n"
    "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n"
)
LAMP = "  lamp:\n    bus: lan\n    unit_id: 2\n    poll: 300ms\n    points:\n      on: {table: coil, address: 0}\n"


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker().start()
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


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def config_text(tmp: Path, port: int, sim: ModbusSim, devices: str, token: Path) -> str:
    scratch = tmp / "scratch.yaml"
    write_config(
        scratch,
        gateway=GW,
        broker_port=port,
        db=tmp / "state" / "buffer.db",
        local=f'"", token_file: {token}',
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",  # type: ignore[attr-defined]
        devices=devices,
        extra="remote_config: {enabled: true, rollback_after: 30s}\n",
    )
    text = scratch.read_text()
    scratch.unlink()
    return text


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
async def test_files_are_private_whatever_the_umask(
    tmp_path: Path, broker: Broker, sim: ModbusSim, umask: int
) -> None:
    token = tmp_path / "local.token"
    token.write_text("tech-token\n")
    token.chmod(0o644)  # a token readable by everyone: warned at start
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(config_text(tmp_path, broker.port, sim, METER, token))
    cfg.chmod(0o600)
    cache = tmp_path / "cache" / "fieldgate"  # does not exist yet: the daemon creates it
    state = tmp_path / "state"
    daemon = Daemon(cfg, tmp_path / "daemon.log", env={"FIELDGATE_CACHE_DIR": str(cache)})
    old = os.umask(umask)
    try:
        daemon.start()
    finally:
        os.umask(old)
    async with Checker(broker.port, GW) as checker:
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 3, what="first readings")
            new = config_text(tmp_path, broker.port, sim, METER + LAMP, token)
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="platform") as client:
                await client.publish(
                    f"fieldgate/{GW}/config/set", json.dumps({"id": "m-1", "config": new}).encode(), qos=1
                )

            def applied() -> bool:
                docs = [json.loads(p) for t, p in checker.data.other if t.endswith("/config/state")]
                return any(d.get("id") == "m-1" and d.get("ok") for d in docs)

            await checker.wait_for(applied, what="the push applied and confirmed")
            assert cfg.read_text() == new
            files = [
                cfg,
                tmp_path / "fieldgate.yaml.previous",
                state / "buffer.db",
                state / "buffer.db-wal",
                state / "buffer.db-shm",
                state / "commands.db",
                state / "commands.db-wal",
                state / "commands.db-shm",
                state / "fieldgate.pid",
            ]
            wrong = {str(f): f"{mode(f):04o}" for f in files if mode(f) != 0o600}
            assert wrong == {}, wrong
            assert mode(cache) == 0o700, f"{mode(cache):04o}"
            snapshots = list(cache.iterdir())
            assert snapshots and all(mode(f) == 0o600 for f in snapshots)
            log = daemon.log_text()
            assert "WARNING" in log and f"local.token_file: {token} is readable by group and others" in log
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
