"""Composition root: config -> store, drivers, device tasks, uplink -> one TaskGroup; clean stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__, registry
from agent.config import FieldgateConfig
from agent.config_base import DeviceConfigBase
from agent.driver import Driver, DriverContext, SharedResources
from agent.errors import FieldgateError, StoreError
from agent.health import DeviceHealth
from agent.reading import Reading, now_ms
from agent.scheduler import DeviceTask
from agent.store import AsyncStore, Store, StoreStats

log = logging.getLogger("fieldgate.runtime")

MEMORY_LIMIT = 200_000  # readings held in memory while the store cannot write (disk full)


def make_driver(name: str, cfg: DeviceConfigBase, context: DriverContext) -> Driver[Any]:
    """Instantiate the driver of one device (imports its protocol library now, not before)."""
    cls = registry.driver_class(cfg.driver)
    driver: Driver[Any] = cls(name, cfg, context)
    return driver


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

    def put(self, readings: list[Reading]) -> None:
        self.pending.extend(readings)
        if len(self.pending) >= 2000:
            self._event.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._event.wait(), self.interval)
            except TimeoutError:
                pass
            self._event.clear()
            await self.flush()
            if self.failing:
                await asyncio.sleep(1.0)  # back off while the disk is full

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            rows = await self.store.append(batch)
        except StoreError as exc:
            if self.failing is None:
                log.error("buffer write failed, holding readings in memory: %s", exc)
            self.failing = str(exc)
            self.pending = batch + self.pending
            if len(self.pending) > MEMORY_LIMIT:
                excess = len(self.pending) - MEMORY_LIMIT
                self.dropped += excess
                del self.pending[:excess]
                log.error("buffer unwritable: %d oldest in-memory readings dropped (total %d)", excess, self.dropped)
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
        self.uplink: Any = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.last_stats: StoreStats | None = None
        self.commands: Any = None
        self.local: Any = None

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
            "devices": {name: h.spec() for name, h in self.health.items()},
        }

    def status(self) -> dict[str, Any]:
        """The local API's /api/status: health plus what a technician needs on site."""
        doc = self.health_doc()
        st = self.last_stats
        writer = self.writer
        doc["gateway"] = {"id": self.config.gateway.id, "name": self.config.gateway.name}
        doc["buffer"].update(
            recovered=st.recovered if st else 0,
            disk_errors=st.disk_errors if st else 0,
            last_error=(writer.failing if writer else None) or (st.last_error if st else None),
            in_memory=len(writer.pending) if writer else 0,
            dropped=writer.dropped if writer else 0,
        )
        up = self.uplink
        if up is not None:
            doc["upstream"].update(
                url=self.config.upstream.mqtt.url,
                last_error=up.last_error,
                since_ts=up.since_ts,
                messages=up.messages,
            )
        doc["devices"] = {name: h.status() for name, h in self.health.items()}
        return doc

    # -- devices -----------------------------------------------------------------------------------------

    def start_device(self, tg: asyncio.TaskGroup, name: str, cfg: DeviceConfigBase) -> None:
        health = self.health.setdefault(name, DeviceHealth(driver=cfg.driver))
        try:
            driver = make_driver(name, cfg, self.context)
        except ImportError as exc:
            health.state = "failing"
            health.last_error = f"driver '{cfg.driver}' unavailable: {exc} (install its extra, e.g. fieldgate[ble])"
            log.error("%s: %s", name, health.last_error)
            return
        assert self.writer is not None
        task = DeviceTask(driver, health, self.writer.put)
        self.drivers[name] = driver
        self.tasks[name] = task
        self._device_runs[name] = tg.create_task(task.run(), name=f"device:{name}")

    async def stop_device(self, name: str) -> None:
        run = self._device_runs.pop(name, None)
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        self.tasks.pop(name, None)
        self.drivers.pop(name, None)
        self.health.pop(name, None)

    async def poll_now(self, device: str) -> None:
        self.tasks[device].poll_now()  # KeyError for an unknown device: the local API answers 404

    async def write(self, device: str, point: str, value: Any, source: str = "local") -> dict[str, Any]:
        """A write from the local API: the same validated path as a platform command."""
        if self.commands is not None:
            result: dict[str, Any] = await self.commands.execute(device, point, value, source=source)
            return result
        driver = self.drivers.get(device)
        if driver is None:
            return {"ok": False, "error": f"unknown device '{device}'"}
        try:
            back = await driver.write(point, value)
        except FieldgateError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "value": back, "ts": now_ms()}

    # -- life cycle --------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        from agent.uplink import Uplink  # aiomqtt is imported only by the daemon

        await self.store.open()
        stats = self.last_stats = await self.store.stats()
        mqtt = self.config.upstream.mqtt
        self.uplink = Uplink(
            mqtt,
            self.config.gateway.id,
            self.store,
            __version__,
            password=self._password(),
            tls_context=self._tls_context(),
            health_doc=self.health_doc,
            next_seq=stats.next_seq,
        )
        self.writer = StoreWriter(self.store, self.config.storage.commit_interval, self.uplink.offer)
        log.info(
            "fieldgate %s started: %d devices, buffer %s (%d pending), upstream %s",
            __version__, len(self.config.devices), self.config.storage.path, stats.pending, mqtt.url,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                for name, cfg in self.config.device_items():
                    self.start_device(tg, name, cfg)
                uplink_task = tg.create_task(self.uplink.run(), name="uplink")
                writer_task = tg.create_task(self.writer.run(), name="store-writer")
                stats_task = tg.create_task(self._refresh_stats(), name="stats")
                await self._start_local()
                self.ready.set()
                await self._stop.wait()
                log.info("stopping: draining readings to disk")
                for run in self._device_runs.values():
                    run.cancel()
                await asyncio.gather(*self._device_runs.values(), return_exceptions=True)
                writer_task.cancel()
                await asyncio.gather(writer_task, return_exceptions=True)
                await self.writer.flush()
                await self.uplink.stop()
                uplink_task.cancel()
                stats_task.cancel()
        finally:
            if self.local is not None:
                await self.local.aclose()
            await self.context.shared.aclose()
            await self.store.close()
            log.info("stopped")

    async def _start_local(self) -> None:
        from agent.localapi import LocalServer

        local = self.config.local
        if not local.listen:
            return
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
            self.last_stats = await self.store.stats()
            await asyncio.sleep(1.0)

    def _password(self) -> str | None:
        pf = self.config.upstream.mqtt.password_file
        if pf is None:
            return None
        return pf.read_text().rstrip("\n")

    def _tls_context(self) -> Any:
        mqtt = self.config.upstream.mqtt
        if not mqtt.use_tls:
            return None
        import ssl

        ctx = ssl.create_default_context(cafile=str(mqtt.tls.ca_file) if mqtt.tls and mqtt.tls.ca_file else None)
        if mqtt.tls and mqtt.tls.cert_file:
            ctx.load_cert_chain(str(mqtt.tls.cert_file), str(mqtt.tls.key_file) if mqtt.tls.key_file else None)
        return ctx
