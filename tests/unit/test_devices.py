"""The running devices (agent/pipeline/devices.py), with drivers of our own Driver contract put in at our own
seam (`make_driver`): a device starts with its task, health and watchdog entry and stops without a trace; a
driver whose library is missing leaves its device failing, never the others stopped; push devices are not
watched; `polled_since` is remote upgrade's probation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config.base import DeviceConfigBase
from agent.config.loader import load_config
from agent.config.models import FieldgateConfig
from agent.driver import Driver, DriverContext
from agent.logsetup import ErrorReporter
from agent.pipeline import devices as devices_module
from agent.pipeline.devices import Devices, make_context
from agent.pipeline.reading import Reading, now_ms
from agent.pipeline.store import AsyncStore
from agent.pipeline.writer import StoreWriter
from agent.watchdog import ProgressWatchdog

TEXT = """\
gateway: {{id: gw-d}}
upstream: {{mqtt: {{url: "mqtt://127.0.0.1:1"}}}}
storage: {{path: {db}}}
local: {{listen: ""}}
devices:
  pm-1: {{driver: sds011, port: /dev/null, poll: 10s}}
  pm-2: {{driver: sds011, port: /dev/null, poll: 10s}}
"""


class Polled(Driver[Any]):
    name = "polled"

    def __init__(self, device: str, config: Any, context: DriverContext) -> None:
        super().__init__(device, config, context)
        self.closed = False

    async def read(self) -> list[Reading]:
        return [Reading(self.device, "pm25", now_ms(), 4.0, "ug/m3")]

    async def close(self) -> None:
        self.closed = True


class Pushed(Polled):
    name = "pushed"

    def stream(self) -> AsyncIterator[list[Reading]] | None:
        async def batches() -> AsyncIterator[list[Reading]]:
            await asyncio.Event().wait()  # silent until stopped
            yield []

        return batches()


@pytest.fixture
def config(tmp_path: Path) -> FieldgateConfig:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(TEXT.format(db=tmp_path / "buffer.db"))
    return load_config(path)


@pytest.fixture
def writer(async_store: AsyncStore) -> StoreWriter:
    return StoreWriter(async_store, 0.2, lambda rows: None)  # not running: readings wait in its memory


@pytest.fixture
def watchdog() -> ProgressWatchdog:
    return ProgressWatchdog()


@pytest.fixture
def devices(config: FieldgateConfig, watchdog: ProgressWatchdog, tmp_path: Path) -> Devices:
    return Devices(make_context(config, tmp_path / "fieldgate.yaml"), watchdog, ErrorReporter())


def start_all(devices: Devices, tg: asyncio.TaskGroup, config: FieldgateConfig, writer: StoreWriter) -> None:
    for name, cfg in config.device_items():
        devices.start(tg, name, cfg, config, writer)


async def stop_all(devices: Devices) -> None:
    devices.cancel()
    await devices.stopped()


def drivers_by_name(monkeypatch: pytest.MonkeyPatch, kinds: dict[str, type[Polled] | None]) -> list[Polled]:
    """Replace `make_driver`: each device gets the driver class named for it (None: its library is missing)."""
    made: list[Polled] = []

    def make_driver(name: str, cfg: DeviceConfigBase, context: DriverContext) -> Driver[Any]:
        cls = kinds[name]
        if cls is None:
            raise ImportError("No module named 'serial'")
        made.append(cls(name, cfg, context))
        return made[-1]

    monkeypatch.setattr(devices_module, "make_driver", make_driver)
    return made


async def wait_for(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_a_device_starts_polls_and_stops_without_a_trace(
    devices: Devices,
    watchdog: ProgressWatchdog,
    config: FieldgateConfig,
    writer: StoreWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = drivers_by_name(monkeypatch, {"pm-1": Polled, "pm-2": Polled})
    started = now_ms()
    assert devices.polled_since(started)  # no device: nothing to wait for
    async with asyncio.TaskGroup() as tg:
        start_all(devices, tg, config, writer)
        assert "pm-1" in devices and sorted(devices.drivers) == ["pm-1", "pm-2"]
        assert sorted(watchdog.names()) == ["pm-1", "pm-2"]
        await wait_for(lambda: devices.health["pm-1"].last_ok_ts is not None)
        assert devices.polled_since(started)
        assert not devices.polled_since(now_ms() + 60_000)

        await devices.stop("pm-1")
        assert "pm-1" not in devices
        assert "pm-1" not in devices.health and "pm-1" not in devices.tasks and "pm-1" not in devices.drivers
        assert watchdog.names() == ["pm-2"]
        assert made[0].closed and not made[1].closed
        with pytest.raises(KeyError):
            devices.poll_now("pm-1")
        await stop_all(devices)
    assert made[1].closed


async def test_a_missing_driver_library_leaves_its_device_failing(
    devices: Devices,
    watchdog: ProgressWatchdog,
    config: FieldgateConfig,
    writer: StoreWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drivers_by_name(monkeypatch, {"pm-1": None, "pm-2": Polled})
    async with asyncio.TaskGroup() as tg:
        start_all(devices, tg, config, writer)
        health = devices.health["pm-1"]
        assert "pm-1" not in devices and health.state == "failing"
        assert health.last_error is not None and "driver 'sds011' unavailable" in health.last_error
        assert watchdog.names() == ["pm-2"]
        await wait_for(lambda: devices.health["pm-2"].last_ok_ts is not None)
        await stop_all(devices)


async def test_push_devices_are_not_watched(
    devices: Devices,
    watchdog: ProgressWatchdog,
    config: FieldgateConfig,
    writer: StoreWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drivers_by_name(monkeypatch, {"pm-1": Pushed, "pm-2": Polled})
    async with asyncio.TaskGroup() as tg:
        start_all(devices, tg, config, writer)
        assert "pm-1" in devices and watchdog.names() == ["pm-2"]
        await stop_all(devices)
