"""sd_notify and the progress watchdog end to end: READY, regular WATCHDOG=1, starvation by a hung poller, STOPPING.

A fake notify socket (AF_UNIX datagram, bound by the test) stands in for systemd. The real daemon shows the
normal life cycle. A hung poller cannot be produced through the config (the scheduler's cycle timeout
cancels any driver that merely waits), so the hang runs the Runtime in-process with one device's driver
replaced at our own seam (`agent.pipeline.devices.make_driver`) by a driver that swallows cancellation: the bug the
watchdog exists for.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.pipeline.devices
from agent.config.base import DeviceConfigBase
from agent.config.loader import load_config
from agent.driver import Driver, DriverContext
from agent.pipeline.reading import Reading, now_ms
from agent.runtime import Runtime
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import free_port
from tests.daemon import Daemon, write_config

pytestmark = pytest.mark.timeout(90)


class NotifySocket:
    """The test's side of $NOTIFY_SOCKET: every datagram the daemon sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def next(self, timeout: float = 20) -> str:
        message = (
            await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        ).decode()
        self.messages.append(message)
        return message

    async def wait_for(self, wanted: str, timeout: float = 30) -> list[str]:
        """Messages up to and including the first one containing `wanted`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {wanted!r} from the daemon; got {seen[-10:]}")
            try:
                message = await self.next(left)
            except TimeoutError:
                raise AssertionError(f"no {wanted!r} from the daemon; got {seen[-10:]}") from None
            seen.append(message)
            if wanted in message:
                return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit()})
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


def config_for(tmp: Path, sim: ModbusSim) -> Path:
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-wd",
        broker_port=free_port(),  # no broker: the watchdog must not depend on the upstream
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  fine:
    bus: lan
    unit_id: 1
    poll: 200ms
    points:
      r0: {table: holding, address: 0}
  stuck:
    bus: lan
    unit_id: 1
    poll: 200ms
    points:
      r1: {table: holding, address: 1}
""",
    )


async def test_ready_watchdog_and_stopping_from_the_real_daemon(
    tmp_path: Path, sim: ModbusSim, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    daemon = Daemon(config_for(tmp_path, sim), tmp_path / "daemon.log", env=env).start()
    try:
        before = await notify.wait_for("READY=1")
        assert not any("WATCHDOG=1" in m for m in before)  # no ping before the daemon is ready
        ready = before[-1]
        assert "STATUS=2 devices" in ready, ready
        pings = 0
        while pings < 3:  # regular pings while everything progresses
            message = await notify.next()
            assert "starved" not in message, message
            pings += message == "WATCHDOG=1"
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
    await notify.wait_for("STOPPING=1", timeout=5)


class HangingDriver(Driver[DeviceConfigBase]):
    """Reads normally until `hang` is set; then its read never returns and swallows cancellation."""

    name = "hanging"

    def __init__(self, device: str, config: DeviceConfigBase, context: DriverContext) -> None:
        super().__init__(device, config, context)
        self.hang = asyncio.Event()
        self.release = asyncio.Event()
        self.reads = 0

    async def read(self) -> list[Reading]:
        self.reads += 1
        if self.hang.is_set():
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    continue  # the simulated bug: the cycle timeout's cancellation is swallowed
        return [Reading(self.device, "r1", now_ms(), 1)]


async def test_a_hung_poller_starves_the_watchdog(
    tmp_path: Path, sim: ModbusSim, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    # Device periods are 30 s and more in production; a short one for the device that will hang keeps
    # the test short (the healthy one keeps a period that covers its backoff on a loaded machine).
    cfg_path = config_for(tmp_path, sim)
    config = load_config(cfg_path)
    monkeypatch.setattr(
        agent.pipeline.devices, "watchdog_period", lambda cfg: 1.5 if cfg == config.devices["stuck"] else 60.0
    )
    hanging: list[HangingDriver] = []
    real_make_driver = agent.pipeline.devices.make_driver

    def make_driver(name: str, cfg: DeviceConfigBase, context: DriverContext) -> Driver[Any]:
        if name != "stuck":
            return real_make_driver(name, cfg, context)
        driver = HangingDriver(name, cfg, context)
        hanging.append(driver)
        return driver

    monkeypatch.setattr(agent.pipeline.devices, "make_driver", make_driver)
    runtime = Runtime(config, cfg_path)
    run = asyncio.create_task(runtime.run())
    try:
        await notify.wait_for("READY=1")
        await notify.wait_for("WATCHDOG=1")
        (driver,) = hanging
        assert driver.reads >= 1

        driver.hang.set()
        seen = await notify.wait_for("watchdog starved")
        starved = seen[-1]
        assert "stalled: stuck (no progress for" in starved and "fine" not in starved, starved
        assert runtime.watchdog.stalled() == ["stuck"]
        # From now on no round pings: each says "starved" instead, and the healthy device keeps polling.
        polls = sim.count(1, 3)
        for _ in range(3):
            later = await notify.wait_for("watchdog starved")
            assert "WATCHDOG=1" not in later, later
        assert sim.count(1, 3) > polls
        assert runtime.health["fine"].state == "ok"
        assert run.done() is False

        driver.release.set()  # the hang ends: progress again, pings again
        await notify.wait_for("WATCHDOG=1")
        assert runtime.watchdog.stalled() == []
    finally:
        for d in hanging:
            d.release.set()
        runtime.request_stop()
        await asyncio.wait_for(run, 30)
    await notify.wait_for("STOPPING=1", timeout=5)
