"""The running devices: one driver and one supervised `DeviceTask` per configured device, started and stopped
one by one (every device at start; a reload those its plan names, agent/config/diff.py).

The runtime (agent/runtime.py) hands it what the devices share: the drivers' context (a Modbus bus, the BLE
scanner: agent/driver.py), the progress watchdog, the failure reporter, and the store writer the processed
readings go to. Its `health`, `drivers` and `tasks` are the same dicts for the daemon's life (the health and
status documents, the metrics and the commands read them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import registry
from agent.driver import Driver, DriverContext, SharedResources
from agent.pipeline.health import DeviceHealth
from agent.pipeline.polling import MAX_BACKOFF, DeviceTask
from agent.pipeline.processing import processor_for

if TYPE_CHECKING:
    from agent.config.base import DeviceConfigBase
    from agent.config.models import FieldgateConfig
    from agent.logsetup import ErrorReporter
    from agent.pipeline.writer import StoreWriter
    from agent.watchdog import ProgressWatchdog

log = logging.getLogger("fieldgate.runtime")


def make_driver(name: str, cfg: DeviceConfigBase, context: DriverContext) -> Driver[Any]:
    """Instantiate the driver of one device (imports its protocol library now, not before)."""
    cls = registry.driver_class(cfg.driver)
    driver: Driver[Any] = cls(name, cfg, context)
    return driver


def make_context(config: FieldgateConfig, config_path: Path) -> DriverContext:
    """What every driver of `config` shares: the resources they share, the buses, the config's folder."""
    return DriverContext(shared=SharedResources(), buses=dict(config.buses), config_dir=config_path.parent)


def watchdog_period(cfg: DeviceConfigBase) -> float:
    """The longest a healthy device task may go without progress: its longest sleep plus one cycle."""
    return max(cfg.poll, MAX_BACKOFF * 1.2) + cfg.cycle_timeout() + 30.0


class Devices:
    """The device tasks of the running config, by device name, in the daemon's task group."""

    def __init__(self, context: DriverContext, watchdog: ProgressWatchdog, reporter: ErrorReporter) -> None:
        self.context = context
        self.watchdog = watchdog
        self.reporter = reporter
        self.health: dict[str, DeviceHealth] = {}
        self.drivers: dict[str, Driver[Any]] = {}
        self.tasks: dict[str, DeviceTask] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}

    def __contains__(self, name: str) -> bool:
        """`name` was started and not stopped since (a driver that could not be imported never starts)."""
        return name in self._runs

    def start(
        self,
        tg: asyncio.TaskGroup,
        name: str,
        cfg: DeviceConfigBase,
        config: FieldgateConfig,
        writer: StoreWriter,
    ) -> None:
        """Build the device's driver and processing and run its task; a driver whose library is missing
        leaves the device failing in its health (logged), never the daemon stopped."""
        health = self.health.setdefault(name, DeviceHealth(driver=cfg.driver))
        try:
            driver = make_driver(name, cfg, self.context)
        except ImportError as exc:
            health.state = "failing"
            health.last_error = (
                f"driver '{cfg.driver}' unavailable: {exc} (install its extra, e.g. fieldgate[ble])"
            )
            log.error("%s: %s", name, health.last_error)
            return
        beat = None
        if driver.stream() is None:  # push devices may be silent for long: their drivers supervise themselves
            self.watchdog.register(name, watchdog_period(cfg))
            beat = functools.partial(self.watchdog.beat, name)
        processor = processor_for(driver, config, writer.put)
        task = DeviceTask(driver, health, processor, self.reporter, beat, writer.polling)
        self.drivers[name] = driver
        self.tasks[name] = task
        self._runs[name] = tg.create_task(task.run(), name=f"device:{name}")

    async def stop(self, name: str) -> None:
        """Stop one device's task (it closes its driver) and forget it: its health, its watchdog entry."""
        run = self._runs.pop(name, None)
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        self.watchdog.unregister(name)
        self.tasks.pop(name, None)
        self.drivers.pop(name, None)
        self.health.pop(name, None)
        self.reporter.forget(name)

    def cancel(self) -> None:
        """The daemon stops: ask every device task to end (each closes its driver); `stopped` waits for them."""
        for run in self._runs.values():
            run.cancel()

    async def stopped(self) -> None:
        await asyncio.gather(*self._runs.values(), return_exceptions=True)

    def poll_now(self, name: str) -> None:
        """Poll `name` at once (the local API); KeyError for an unknown device."""
        self.tasks[name].poll_now()

    def polled_since(self, ts_ms: int) -> bool:
        """A device polled successfully since `ts_ms` (or none is configured): remote upgrade's probation."""
        return not self.health or any((h.last_ok_ts or 0) >= ts_ms for h in self.health.values())
