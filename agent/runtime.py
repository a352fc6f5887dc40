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
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, registry
from agent.aio import TaskGroup
from agent.config.diff import plan
from agent.config.models import FieldgateConfig
from agent.config.urls import redact_url
from agent.control import reload
from agent.control.commands import CommandProcessor, commands_db_path
from agent.control.lamp_schedule import Schedules
from agent.control.remoteconfig import RemoteConfig
from agent.control.upgrade import Upgrader
from agent.logsetup import ErrorReporter
from agent.pipeline import health as documents
from agent.pipeline import metrics
from agent.pipeline.devices import Devices, make_context
from agent.pipeline.health import BufferFigures, history_doc
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


def _hash_of(path: Path) -> str:
    try:
        return file_hash(read_regular(path))
    except OSError:
        return ""


class Runtime:
    """The running daemon: its parts, built from the config, run in one task group until `request_stop`.

    It is what the parts it composes read of each other: a `documents.Gateway` (the health and status
    documents), the local API's `StatusSource`, remote configuration's `ConfigHost`, remote upgrade's
    `UpgradeHost` and a reload's `Reloadable` (agent/control/reload.py)."""

    def __init__(self, config: FieldgateConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.monotonic()
        self.store = AsyncStore(
            Store(config.storage.path, config.storage.max_size, config.storage.synchronous)
        )
        self.context = make_context(config, config_path)
        self.watchdog = ProgressWatchdog()
        self.reporter = ErrorReporter()
        self.devices = Devices(self.context, self.watchdog, self.reporter)
        # the devices' own dicts, never rebound: the documents, the metrics and the commands read them
        self.health, self.drivers, self.tasks = self.devices.health, self.devices.drivers, self.devices.tasks
        self.writer: StoreWriter | None = None
        self.upstreams = build.Upstreams(self.store, self.watchdog)
        self.figures = BufferFigures(self.store, lambda: self.upstreams.main)
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.commands: CommandProcessor | None = None
        self.local: LocalServer | None = None
        self.notifier = Notifier()
        # The running config's record (agent/control/reload.py, docs/CONFIG_LIFECYCLE.md): the sha256 of its
        # file's bytes, when and how it was applied, and the outcome of the last reload.
        self.config_hash = _hash_of(config_path)
        self.config_applied_ts = now_ms()
        self.config_source = "file"
        self.reload_error: str | None = None
        self.reloads = 0  # finished reload attempts (SIGHUP): `fieldgate reload` waits for this to move
        self.reload_ts: int | None = None
        self.remote = RemoteConfig(self)
        self.upgrader = Upgrader(self)  # remote upgrade (control/upgrade.py): on under the launcher only
        self._tg: asyncio.TaskGroup | None = None
        self.schedules = Schedules()
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()

    # -- what the parts read: documents (agent/pipeline/health.py, metrics.py), the local API's actions ---

    @property
    def uplink(self) -> Uplink | None:
        """The main upstream (`upstream.mqtt`)."""
        return self.upstreams.main

    @property
    def extra_uplinks(self) -> dict[str, Upstream]:
        return self.upstreams.extra

    @property
    def last_stats(self) -> StoreStats | None:
        return self.figures.last

    def health_doc(self) -> dict[str, Any]:
        return documents.health_document(self)

    def status(self) -> dict[str, Any]:
        return documents.status_document(self)

    def summary(self) -> str:
        return documents.summary(self)

    def metrics_text(self) -> bytes:
        """GET /metrics (agent/pipeline/metrics.py)."""
        return metrics.render(self)

    def history(self) -> dict[str, Any]:
        """GET /api/history: the status page's last hour (agent/pipeline/health.py)."""
        return history_doc(self.health, self.figures.timeline)

    async def refresh(self) -> None:
        await self.figures.refresh()

    async def poll_now(self, device: str) -> None:
        self.devices.poll_now(device)  # KeyError for an unknown device: the local API answers 404

    async def write(self, device: str, point: str, value: Any, source: str = "local") -> dict[str, Any]:
        """A write from the local API: the same validated, audited path as a platform command."""
        assert self.commands is not None
        result: dict[str, Any] = await self.commands.execute(device, point, value, source=source)
        return result

    # -- what remote configuration and remote upgrade use (agent/control/) --------------------------------

    def upstream_connected(self) -> bool:
        return self.upstreams.connected()

    def upstream_error(self) -> str | None:
        return self.upstreams.last_error()

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool:
        return await self.upstreams.publish(topic, doc, retain=retain)

    def polled_since(self, ts_ms: int) -> bool:
        return self.devices.polled_since(ts_ms)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
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
        stats = await self.figures.first()
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
                    self.devices.start(tg, name, cfg, self.config, self.writer)
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
                self.devices.cancel()
                for run in self._background:
                    run.cancel()
                await self.schedules.stop()
                await self.devices.stopped()
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
        await self.figures.run(lambda: self.notifier.status(self.summary()))

    # -- the parts a reload replaces: upstreams, schedules, local API ----------------------------------------

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
            lambda: build.device_kinds(self.config),
        )
        secrets = secrets if secrets is not None else build.mqtt_secrets(self.config.upstream.mqtt)
        self.upstreams.start(self._tg, self.config, wiring, next_seq, secrets, subscriptions)

    def _start_schedules(self) -> None:
        assert self._tg is not None and self.commands is not None
        config = self.config
        self.schedules.start(
            self._tg, config.schedules, self.commands, config.gateway, self.upstreams.publish_result
        )

    async def _start_local(self) -> None:
        if self.config.local.listen:
            from agent.control import localapi  # only when enabled: its imports cost about 0.6 MiB

            self.local = await localapi.serve(self, self.config.local.listen, self.config.local.token_file)

    # -- reload ------------------------------------------------------------------------------------------

    async def reload_from_file(self) -> bool:
        return await reload.reload_from_file(self)

    async def apply_config(self, new: FieldgateConfig, data: bytes, source: str) -> list[str]:
        """Apply a validated config whose file holds `data` (reload, remote config, rollback)."""
        return await reload.apply_config(self, new, data, source)

    async def apply(self, new: FieldgateConfig) -> list[str]:
        """Apply a validated config without a restart: only what changed is stopped and started again
        (the plan of agent/config/diff.py)."""
        async with self._reload_lock:
            todo = plan(self.config, new, self.upstreams.secrets_changed(new))
            # Secrets first: a password or certificate that cannot be used refuses the whole config, before
            # any device is stopped or the running link dropped.
            secrets = build.mqtt_secrets(new.upstream.mqtt) if todo.upstream_changed else None
            if todo.storage_changed:
                log.warning("storage settings changed: they take effect at the next restart")
            for name in sorted(todo.restart):
                await self.devices.stop(name)
            for bus in todo.changed_buses:
                await self.context.shared.discard(registry.bus_resource(bus))
            self.context.buses = dict(todo.config.buses)
            self.config = todo.config
            for name, cfg in todo.config.device_items():
                if name not in self.devices:
                    assert self._tg is not None and self.writer is not None
                    self.devices.start(self._tg, name, cfg, self.config, self.writer)
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
