"""Reload without a restart (SIGHUP, `fieldgate reload`): the real daemon, the Modbus simulator, Mosquitto."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import REPO, Checker, Daemon, fieldgate_exe, wait_all_received, write_config

pytestmark = pytest.mark.timeout(120)

GW = "gw-reload"

DEVICES = {
    "meter": "  meter:\n    bus: lan\n    unit_id: 1\n    poll: 300ms\n"
    "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n",
    "regs": "  regs:\n    bus: lan\n    unit_id: 3\n    poll: 300ms\n    points:\n      r0: {table: holding, address: 0}\n",
    "lamp": "  lamp:\n    bus: lan\n    unit_id: 2\n    poll: 300ms\n    points:\n      on: {table: coil, address: 0}\n",
}


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(kind="energy-meter"), 2: SimUnit(kind="lamp-controller"), 3: SimUnit()})
    s.port = await s.start_tcp("127.0.0.1", 0)  # type: ignore[attr-defined]
    s.units[3].set("holding", 0, [100])
    try:
        yield s
    finally:
        await s.aclose()


def config(
    tmp: Path, broker: Broker, sim: ModbusSim, devices: list[str], listen: str, extra: str = ""
) -> Path:
    path = write_config(
        tmp / "fieldgate.yaml",
        gateway=GW,
        broker_port=broker.port,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",  # type: ignore[attr-defined]
        devices="".join(DEVICES[d] for d in devices),
        extra=extra,
    )
    # write_config disables the local API; these tests read the daemon's status document
    path.write_text(path.read_text().replace('local: {listen: ""}', f'local: {{listen: "{listen}"}}'))
    return path


def count(checker: Checker, device: str) -> int:
    return sum(1 for r in checker.data.readings if r["device"] == device)


async def status(listen: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{listen}/api/status", timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    return await asyncio.to_thread(get)


async def wait_status(listen: str, predicate: Any, what: str, timeout: float = 15) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            doc = await status(listen)
            if predicate(doc):
                return doc
        except OSError:
            pass
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_reload_while_polling(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    listen = f"127.0.0.1:{free_port()}"
    cfg = config(tmp_path, pbroker, sim, ["meter", "regs"], listen)
    first_hash = sha(cfg)
    async with Checker(pbroker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "regs") >= 3 and count(checker, "meter") >= 3)
            doc = await wait_status(listen, lambda d: d["config"]["hash"] == first_hash, "status")
            assert doc["config"]["version"] == 1 and doc["config"]["reload_error"] is None

            # lamp added, regs removed, meter untouched
            config(tmp_path, pbroker, sim, ["meter", "lamp"], listen)
            meter_before = count(checker, "meter")
            os.kill(daemon.pid, signal.SIGHUP)
            await checker.wait_for(lambda: count(checker, "lamp") >= 3, what="the added device's readings")
            doc = await wait_status(listen, lambda d: d["config"]["hash"] == sha(cfg), "the new hash")
            assert set(doc["devices"]) == {"meter", "lamp"}
            await asyncio.sleep(1.0)  # a regs poll in flight at the reload may still land
            regs_after = count(checker, "regs")
            await checker.wait_for(lambda: count(checker, "meter") >= meter_before + 10, what="meter goes on")
            assert count(checker, "regs") == regs_after  # the removed device stopped

            # a bad file changes nothing and says why, in the status document
            good_hash = sha(cfg)
            cfg.write_text(cfg.read_text().replace("poll: 300ms", "poll: sometimes", 1))
            os.kill(daemon.pid, signal.SIGHUP)
            doc = await wait_status(listen, lambda d: d["config"]["reload_error"], "the reload error")
            assert "devices.meter.poll" in doc["config"]["reload_error"]
            assert doc["config"]["hash"] == good_hash and set(doc["devices"]) == {"meter", "lamp"}
            meter_now, lamp_now = count(checker, "meter"), count(checker, "lamp")
            await checker.wait_for(
                lambda: count(checker, "meter") > meter_now + 3 and count(checker, "lamp") > lamp_now + 3,
                what="readings after a refused reload",
            )
            await checker.wait_for(lambda: bool(checker.data.health), what="health")

            # `fieldgate reload -c`: refuses a bad file itself, without signalling
            bad = await asyncio.to_thread(reload_verb, cfg)
            assert bad.returncode == 1 and "devices.meter.poll" in bad.stdout
            # a good one: signalled, confirmed through the status API
            config(tmp_path, pbroker, sim, ["meter", "lamp", "regs"], listen)
            ok = await asyncio.to_thread(reload_verb, cfg)
            assert ok.returncode == 0, ok.stdout + ok.stderr
            assert "reloaded" in ok.stdout
            await checker.wait_for(lambda: count(checker, "regs") > regs_after, what="regs back")
            # Every reload was validated in a child process: the daemon itself never loaded pydantic.
            assert any(n.startswith("_sqlite3") for n in daemon.mapped_files())  # the check sees modules
            assert not daemon.loads_pydantic()
            # Nothing lost across the reloads, up to the store's own high-water mark.
            await wait_all_received(checker, tmp_path / "buffer.db")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    report = checker.data.report()
    assert report["first"] == 1 and report["duplicates"] == 0, report
    assert report["live_out_of_order"] == 0
    assert "config" in checker.data.health[-1]
    assert "reload refused" in daemon.log_text()


def reload_verb(cfg: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [*fieldgate_exe(), "reload", "-c", str(cfg), "--timeout", "20"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


async def test_reload_while_offline(tmp_path: Path, pbroker: Broker, sim: ModbusSim) -> None:
    listen = f"127.0.0.1:{free_port()}"
    cfg = config(tmp_path, pbroker, sim, ["meter"], listen)
    async with Checker(pbroker.port, GW) as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: count(checker, "meter") >= 3, what="first readings")
            pbroker.stop()
            await wait_status(listen, lambda d: not d["upstream"]["connected"], "offline")
            config(tmp_path, pbroker, sim, ["meter", "lamp"], listen)
            os.kill(daemon.pid, signal.SIGHUP)
            await wait_status(
                listen,
                lambda d: d["config"]["hash"] == sha(cfg) and d["devices"]["lamp"]["state"] == "ok",
                "the lamp polled while offline",
            )
            await asyncio.sleep(1.0)
            pbroker.start()
            await checker.wait_for(lambda: count(checker, "lamp") >= 3, what="the lamp's buffered readings")
            await checker.wait_for(lambda: any(checker.data.backlog_flags), what="backlog")
            meter_now = count(checker, "meter")
            await checker.wait_for(lambda: count(checker, "meter") > meter_now + 3, what="live again")
            # What the reload polled offline came back: every seq up to the store's high-water mark.
            await wait_all_received(checker, tmp_path / "buffer.db")
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]
    assert checker.data.report()["first"] == 1
