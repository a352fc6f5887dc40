"""Composition root: config -> store, drivers, device tasks, upstreams -> one TaskGroup; clean stop, reload.

It composes and runs what the stage modules build: the store writer (agent/pipeline/writer.py), one device
task per device (agent/pipeline/polling.py) with its processor, the upstreams (agent/upstream/build.py),
commands, lamp schedules, remote configuration and the local API (agent/control/), and the health and
status documents (agent/pipeline/health.py). A reload applies the plan of agent/config/diff.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, registry
from agent.aio import TaskGroup
from agent.config import validate
from agent.config.base import DeviceConfigBase
from agent.config.diff import describe, plan
from agent.config.models import FieldgateConfig
from agent.config.urls import redact_url
from agent.control.commands import CommandProcessor, commands_db_path
from agent.control.lamp_schedule import Schedules
from agent.control.remoteconfig import RemoteConfig
from agent.control.upgrade import Upgrader
from agent.driver import Driver, DriverContext, SharedResources
from agent.errors import ConfigError, StoreError
from agent.logsetup import ErrorReporter
from agent.pipeline import health as documents
from agent.pipeline import metrics
from agent.pipeline.health import DeviceHealth, Timeline, history_doc
from agent.pipeline.polling import MAX_BACKOFF, DeviceTask
from agent.pipeline.processing import processor_for
from agent.pipeline.reading import now_ms
from agent.pipeline.store import AsyncStore, Store, StoreStats
from agent.pipeline.writer import StoreWriter
from agent.safefiles import file_hash, pid_file, read_regular, warn_loose_secrets, write_private
from agent.sdnotify import Notifier
from agent.upstream import build
from agent.upstream.contract import Upstream
from agent.watchdog import ProgressWatchdog

if TYPE_CHECKING:
    from agent.control.localapi import LocalServer
    from agent.upstream.mqtt import Uplink

log = logging.getLogger("fieldgate.runtime")

STATS_EVERY = 5.0  # seconds between two background reads of the buffer's figures (systemd STATUS=, health)
STATS_FRESH = 0.5  # seconds: a status request reads them again when they are older than this


def make_driver(name: str, cfg: DeviceConfigBase, context: DriverContext) -> Driver[Any]:
    """Instantiate the driver of one device (imports its protocol library now, not before)."""
    cls = registry.driver_class(cfg.driver)
    driver: Driver[Any] = cls(name, cfg, context)
    return driver


def make_context(config: FieldgateConfig, config_path: Path) -> DriverContext:
    return DriverContext(shared=SharedResources(), buses=dict(config.buses), config_dir=config_path.parent)


def _hash_of(path: Path) -> str:
    try:
        return file_hash(read_regular(path))
    except OSError:
        return ""


class Runtime:
    """The running daemon (a `documents.Gateway` for the health and status documents)."""

    def __init__(self, config: FieldgateConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.monotonic()
        self.store = AsyncStore(
            Store(config.storage.path, config.storage.max_size, config.storage.synchronous)
        )
        self.context = make_context(config, config_path)
        self.health: dict[str, DeviceHealth] = {}
        self.drivers: dict[str, Driver[Any]] = {}
        self.tasks: dict[str, DeviceTask] = {}
        self._device_runs: dict[str, asyncio.Task[None]] = {}
        self.writer: StoreWriter | None = None
        self.watchdog = ProgressWatchdog()
        self.upstreams = build.Upstreams(self.store, self.watchdog)
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.last_stats: StoreStats | None = None
        self._stats_at = 0.0
        self.commands: CommandProcessor | None = None
        self.local: LocalServer | None = None
        self.reporter = ErrorReporter()
        self.notifier = Notifier()
        self.reload_error: str | None = None
        # The running config: sha256 of its file's bytes, when and how it was applied (docs/CONFIG_LIFECYCLE.md).
        self.config_hash = _hash_of(config_path)
        self.config_applied_ts = now_ms()
        self.config_source = "file"
        self.reloads = 0  # finished reload attempts (SIGHUP): `fieldgate reload` waits for this to move
        self.reload_ts: int | None = None
        self.remote = RemoteConfig(self)
        self.upgrader = Upgrader(self)  # remote upgrade (control/upgrade.py): on under the launcher only
        self._secrets = build.secrets_fingerprint(config)
        self._tg: asyncio.TaskGroup | None = None
        self.schedules = Schedules()
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self.timeline = Timeline()  # the status page's last hour of backlog and upstream link

    @property
    def uplink(self) -> Uplink | None:
        """The main upstream (`upstream.mqtt`)."""
        return self.upstreams.main

    @property
    def extra_uplinks(self) -> dict[str, Upstream]:
        return self.upstreams.extra

    def health_doc(self) -> dict[str, Any]:
        return documents.health_document(self)

    def status(self) -> dict[str, Any]:
        return documents.status_document(self)

    def summary(self) -> str:
        return documents.summary(self)

    # -- devices ---------------------------------------------------------------------------------------

    def watchdog_period(self, cfg: DeviceConfigBase) -> float:
        """The longest a healthy device task may go without progress: its longest sleep plus one cycle."""
        return max(cfg.poll, MAX_BACKOFF * 1.2) + cfg.cycle_timeout() + 30.0

    def start_device(self, name: str, cfg: DeviceConfigBase) -> None:
        assert self._tg is not None and self.writer is not None
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
            self.watchdog.register(name, self.watchdog_period(cfg))
            beat = functools.partial(self.watchdog.beat, name)
        processor = processor_for(driver, self.config, self.writer.put)
        task = DeviceTask(driver, health, processor, self.reporter, beat, self.writer.polling)
        self.drivers[name] = driver
        self.tasks[name] = task
        self._device_runs[name] = self._tg.create_task(task.run(), name=f"device:{name}")

    async def stop_device(self, name: str) -> None:
        run = self._device_runs.pop(name, None)
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        self.watchdog.unregister(name)
        self.tasks.pop(name, None)
        self.drivers.pop(name, None)
        self.health.pop(name, None)
        self.reporter.forget(name)

    async def poll_now(self, device: str) -> None:
        self.tasks[device].poll_now()  # KeyError for an unknown device: the local API answers 404

    async def write(self, device: str, point: str, value: Any, source: str = "local") -> dict[str, Any]:
        """A write from the local API: the same validated, audited path as a platform command."""
        assert self.commands is not None
        result: dict[str, Any] = await self.commands.execute(device, point, value, source=source)
        return result

    # -- life cycle --------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_reload(self) -> None:
        """SIGHUP: re-read the config file; a bad file changes nothing."""
        if self._tg is not None:
            self._tg.create_task(self.reload_from_file(), name="reload")

    async def run(self) -> None:
        await self.store.open()
        stats = self.last_stats = await self.store.stats()
        db = commands_db_path(self.config.storage.path)
        self.commands = CommandProcessor(db, self.drivers.get, self.health.get, self.config.commands)
        self.commands.open()
        try:  # for `fieldgate reload` (0600); without it, reload by signal
            write_private(pid_file(self.config.storage.path), f"{os.getpid()}\n".encode(), sync=False)
        except OSError as exc:
            log.debug("no pid file: %s", exc)
        warn_loose_secrets(self.config.model_dump(mode="json"))  # a password file readable by others
        log.info(
            "fieldgate %s started: %d devices, buffer %s (%d pending), upstream %s",
            __version__,
            len(self.config.devices),
            self.config.storage.path,
            stats.pending,
            ", ".join(redact_url(u) for u in self.config.upstream.mqtt.urls),
        )
        try:
            async with TaskGroup() as tg:
                self._tg = tg
                self.writer = StoreWriter(
                    self.store, self.config.storage.commit_interval, self.upstreams.offer
                )
                self._start_uplinks(stats.next_seq)
                remote_task = tg.create_task(self.remote.publish_loop(), name="remote-config-state")
                if self.config.remote_config.enabled:
                    self.remote.start()
                upgrade_task = tg.create_task(self.upgrader.publish_loop(), name="upgrade-state")
                if self.upgrader.enabled:
                    self.upgrader.start()
                writer_task = tg.create_task(self._run_writer(), name="store-writer")
                stats_task = tg.create_task(self._refresh_stats(), name="stats")
                for name, cfg in self.config.device_items():
                    self.start_device(name, cfg)
                self._start_schedules()
                await self._start_local()
                watchdog_task = self._start_watchdog()
                self.ready.set()
                self.notifier.ready(status=self.summary())
                await self._stop.wait()
                self.notifier.stopping()
                log.info("stopping: draining readings to disk")
                remote_task.cancel()
                upgrade_task.cancel()
                for run in [*self._device_runs.values(), *self._background]:
                    run.cancel()
                await self.schedules.stop()
                await asyncio.gather(*self._device_runs.values(), return_exceptions=True)
                writer_task.cancel()
                await asyncio.gather(writer_task, return_exceptions=True)
                await self.writer.flush()
                await self.upstreams.stop()
                stats_task.cancel()
                if watchdog_task is not None:
                    watchdog_task.cancel()
        finally:
            self._tg = None
            if self.local is not None:
                await self.local.aclose()
            if self.commands is not None:
                await self.commands.drain()  # a write in progress ends before its bus is closed
            await self.context.shared.aclose()
            if self.commands is not None:
                self.commands.close()
            await self.store.close()
            with contextlib.suppress(OSError):
                pid_file(self.config.storage.path).unlink()
            log.info("stopped")

    async def _run_writer(self) -> None:
        assert self.writer is not None
        self.watchdog.register("store-writer", 120.0)
        self.writer.beat = functools.partial(self.watchdog.beat, "store-writer")
        await self.writer.run()

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = self.notifier.watchdog_interval()
        if interval is None or self._tg is None:
            return None
        return self._tg.create_task(self.watchdog.run(self.notifier, interval / 2), name="watchdog")

    async def _refresh_stats(self) -> None:
        while True:
            await self.refresh()
            self.notifier.status(self.summary())
            await asyncio.sleep(STATS_EVERY)

    async def refresh(self) -> None:
        """Read the buffer's figures again unless they are fresh: every STATS_EVERY in the background, and
        before each status request (the local API), so the status page is never older than STATS_FRESH
        while an idle gateway does not ask its store thread every second."""
        if self.last_stats is None or time.monotonic() - self._stats_at >= STATS_FRESH:
            try:
                self.last_stats = await self.store.stats()
                up = self.uplink
                self.timeline.sample(
                    self.last_stats.pending, bool(up and up.connected), up.connections if up else 0
                )
            except StoreError as exc:  # the figures stay the last known; the writer reports the disk
                log.debug("buffer figures not refreshed: %s", exc)
            self._stats_at = time.monotonic()

    def metrics_text(self) -> bytes:
        """GET /metrics (agent/pipeline/metrics.py)."""
        return metrics.render(self)

    def history(self) -> dict[str, Any]:
        """GET /api/history: the status page's last hour (agent/pipeline/health.py)."""
        return history_doc(self.health, self.timeline)

    # -- upstreams -------------------------------------------------------------------------------------

    def _start_uplinks(self, next_seq: int, secrets: build.Secrets | None = None) -> None:
        from agent.upstream.mqtt import Subscription  # aiomqtt is imported only by the daemon

        assert self._tg is not None
        subscriptions = []
        if self.config.remote_config.enabled:
            subscriptions.append(Subscription(self.remote.topic("set"), self.remote.handle))
        if self.upgrader.enabled:
            subscriptions.append(Subscription(self.upgrader.topic("set"), self.upgrader.handle))
        wiring = build.Wiring(
            self.store,
            self.health_doc,
            self.commands,
            lambda: build.catalog_of(self.drivers),
            lambda: {n: (c.driver, getattr(c, "profile", None)) for n, c in self.config.device_items()},
        )
        secrets = secrets if secrets is not None else build.mqtt_secrets(self.config.upstream.mqtt)
        self._secrets = build.secrets_fingerprint(self.config)
        self.upstreams.start(self._tg, self.config, wiring, next_seq, secrets, subscriptions)

    def upstream_connected(self) -> bool:
        return bool(self.uplink is not None and self.uplink.connected)

    def polled_since(self, ts_ms: int) -> bool:
        """A device polled successfully since `ts_ms` (or none is configured): remote upgrade's probation."""
        return not self.health or any((h.last_ok_ts or 0) >= ts_ms for h in self.health.values())

    def upstream_error(self) -> str | None:
        return self.uplink.last_error if self.uplink is not None else "upstream not started"

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool:
        return self.uplink is not None and await self.uplink.publish(topic, doc, retain=retain)

    # -- control: schedules, local API ---------------------------------------------------------------------

    def _start_schedules(self) -> None:
        assert self._tg is not None and self.commands is not None
        config = self.config
        self.schedules.start(
            self._tg, config.schedules, self.commands, config.gateway, self._publish_schedule_result
        )

    async def _publish_schedule_result(self, doc: dict[str, Any]) -> bool:
        """Schedule actions are reported upstream like command results; False (kept, retried) when offline."""
        return self.uplink is not None and await self.uplink.publish_result(doc)

    async def _start_local(self) -> None:
        local = self.config.local
        if not local.listen:
            return
        from agent.control.localapi import LocalServer  # only when enabled: its imports cost about 0.6 MiB

        server = LocalServer(self, local.listen, local.token_file)
        try:
            await server.start()
        except OSError as exc:  # a busy port must not stop data collection
            log.error("status page not started on %s: %s", local.listen, exc.strerror or exc)
            return
        self.local = server
        log.info("status page on http://%s/", local.listen)

    # -- reload ------------------------------------------------------------------------------------------

    def spawn(self, coro: Any, name: str) -> None:
        """Run `coro` in the daemon's task group; its failure is logged, never the daemon's end."""
        if self._tg is None:
            coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("%s failed", name)

        task = self._tg.create_task(guarded(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload_from_file(self) -> bool:
        self.notifier.reloading()
        try:
            ok = await self._reload_from_file()
        finally:
            # Counted when the outcome is known: `fieldgate reload` reads `reload_error` and the hash as soon
            # as this moves, and the validation (a child process) and the apply both take time.
            self.reloads += 1
            self.reload_ts = now_ms()
        self.notifier.ready(status=self.summary())
        return ok

    async def _reload_from_file(self) -> bool:
        try:
            data = read_regular(self.config_path)
            new = await validate.load(self.config_path)
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [f"{self.config_path}: {exc}"]
            self.reload_error = "; ".join(problems)
            log.error("reload refused, the running configuration is unchanged:")
            for line in problems:
                log.error("  %s", line)
            return False
        try:
            changes = await self.apply_config(new, data, source="file")
        except Exception as exc:  # a secret or certificate that cannot be used: nothing was changed
            self.reload_error = f"reload refused: {exc}"
            log.error("reload refused, the running configuration is unchanged: %s", exc)
            return False
        self.reload_error = None
        log.info("reloaded %s: %s", self.config_path, "; ".join(changes) or "no change")
        if self.config.remote_config.enabled:
            self.remote.running_changed()
        return True

    async def apply_config(self, new: FieldgateConfig, data: bytes, source: str) -> list[str]:
        """Apply a validated config whose file holds `data` (reload, remote config, rollback)."""
        old = self.config
        changes = await self.apply(new)
        for line in describe(old, self.config):
            log.info("config change: %s", line)
        self.config_hash = file_hash(data)
        self.config_applied_ts = now_ms()
        self.config_source = source
        return changes

    async def apply(self, new: FieldgateConfig) -> list[str]:
        """Apply a validated config without a restart: only what changed is stopped and started again."""
        async with self._reload_lock:
            todo = plan(self.config, new, build.secrets_fingerprint(new) != self._secrets)
            # Secrets first: a password or certificate that cannot be used refuses the whole config, before
            # any device is stopped or the running link dropped.
            secrets = build.mqtt_secrets(new.upstream.mqtt) if todo.upstream_changed else None
            if todo.storage_changed:
                log.warning("storage settings changed: they take effect at the next restart")
            for name in sorted(todo.restart):
                await self.stop_device(name)
            for bus in todo.changed_buses:
                await self.context.shared.discard(registry.bus_resource(bus))
            self.context.buses = dict(todo.config.buses)
            self.config = todo.config
            for name, cfg in todo.config.device_items():
                if name not in self._device_runs:
                    self.start_device(name, cfg)
            if todo.upstream_changed:
                self._start_uplinks(await self.upstreams.stop(), secrets)
            if todo.local_changed:
                if self.local is not None:
                    await self.local.aclose()
                    self.local = None
                await self._start_local()
            if todo.schedules_changed:
                await self.schedules.stop()
                assert self.commands is not None
                self.commands.config = todo.config.commands
                self._start_schedules()
            return todo.changes()
