"""Remote upgrade end to end: signed command -> download over HTTP -> releases/<v> -> restart -> probation.

Two releases are built as wheels from temp copies of the tree: a good one (bumped version) and a broken
one whose `fieldgate run` exits 1. They are served on 127.0.0.1. The gateway runs from a releases root in
a temp dir through the launcher (`python -m agent.control.upgrade launch`, the unit's ExecStart= for remote
upgrades) under a small supervisor loop standing in for systemd's Restart=always. Readings are buffered
throughout and every seq must reach the broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.control.remoteconfig import canonical_json
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Checker, wait_all_received, write_config
from tests.vectors import REPO_ROOT

pytestmark = pytest.mark.timeout(300)

GW = "gw-up"
SET = f"fieldgate/{GW}/upgrade/set"
GOOD = f"{__version__}.post7"
BROKEN = f"{__version__}.post8"
DEAF = f"{__version__}.post9"  # runs and polls, but never sees its upstream as reached: the daemon rolls back
METER = (
    "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 300ms\n"
    "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n"
)


def build_wheel(tmp: Path, version: str, broken: bool = False, deaf: bool = False) -> Path:
    """A wheel of this tree with `version`; `broken`: its `fieldgate run` exits 1 at once; `deaf`: it never
    counts its upstream as connected (its probation cannot pass)."""
    tree = tmp / f"src-{version}"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO_ROOT / name.decode()
        if src.is_file():
            (tree / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name.decode())
    for rel, old, new in [
        ("agent/__init__.py", f'__version__ = "{__version__}"', f'__version__ = "{version}"'),
    ]:
        text = (tree / rel).read_text()
        assert old in text
        (tree / rel).write_text(text.replace(old, new, 1))
    if broken:
        cli = tree / "agent" / "cli.py"
        marker = "def main(argv: Sequence[str] | None = None) -> int:\n"
        text = cli.read_text()
        assert marker in text
        cli.write_text(text.replace(marker, marker + '    if "run" in sys.argv[1:]:\n        return 1\n', 1))
    if deaf:
        runtime = tree / "agent" / "runtime.py"
        line = "return self.upstreams.connected()"  # Runtime.upstream_connected
        text = runtime.read_text()
        assert line in text
        runtime.write_text(text.replace(line, "return False", 1))
    out = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            out,
            tree,
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = out.glob(f"fieldgate-{version}-*.whl")
    return wheel


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined, assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Supervisor:
    """systemd's Restart=always in a few lines: start the launcher, and again whenever it exits."""

    def __init__(self, root: Path, config: Path, log: Path) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "agent.control.upgrade",
            "launch",
            str(root),
            "--",
            "run",
            "-c",
            str(config),
        ]
        self.log = log
        self.exits: list[int] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        # No PYTHONPATH: each release must run its own code, not this checkout's.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        while not self._stopping:
            with open(self.log, "ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.cmd, stdout=out, stderr=out, env=env, cwd=self.log.parent
                )
            code = await self.proc.wait()
            self.exits.append(code)
            if not self._stopping:
                await asyncio.sleep(0.3)  # RestartSec=

    async def __aenter__(self) -> Supervisor:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
        assert self._task is not None
        await asyncio.wait_for(self._task, 30)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(persistence=True).start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(kind="energy-meter")})
    s.port = await s.start_tcp("127.0.0.1", 0)  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        await s.aclose()


def states(checker: Checker) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in checker.data.other if t.endswith("/upgrade/state")]


async def wait_state(checker: Checker, pred: Any, what: str, timeout: float = 90) -> dict[str, Any]:
    await checker.wait_for(lambda: any(pred(s) for s in states(checker)), timeout, what)
    return next(s for s in reversed(states(checker)) if pred(s))


