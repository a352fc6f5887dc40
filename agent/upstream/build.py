"""Building the upstreams a config names: the main MQTT uplink and `upstream.extra` (MQTT or NGSI-LD).

Each MQTT upstream, the main one or an extra one, is built by the same function, with its password and TLS
context read here (`mqtt_secrets`, one TLS setup for all). The runtime (agent/runtime.py) composes what it
gets: it starts them, feeds them the stored rows and beats the watchdog for them (`watchdog_period`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.errors import FieldgateError
from agent.safefiles import read_regular
from agent.upstream.tls import build_ssl_context, credential_path, explain_tls_error, read_secret

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig, MqttConfig
    from agent.control.commands import CommandProcessor
    from agent.driver import Driver
    from agent.pipeline.store import AsyncStore
    from agent.upstream.contract import Upstream
    from agent.upstream.formats import Catalog, PointInfo
    from agent.upstream.mqtt import Uplink

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
            from agent.upstream.formats.ngsild import EntityMapper, NgsiLdUplink

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
