"""Composition root: config -> store, drivers, device tasks, uplink -> one TaskGroup; clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__, registry, validate
from agent.aio import TaskGroup
from agent.commands import CommandProcessor, commands_db_path
from agent.config import FieldgateConfig
from agent.config_base import DeviceConfigBase
from agent.driver import Driver, DriverContext, SharedResources
from agent.errors import ConfigError, FieldgateError, StoreError
from agent.health import DeviceHealth
from agent.logsetup import ErrorReporter
from agent.processing import processor_for
from agent.reading import Reading, now_ms
from agent.remoteconfig import RemoteConfig
from agent.safefiles import read_regular, warn_loose_secrets, write_private
from agent.schedule import ScheduleRunner
from agent.scheduler import MAX_BACKOFF, DeviceTask
from agent.sdnotify import Notifier
from agent.store import AsyncStore, Store, StoreStats
from agent.tls import build_ssl_context, credential_path, explain_tls_error, read_secret
from agent.urls import redact_url
from agent.validate import file_hash
from agent.watchdog import ProgressWatchdog

log = logging.getLogger("fieldgate.runtime")

MEMORY_LIMIT = 200_000  # readings held in memory while the store cannot write (disk full)
IDLE_BEAT = 5.0  # seconds: with nothing to commit, the store writer still beats the watchdog this often
STATS_EVERY = 5.0  # seconds between two background reads of the buffer's figures (systemd STATUS=, health)
STATS_FRESH = 0.5  # seconds: a status request reads them again when they are older than this


def make_driver(name: str, cfg: DeviceConfigBase, context: DriverContext) -> Driver[Any]:
    """Instantiate the driver of one device (imports its protocol library now, not before)."""
    cls = registry.driver_class(cfg.driver)
    driver: Driver[Any] = cls(name, cfg, context)
    return driver


def prefetch(config_path: Path) -> None:
    """Import what the daemon will need for this file while its validation runs in the child: the uplink
    (aiomqtt) and the drivers the text names (`driver: NAME`, or a Modbus bus type). A guess, from the text
    without its comments: a driver missed is imported when its device starts, as without this."""
    import re

    from agent import uplink as _  # noqa: F401 - imported for its cost, now

    try:
        text = "\n".join(line.split("#", 1)[0] for line in read_regular(config_path).decode().splitlines())
    except (OSError, UnicodeError):
        return
    for name in registry.DRIVERS:
        wanted = rf"\bdriver:\s*['\"]?{re.escape(name)}\b" if name != "modbus" else r"\btype:\s*['\"]?modbus-"
        if re.search(wanted, text):
            with contextlib.suppress(Exception):  # a broken install is reported when the device starts
                registry.driver_class(name)


def _hash_of(path: Path) -> str:
    try:
        return file_hash(read_regular(path))
    except OSError:
        return ""


def secrets_fingerprint(config: FieldgateConfig) -> str:
    """A digest of the upstream's secret files' contents: a reload reconnects when a certificate was rotated
    even though the config text is the same (docs/OPERATIONS.md, rotation)."""
    mqtt = config.upstream.mqtt
    tls = mqtt.tls
    digest = hashlib.sha256()
    files = [mqtt.password_file, *((tls.ca_file, tls.cert_file, tls.key_file) if tls else ())]
    for f in files:
        if f is None:
            digest.update(b"-")
            continue
        try:
            digest.update(hashlib.sha256(read_regular(credential_path(f))).digest())
        except (OSError, FieldgateError) as exc:
            digest.update(str(exc).encode())
    return digest.hexdigest()


def make_context(config: FieldgateConfig, config_path: Path) -> DriverContext:
    return DriverContext(shared=SharedResources(), buses=dict(config.buses), config_dir=config_path.parent)


class StoreWriter:
    """Collects readings from every device and commits them in batches; hands the stored rows to the uplink."""

    def __init__(self, store: AsyncStore, interval: float, on_stored: Callable[[list[Any]], None]) -> None:
        self.store = store
        self.interval = interval
        self.on_stored = on_stored
        self.pending: list[Reading] = []
        self.dropped = 0  # readings lost because the store failed for too long (memory bound)
        self._event = asyncio.Event()
        self.failing: str | None = None
        self.beat: Callable[[], None] = lambda: None
        self._last_flush = 0.0
        self._polls = 0  # device polls under way: readings of the same tick are still coming

    def polling(self, started: bool) -> None:
        """A device poll starts or ends (scheduler): the last one of a tick lets the tick's readings go."""
        self._polls += 1 if started else -1
        if not started and self._polls == 0 and self.pending:
            self._event.set()

    def put(self, readings: list[Reading]) -> None:
        was_empty = not self.pending
        self.pending.extend(readings)
        if was_empty or len(self.pending) >= 2000:
            self._event.set()

    async def run(self) -> None:
        """Commit at most every `interval`; readings arriving after a quiet spell are committed at once.

        Leading edge rather than a fixed tick: the first reading after start (or after a pause) is not
        held for up to `interval`, and an idle gateway does not wake up five times a second for nothing.
        After the very first commit, readings arriving after a pause wait while other devices are still
        being polled (at most `interval`): the devices of one poll tick are committed in one transaction.
        """
        while True:
            if not self.pending:
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_BEAT):  # woken by the first put()
                        await self._event.wait()
            wait = self._last_flush + self.interval - time.monotonic()
            if wait > 0 and len(self.pending) < 2000:
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # woken early only when 2000 readings wait
                        await self._event.wait()
            elif self._last_flush and self._polls > 0 and len(self.pending) < 2000:
                # Other devices of the same tick are still being read: commit when the last one is done
                # (polling(False)), or after `interval` at most.
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        while self._polls > 0 and len(self.pending) < 2000:
                            await self._event.wait()
                            self._event.clear()
            self._event.clear()
            await self.flush()
            self._last_flush = time.monotonic()
            self.beat()
            if self.failing:
                await asyncio.sleep(1.0)  # back off while the disk is full

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            # Shielded: a stop cancels the writer task, and a commit still queued behind another store call
            # on the store's thread would be dropped with `batch` (found by the config property test: a
            # reading polled just before SIGTERM was never stored). Its rows reach the uplink as backlog.
            rows = await asyncio.shield(self.store.append(batch))
        except StoreError as exc:
            if self.failing is None:
                log.error("buffer write failed, holding readings in memory: %s", exc)
            self.failing = str(exc)
            self.pending = batch + self.pending
            if len(self.pending) > MEMORY_LIMIT:
                excess = len(self.pending) - MEMORY_LIMIT
                self.dropped += excess
                del self.pending[:excess]
                log.error(
                    "buffer unwritable: %d oldest in-memory readings dropped (total %d)", excess, self.dropped
                )
            return
        if self.failing is not None:
            log.warning("buffer writable again")
            self.failing = None
        self.on_stored(rows)