async def test_upgrade_confirmed_then_broken_release_rolled_back(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    good = build_wheel(tmp_path, GOOD, broken=False)
    broken = build_wheel(tmp_path, BROKEN, broken=True)
    deaf = build_wheel(tmp_path, DEAF, deaf=True)
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "platform.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    db = tmp_path / "buffer.db"
    config = write_config(
        tmp_path / "fieldgate.yaml",
        gateway=GW,
        broker_port=broker.port,
        db=db,
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",  # type: ignore[attr-defined]
        devices=METER,
        extra=f"remote_config: {{enabled: true, rollback_after: 10s, public_key_file: {pub}}}\n",
    )
    root = tmp_path / "upgrade"

    def command(version: int, wheel: Path, release: str, base: str, **over: Any) -> bytes:
        doc: dict[str, Any] = {
            "id": f"up-{version}",
            "gateway": GW,
            "version": version,
            "release": release,
            "url": f"{base}/{wheel.name}",
            "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        }
        doc.update(over)
        doc["signature"] = base64.b64encode(key.sign(canonical_json(doc))).decode()
        return json.dumps(doc).encode()

    async def push(payload: bytes) -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="platform") as client:
            await client.publish(SET, payload, qos=1)

    with http_server(good.parent) as base:
        async with (
            Checker(broker.port, GW) as checker,
            Supervisor(root, config, tmp_path / "daemon.log") as sup,
        ):
            # The base install runs and says so.
            await wait_state(
                checker, lambda s: s["phase"] == "running" and s["release"] == __version__, "start"
            )
            await checker.wait_for(lambda: len(checker.data.readings) >= 3, 30, "readings")

            # Refused before anything happens: a hash that does not match, a command for another gateway.
            await push(command(1, good, GOOD, base, sha256="0" * 64))
            refused = await wait_state(
                checker, lambda s: s["id"] == "up-1" and s["phase"] == "refused", "up-1"
            )
            assert "sha256 mismatch" in refused["error"]
            await push(command(2, good, GOOD, base, gateway="gw-other"))
            refused = await wait_state(
                checker, lambda s: s["id"] == "up-2" and s["phase"] == "refused", "up-2"
            )
            assert "gw-other" in refused["error"]
            assert not (root / "current").exists()

            # The good release: installed beside, switched to, restarted into, confirmed.
            await push(command(3, good, GOOD, base))
            done = await wait_state(
                checker, lambda s: s["id"] == "up-3" and s["phase"] == "confirmed", "up-3"
            )
            assert done["release"] == GOOD and done["ok"] is True
            assert os.readlink(root / "current") == f"releases/{GOOD}"
            assert not (root / "probation.json").exists()
            assert 0 in sup.exits  # the base stopped cleanly to restart into the release

            # A replay of an accepted command is refused (strictly increasing version).
            await push(command(3, good, GOOD, base))
            await wait_state(
                checker, lambda s: s["id"] == "up-3" and "not above" in s.get("error", ""), "replay refused"
            )

            # The broken release: it exits 1 at every start; the launcher switches back to the good one,
            # which reports why on upgrade/state.
            await push(command(4, broken, BROKEN, base))
            back = await wait_state(
                checker, lambda s: s["id"] == "up-4" and s["phase"] == "rolled_back", "up-4 rolled back"
            )
            assert back["ok"] is False and back["rolled_back"] is True
            assert back["release"] == GOOD and back["rejected"] == BROKEN
            assert "stopped 3 times" in back["error"]
            assert sup.exits.count(1) >= 3
            assert os.readlink(root / "current") == f"releases/{GOOD}"
            retained = [s for s in states(checker) if s["id"] == "up-4"]
            assert retained[-1]["phase"] == "rolled_back"

            # A release that runs but never reaches its upstream within its probation: the daemon itself
            # switches back at the deadline and restarts; the good release reports it.
            await push(command(5, deaf, DEAF, base))
            await wait_state(
                checker, lambda s: s["id"] == "up-5" and s["phase"] == "restarting", "up-5 switch"
            )
            back = await wait_state(
                checker, lambda s: s["id"] == "up-5" and s["phase"] == "rolled_back", "up-5 rolled back", 120
            )
            assert back["release"] == GOOD and back["rejected"] == DEAF
            assert "upstream not reached" in back["error"]
            assert os.readlink(root / "current") == f"releases/{GOOD}"
            assert (tmp_path / "daemon.log").read_text().count(f"fieldgate {DEAF} started") == 1

            # Nothing lost across the restarts: every seq the buffer handed out reached the broker.
            await checker.wait_for(lambda: len(checker.data.readings) >= 3, 30, "readings")
            await wait_all_received(checker, db, timeout=60)
        # The final state is retained: a platform subscribing now learns it.
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="late") as client:
            await client.subscribe(f"fieldgate/{GW}/upgrade/state", qos=1)
            async with asyncio.timeout(10):
                async for msg in client.messages:
                    doc = json.loads(msg.payload)  # type: ignore[arg-type]
                    assert doc["id"] == "up-5" and doc["phase"] == "rolled_back"
                    break
