"""Building and running the upstreams a config names: the main MQTT uplink and `upstream.extra` (MQTT or
NGSI-LD).

Each MQTT upstream, the main one or an extra one, is built by the same function, with its password and TLS
context read here (`mqtt_secrets`, one TLS setup for all). `Upstreams` runs the set of one config: the
runtime (agent/runtime.py) starts it, feeds it the stored rows and replaces it on a reload (when the config
or the contents of its secret files changed); the control side (remote configuration, remote upgrade, lamp
schedules) reaches the platform through its main link.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.aio import TaskGroup
from agent.errors import FieldgateError, StoreError
from agent.safefiles import read_regular
from agent.upstream.tls import build_ssl_context, credential_path, explain_tls_error, read_secret

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig, MqttConfig
    from agent.control.commands import CommandProcessor
    from agent.driver import Driver
    from agent.pipeline.store import AsyncStore, StoredRow
    from agent.upstream.contract import Upstream
    from agent.upstream.formats import Catalog, PointInfo
    from agent.upstream.mqtt import Subscription, Uplink
    from agent.watchdog import ProgressWatchdog

log = logging.getLogger("fieldgate.runtime")

Secrets = tuple[str | None, ssl.SSLContext | None]
NGSI_LD_PERIOD = 120.0  # seconds without progress before the watchdog calls an NGSI-LD sender stalled


@dataclass(frozen=True, slots=True)
class Wiring:
    """What the upstreams need of the rest of the daemon."""

    store: AsyncStore
    health_doc: Callable[[], dict[str, Any]]
    commands: CommandProcessor | None
    catalog: Catalog  # devices and points, for the formats that announce them
    device_kinds: Callable[[], dict[str, tuple[str, str | None]]]  # device -> (driver, profile), NGSI-LD


def catalog_of(drivers: Mapping[str, Driver[Any]]) -> dict[str, list[PointInfo]]:
    """Devices and their points now, for the formats that announce them (Sparkplug births, ThingsBoard)."""
    from agent.upstream.formats import PointInfo

    return {
        name: [PointInfo(p.name, p.type, p.unit, p.writable, p.scaled) for p in driver.points().values()]
        for name, driver in drivers.items()
    }


def device_kinds(config: FieldgateConfig) -> dict[str, tuple[str, str | None]]:
    """Device -> (driver, profile name), for the NGSI-LD entity types; only a Modbus device names a profile."""
    return {name: (cfg.driver, getattr(cfg, "profile", None)) for name, cfg in config.device_items()}


def mqtt_secrets(mqtt: MqttConfig) -> Secrets:
    """Password and TLS context of one MQTT upstream; raises (SecretError, TlsSetupError) before anything
    changes, so a reload with a bad certificate refuses the whole config."""
    password = read_secret(mqtt.password_file) if mqtt.password_file is not None else None
    if not mqtt.use_tls:
        return password, None
    tls = mqtt.tls
    context = build_ssl_context(
        tls.ca_file if tls else None,
        tls.cert_file if tls else None,
        tls.key_file if tls else None,
        insecure=tls.insecure if tls else False,
    )
    return password, context


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


def watchdog_period(mqtt: MqttConfig | None) -> float:
    """The longest a healthy upstream may go without a beat: its health interval or two keepalives, plus a
    minute; an NGSI-LD sender (`mqtt` None) beats at least every NGSI_LD_PERIOD."""
    if mqtt is None:
        return NGSI_LD_PERIOD
    return max(mqtt.health_interval, mqtt.keepalive * 2) + 60.0


def mqtt_uplink(
    mqtt: MqttConfig,
    gateway_id: str,
    wiring: Wiring,
    next_seq: int,
    secrets: Secrets,
    *,
    name: str = "mqtt",
    lane: str | None,
    commands_topic: bool,
) -> Uplink:
    """One MQTT uplink (the main one or an extra one). `commands_topic`: it subscribes to `{p}/commands`."""
    from agent.upstream.mqtt import Uplink  # aiomqtt is imported only by the daemon

    commands = wiring.commands
    password, tls_context = secrets
    return Uplink(
        mqtt,
        gateway_id,
        wiring.store,
        __version__,
        password=password,
        tls_context=tls_context,
        health_doc=wiring.health_doc,
        on_command=commands.handle if commands is not None and commands_topic else None,
        next_seq=next_seq,
        explain_error=functools.partial(explain_tls_error, host=mqtt.host),
        lane=lane,
        name=name,
        catalog=wiring.catalog,
        execute=commands.execute if commands is not None else None,
    )


def main_uplink(config: FieldgateConfig, wiring: Wiring, next_seq: int, secrets: Secrets) -> Uplink:
    """`upstream.mqtt`: its own lane when there are extra upstreams (acks delete at once without)."""
    return mqtt_uplink(
        config.upstream.mqtt,
        config.gateway.id,
        wiring,
        next_seq,
        secrets,
        lane="mqtt" if config.upstream.extra else None,
        commands_topic=True,
    )


def extra_upstreams(config: FieldgateConfig, wiring: Wiring, next_seq: int) -> dict[str, Upstream]:
    """`upstream.extra`: more MQTT brokers (any format) and NGSI-LD brokers, each on its own lane. One whose
    secrets cannot be read is left out (logged): its rows wait in its lane until a reload fixes it."""
    built: dict[str, Upstream] = {}
    for name, extra in config.upstream.extra.items():
        if extra.ngsi_ld is not None:
            from agent.upstream.formats.ngsild import EntityMapper
            from agent.upstream.ngsild_http import NgsiLdUplink

            mapper = EntityMapper(extra.ngsi_ld, config.gateway, wiring.device_kinds)
            built[name] = NgsiLdUplink(name, extra.ngsi_ld, mapper, wiring.store, name, next_seq=next_seq)
            continue
        mqtt = extra.mqtt
        assert mqtt is not None
        try:
            secrets = mqtt_secrets(mqtt)
        except Exception as exc:  # its rows wait in its lane until the secret is fixed (reload)
            log.error("upstream %s not started: %s", name, exc)
            continue
        built[name] = mqtt_uplink(
            mqtt,
            config.gateway.id,
            wiring,
            next_seq,
            secrets,
            name=name,
            lane=name,
            commands_topic=mqtt.format == "fieldgate",
        )
    return built


class Upstreams:
    """The running upstreams of the running config: the main MQTT uplink and the extra ones, in one task.

    `start` builds them (the secrets were read before: a reload refuses a config whose secrets fail), beats
    the watchdog for each, declares their lanes to the buffer and runs them; `stop` stops them cleanly and
    says where seq continues, for the upstreams of the next config."""

    def __init__(self, store: AsyncStore, watchdog: ProgressWatchdog) -> None:
        self.store = store
        self.watchdog = watchdog
        self.main: Uplink | None = None  # `upstream.mqtt`
        self.extra: dict[str, Upstream] = {}  # `upstream.extra`, by name (each its own buffer lane)
        self._run: asyncio.Task[None] | None = None
        self._secrets: str | None = None  # secrets_fingerprint of the config they were started with

    def start(
        self,
        tg: asyncio.TaskGroup,
        config: FieldgateConfig,
        wiring: Wiring,
        next_seq: int,
        secrets: Secrets,
        subscriptions: list[Subscription],
    ) -> None:
        self._secrets = secrets_fingerprint(config)
        self.main = main = main_uplink(config, wiring, next_seq, secrets)
        main.subscriptions.extend(subscriptions)
        self.extra = extra_upstreams(config, wiring, next_seq)
        running: list[Upstream] = [main, *self.extra.values()]
        self.watchdog.register("uplink", watchdog_period(config.upstream.mqtt))
        main.beat = functools.partial(self.watchdog.beat, "uplink")
        for name, up in self.extra.items():
            self.watchdog.register(f"uplink:{name}", watchdog_period(config.upstream.extra[name].mqtt))
            up.beat = functools.partial(self.watchdog.beat, f"uplink:{name}")
        lanes = ["mqtt", *config.upstream.extra]
        self._run = tg.create_task(self._run_all(lanes, running), name="uplink")

    async def _run_all(self, lanes: list[str], running: list[Upstream]) -> None:
        """Declare the lanes to the buffer first (no ack may use a lane it does not know), then run them all."""
        while True:
            try:
                await self.store.set_lanes(lanes)
                break
            except StoreError as exc:
                log.error("upstream lanes not set in the buffer, retrying: %s", exc)
                await asyncio.sleep(1.0)
        async with TaskGroup() as tg:
            for up in running:
                tg.create_task(up.run(), name=f"uplink:{up.name}")

    def secrets_changed(self, config: FieldgateConfig) -> bool:
        """A secret file `config`'s upstream reads is not what the running one read (a rotated certificate)."""
        return secrets_fingerprint(config) != self._secrets

    def connected(self) -> bool:
        """The main uplink is connected (remote config's and remote upgrade's probation wait for it)."""
        return self.main is not None and self.main.connected

    def last_error(self) -> str | None:
        return self.main.last_error if self.main is not None else "upstream not started"

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool:
        """A control document on the main uplink (config and upgrade state); False when it is offline."""
        return self.main is not None and await self.main.publish(topic, doc, retain=retain)

    async def publish_result(self, doc: dict[str, Any]) -> bool:
        """A command-like result (a lamp schedule's action) on the main uplink; False (kept, retried) offline."""
        return self.main is not None and await self.main.publish_result(doc)

    def offer(self, rows: list[StoredRow]) -> None:
        if self.main is not None:
            self.main.offer(rows)
        for up in self.extra.values():
            up.offer(rows)

    async def stop(self) -> int:
        """Stop them cleanly (offline status, acks flushed); returns where seq continues."""
        main, run = self.main, self._run
        for name, extra in self.extra.items():
            await extra.stop()
            self.watchdog.unregister(f"uplink:{name}")
        self.extra = {}
        if main is not None:
            await main.stop()
        # Read after stop(): rows stored while it stopped were offered to it and moved its next seq; the new
        # uplink must see them as backlog, or they would wait in SQLite until the next reconnect.
        next_seq = main.next_seq if main is not None else 1
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        self.main, self._run = None, None
        return next_seq