class Runtime:
    """The running daemon."""

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
        self.uplink: Any = None  # the main upstream (`upstream.mqtt`)
        self.extra_uplinks: dict[str, Any] = {}  # `upstream.extra`, by name (each its own buffer lane)
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.last_stats: StoreStats | None = None
        self._stats_at = 0.0
        self.commands: CommandProcessor | None = None
        self.local: Any = None
        self.reporter = ErrorReporter()
        self.watchdog = ProgressWatchdog()
        self.notifier = Notifier()
        self.reload_error: str | None = None
        # The running config: sha256 of its file's bytes, when and how it was applied (docs/CONFIG_LIFECYCLE.md).
        self.config_hash = _hash_of(config_path)
        self.config_applied_ts = now_ms()
        self.config_source = "file"
        self.reloads = 0  # finished reload attempts (SIGHUP): `fieldgate reload` waits for this to move
        self.reload_ts: int | None = None
        self.remote = RemoteConfig(self)
        self._secrets = secrets_fingerprint(config)
        self._tg: asyncio.TaskGroup | None = None
        self._uplink_run: asyncio.Task[None] | None = None
        self._schedule_runs: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()

    # -- documents ---------------------------------------------------------------------------------------

    def _buffer_doc(self) -> dict[str, Any]:
        st = self.last_stats
        doc: dict[str, Any] = {
            "pending": st.pending if st else 0,
            "oldest_ts": st.oldest_ts if st else None,
            "evicted": st.evicted if st else 0,
            "bytes": st.bytes if st else 0,
        }
        return doc

    def health_doc(self) -> dict[str, Any]:
        """SPEC §3 health."""
        up = self.uplink
        return {
            "ts": now_ms(),
            "uptime_s": int(time.monotonic() - self.started),
            "version": __version__,
            "buffer": self._buffer_doc(),
            "upstream": {"connected": bool(up and up.connected), "sent": up.sent if up else 0},
            "upstreams": self._upstreams_doc(),
            "devices": {name: h.spec() for name, h in self.health.items()},
            # compatible extension (docs/SPEC.md "Compatible extensions: configuration")
            "config": {
                "hash": self.config_hash,
                "version": self.config.version,
                "reload_error": self.reload_error,
            },
        }

    def _upstreams_doc(self) -> dict[str, Any]:
        """Compatible extension: every upstream's format, link and lane (pending = not yet acknowledged)."""
        lanes = self.last_stats.lanes if self.last_stats else {}
        doc: dict[str, Any] = {}
        for name, up in [("mqtt", self.uplink), *self.extra_uplinks.items()]:
            if up is None:
                continue
            fmt = getattr(up, "fmt_name", None) or up.fmt.name
            doc[name] = {
                "format": fmt,
                "connected": bool(up.connected),
                "sent": up.sent,
                "pending": lanes.get(name, self.last_stats.pending if self.last_stats else 0),
                "last_error": up.last_error,
            }
        return doc

    def status(self) -> dict[str, Any]:
        """The local API's /api/status: health plus what a technician needs on site."""
        doc = self.health_doc()
        st = self.last_stats
        writer = self.writer
        doc["gateway"] = {"id": self.config.gateway.id, "name": self.config.gateway.name}
        doc["buffer"].update(
            recovered=st.recovered if st else 0,
            disk_errors=st.disk_errors if st else 0,
            last_error=writer.failing if writer else None,  # cleared once the buffer is writable again
            in_memory=len(writer.pending) if writer else 0,
            dropped=writer.dropped if writer else 0,
        )
        up = self.uplink
        if up is not None:
            doc["upstream"].update(
                url=redact_url(up.url),  # the broker in use (upstream.mqtt.url may list several)
                failovers=up.failovers,
                last_error=up.last_error,
                since_ts=up.since_ts,
                messages=up.messages,
                connections=up.connections,
            )
        if self.commands is not None:
            # messages refused before an id could be read (docs/COMMANDS.md)
            doc["commands"] = {"malformed": self.commands.malformed}
        doc["devices"] = {name: h.status() for name, h in self.health.items()}
        doc["config"].update(
            path=str(self.config_path),
            applied_ts=self.config_applied_ts,
            source=self.config_source,
            reloads=self.reloads,
            reload_ts=self.reload_ts,
            remote={
                "enabled": self.config.remote_config.enabled,
                "state": self.remote.state,
            },
        )
        return doc

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
        task = DeviceTask(
            driver,
            health,
            processor_for(driver, self.config, self.writer.put),
            self.reporter,
            beat,
            self.writer.polling,
        )
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
        self.commands = CommandProcessor(
            commands_db_path(self.config.storage.path),
            self.drivers.get,
            self.health.get,
            self.config.commands,
        )
        self.commands.open()
        self._write_pidfile()
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
                self.writer = StoreWriter(self.store, self.config.storage.commit_interval, self._offer)
                self._start_uplink(stats.next_seq)
                remote_task = tg.create_task(self.remote.publish_loop(), name="remote-config-state")
                if self.config.remote_config.enabled:
                    self.remote.start()
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
                for run in [*self._device_runs.values(), *self._schedule_runs, *self._background]:
                    run.cancel()
                await asyncio.gather(
                    *self._device_runs.values(), *self._schedule_runs, return_exceptions=True
                )
                writer_task.cancel()
                await asyncio.gather(writer_task, return_exceptions=True)
                await self.writer.flush()
                await self._stop_uplink()
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
            self._remove_pidfile()
            log.info("stopped")

    def summary(self) -> str:
        """One line for systemd's STATUS= and the logs."""
        failing = sum(1 for h in self.health.values() if h.state == "failing")
        up = "connected" if self.uplink and self.uplink.connected else "offline"
        pending = self.last_stats.pending if self.last_stats else 0
        return f"{len(self.health)} devices ({failing} failing), upstream {up}, {pending} readings pending"

    def _offer(self, rows: list[Any]) -> None:
        if self.uplink is not None:
            self.uplink.offer(rows)
        for up in self.extra_uplinks.values():
            up.offer(rows)

    def _catalog(self) -> dict[str, Any]:
        """Devices and their points now, for the formats that announce them (Sparkplug births, ThingsBoard)."""
        from agent.formats import PointInfo

        def scaled(driver: Any, point: str) -> bool:
            # A Modbus point's scale/offset (its points() gives the register type): engineering floats.
            spec = getattr(driver, "_points", {}).get(point)
            return getattr(spec, "scale", 1.0) != 1.0 or getattr(spec, "offset", 0.0) != 0.0

        return {
            name: [
                PointInfo(p.name, p.type, p.unit, p.writable, scaled(driver, p.name))
                for p in driver.points().values()
            ]
            for name, driver in self.drivers.items()
        }

    def _device_kinds(self) -> dict[str, tuple[str, str | None]]:
        return {n: (c.driver, getattr(c, "profile", None)) for n, c in self.config.device_items()}

    def _make_extra_uplinks(self, next_seq: int) -> None:
        """`upstream.extra`: more MQTT brokers (any format) and NGSI-LD brokers, each on its own lane."""
        from agent.formats.ngsild import EntityMapper, NgsiLdUplink
        from agent.uplink import Uplink

        execute = self.commands.execute if self.commands is not None else None
        for name, extra in self.config.upstream.extra.items():
            up: Any
            if extra.ngsi_ld is not None:
                mapper = EntityMapper(extra.ngsi_ld, self.config.gateway, self._device_kinds)
                up = NgsiLdUplink(name, extra.ngsi_ld, mapper, self.store, name, next_seq=next_seq)
                period = 120.0
            else:
                mqtt = extra.mqtt
                assert mqtt is not None
                try:
                    password = read_secret(mqtt.password_file) if mqtt.password_file is not None else None
                    tls = mqtt.tls
                    tls_context = (
                        build_ssl_context(
                            tls.ca_file if tls else None,
                            tls.cert_file if tls else None,
                            tls.key_file if tls else None,
                            insecure=tls.insecure if tls else False,
                        )
                        if mqtt.use_tls
                        else None
                    )
                except Exception as exc:  # its rows wait in its lane until the secret is fixed (reload)
                    log.error("upstream %s not started: %s", name, exc)
                    continue
                up = Uplink(
                    mqtt,
                    self.config.gateway.id,
                    self.store,
                    __version__,
                    password=password,
                    tls_context=tls_context,
                    health_doc=self.health_doc,
                    on_command=self.commands.handle
                    if self.commands is not None and mqtt.format == "fieldgate"
                    else None,
                    next_seq=next_seq,
                    explain_error=functools.partial(explain_tls_error, host=mqtt.host),
                    lane=name,
                    name=name,
                    catalog=self._catalog,
                    execute=execute,
                )
                period = max(mqtt.health_interval, mqtt.keepalive * 2) + 60.0
            self.watchdog.register(f"uplink:{name}", period)
            up.beat = functools.partial(self.watchdog.beat, f"uplink:{name}")
            self.extra_uplinks[name] = up

    async def _run_uplinks(self, lanes: list[str], uplinks: list[Any]) -> None:
        """Declare the lanes to the buffer first (no ack may use a lane it does not know), then run them all."""
        while True:
            try:
                await self.store.set_lanes(lanes)
                break
            except StoreError as exc:
                log.error("upstream lanes not set in the buffer, retrying: %s", exc)
                await asyncio.sleep(1.0)
        async with TaskGroup() as tg:
            for up in uplinks:
                tg.create_task(up.run(), name=f"uplink:{up.name}")

    def _start_uplink(self, next_seq: int, secrets: tuple[str | None, Any] | None = None) -> None:
        from agent.uplink import Subscription, Uplink  # aiomqtt is imported only by the daemon

        assert self._tg is not None
        mqtt = self.config.upstream.mqtt
        password, tls_context = secrets if secrets is not None else self._uplink_secrets(self.config)
        self._secrets = secrets_fingerprint(self.config)
        self.uplink = Uplink(
            mqtt,
            self.config.gateway.id,
            self.store,
            __version__,
            password=password,
            tls_context=tls_context,
            health_doc=self.health_doc,
            on_command=self.commands.handle if self.commands is not None else None,
            next_seq=next_seq,
            explain_error=functools.partial(explain_tls_error, host=mqtt.host),
            lane="mqtt" if self.config.upstream.extra else None,
            catalog=self._catalog,
            execute=self.commands.execute if self.commands is not None else None,
        )
        if self.config.remote_config.enabled:
            self.uplink.subscriptions.append(Subscription(self.remote.topic("set"), self.remote.handle))
        self.watchdog.register("uplink", max(mqtt.health_interval, mqtt.keepalive * 2) + 60.0)
        self.uplink.beat = functools.partial(self.watchdog.beat, "uplink")
        self._make_extra_uplinks(next_seq)
        lanes = ["mqtt", *self.config.upstream.extra]
        uplinks = [self.uplink, *self.extra_uplinks.values()]
        self._uplink_run = self._tg.create_task(self._run_uplinks(lanes, uplinks), name="uplink")

    async def _stop_uplink(self) -> int:
        """Stop the uplink cleanly (offline status, acks flushed); returns where seq continues."""
        up, run = self.uplink, self._uplink_run
        for name, extra in self.extra_uplinks.items():
            await extra.stop()
            self.watchdog.unregister(f"uplink:{name}")
        self.extra_uplinks = {}
        if up is not None:
            await up.stop()
        # Read after stop(): rows stored while it stopped were offered to it and moved its next seq; the new
        # uplink must see them as backlog, or they would wait in SQLite until the next reconnect.
        next_seq: int = up._next_seq if up is not None else 1
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        self.uplink, self._uplink_run = None, None
        return next_seq

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

    def _start_schedules(self) -> None:
        assert self._tg is not None and self.commands is not None
        for name, cfg in self.config.schedules.items():
            runner = ScheduleRunner.from_config(
                name, cfg, self.commands, self.config.gateway, on_result=self._publish_schedule_result
            )
            self._schedule_runs.append(self._tg.create_task(runner.run(), name=f"schedule:{name}"))

    async def _stop_schedules(self) -> None:
        for run in self._schedule_runs:
            run.cancel()
        await asyncio.gather(*self._schedule_runs, return_exceptions=True)
        self._schedule_runs = []

    async def _publish_schedule_result(self, doc: dict[str, Any]) -> bool:
        """Schedule actions are reported upstream like command results; False (kept, retried) when offline."""
        return self.uplink is not None and await self.uplink.publish_result(doc)

    async def _start_local(self) -> None:
        local = self.config.local
        if not local.listen:
            return
        from agent.localapi import LocalServer  # only when enabled: its imports cost about 0.6 MiB

        server = LocalServer(self, local.listen, local.token_file)
        try:
            await server.start()
        except OSError as exc:  # a busy port must not stop data collection
            log.error("status page not started on %s: %s", local.listen, exc.strerror or exc)
            return
        self.local = server
        log.info("status page on http://%s/", local.listen)

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
            except StoreError as exc:  # the figures stay the last known; the writer reports the disk
                log.debug("buffer figures not refreshed: %s", exc)
            self._stats_at = time.monotonic()

    def _uplink_secrets(self, config: FieldgateConfig) -> tuple[str | None, Any]:
        """Password and TLS context for `config`; raises (SecretError, TlsSetupError) before anything changes."""
        return self._password(config), self._tls_context(config)

    def _password(self, config: FieldgateConfig) -> str | None:
        pf = config.upstream.mqtt.password_file
        return read_secret(pf) if pf is not None else None

    def _tls_context(self, config: FieldgateConfig) -> Any:
        mqtt = config.upstream.mqtt
        if not mqtt.use_tls:
            return None
        tls = mqtt.tls
        return build_ssl_context(
            tls.ca_file if tls else None,
            tls.cert_file if tls else None,
            tls.key_file if tls else None,
            insecure=tls.insecure if tls else False,
        )

    # -- pid file (for `fieldgate reload`) ---------------------------------------------------------------

    def pidfile(self) -> Path:
        return self.config.storage.path.with_name("fieldgate.pid")

    def _write_pidfile(self) -> None:
        try:
            write_private(self.pidfile(), f"{os.getpid()}\n".encode(), sync=False)  # 0600
        except OSError as exc:
            log.debug("no pid file: %s", exc)

    def _remove_pidfile(self) -> None:
        with contextlib.suppress(OSError):
            self.pidfile().unlink()

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

    def upstream_connected(self) -> bool:
        return bool(self.uplink is not None and self.uplink.connected)

    def upstream_error(self) -> str | None:
        return self.uplink.last_error if self.uplink is not None else "upstream not started"

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool:
        if self.uplink is None:
            return False
        ok: bool = await self.uplink.publish(topic, doc, retain=retain)
        return ok

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
        from agent.configdiff import describe

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
            return await self._apply(new)

    async def _apply(self, new: FieldgateConfig) -> list[str]:
        old, changes = self.config, []
        upstream_changed = (
            new.upstream != old.upstream
            or new.gateway.id != old.gateway.id
            or new.remote_config != old.remote_config  # the config/set subscription is the uplink's
            or secrets_fingerprint(new) != self._secrets
        )
        # Secrets first: a password or certificate that cannot be used refuses the whole config, before any
        # device is stopped or the running link dropped.
        secrets = self._uplink_secrets(new) if upstream_changed else None
        if new.storage != old.storage:
            log.warning("storage settings changed: they take effect at the next restart")
            changes.append("storage (at next restart)")
            new = new.model_copy(update={"storage": old.storage})
        changed_buses = {n for n in set(old.buses) | set(new.buses) if old.buses.get(n) != new.buses.get(n)}
        old_devices = dict(old.device_items())
        new_devices = dict(new.device_items())
        restart: set[str] = set()
        for name, cfg in old_devices.items():
            if (
                name not in new_devices
                or new_devices[name] != cfg
                or getattr(cfg, "bus", None) in changed_buses
            ):
                restart.add(name)
        for name in sorted(restart):
            await self.stop_device(name)
        for bus in changed_buses:
            await self.context.shared.discard(("modbus-bus", bus))
        self.context.buses = dict(new.buses)
        self.config = new
        for name in sorted(set(new_devices) - set(old_devices)):
            changes.append(f"device {name} added")
        for name in sorted(restart):
            changes.append(f"device {name} {'changed' if name in new_devices else 'removed'}")
        for name, cfg in new_devices.items():
            if name not in self._device_runs:
                self.start_device(name, cfg)
        if upstream_changed:
            next_seq = await self._stop_uplink()
            self._start_uplink(next_seq, secrets)
            changes.append("upstream reconnected")
        if new.local != old.local:
            if self.local is not None:
                await self.local.aclose()
                self.local = None
            await self._start_local()
            changes.append("local API restarted")
        if new.schedules != old.schedules or new.commands != old.commands or new.gateway != old.gateway:
            await self._stop_schedules()
            assert self.commands is not None
            self.commands.config = new.commands
            self._start_schedules()
            changes.append("schedules restarted")
        return changes
