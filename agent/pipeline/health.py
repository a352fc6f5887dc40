"""Health figures: per-device state as the scheduler sees it, and the health/status documents built from it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.config.urls import redact_url
from agent.pipeline.reading import Reading, now_ms

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig
    from agent.control.commands import CommandProcessor
    from agent.control.remoteconfig import RemoteConfig
    from agent.pipeline.store import StoreStats
    from agent.pipeline.writer import StoreWriter
    from agent.upstream.contract import Upstream
    from agent.upstream.mqtt import Uplink


@dataclass(slots=True)
class DeviceHealth:
    """What the gateway knows of one device's recent behaviour (SPEC §3 health, plus the status page's extras)."""

    driver: str
    state: str = "unknown"  # "ok" | "failing" | "unknown"
    errors: int = 0
    consecutive_errors: int = 0
    last_ok_ts: int | None = None
    last_error: str | None = None
    last_error_ts: int | None = None
    point_errors: dict[str, str] = field(default_factory=dict)
    last_readings: dict[str, Reading] = field(default_factory=dict)
    cycles: int = 0
    next_attempt_ts: int | None = None  # when a failing device is tried again
    last_progress: float = field(default_factory=time.monotonic)  # monotonic; the watchdog reads it
    counters: dict[str, int] = field(
        default_factory=dict
    )  # driver-specific (frames_ok, bad_checksum, restarts...)

    def spec(self) -> dict[str, Any]:
        """The SPEC §3 per-device health object."""
        return {
            "state": self.state,
            "errors": self.errors,
            "last_ok_ts": self.last_ok_ts,
            "last_error": self.last_error,
        }

    def status(self) -> dict[str, Any]:
        """The richer object of /api/status: the SPEC fields plus last readings and point errors."""
        doc = self.spec()
        doc.update(
            driver=self.driver,
            point_errors=dict(self.point_errors),
            next_attempt_ts=self.next_attempt_ts,
            counters=dict(self.counters),
            readings={
                r.point: {
                    "value": r.value,
                    "unit": r.unit,
                    "ts": r.ts,
                    **({"quality": r.quality} if r.quality else {}),
                }
                for r in self.last_readings.values()
            },
        )
        return doc


class Gateway(Protocol):
    """What the health and status documents read of the running daemon (agent/runtime.py)."""

    @property
    def config(self) -> FieldgateConfig: ...
    @property
    def config_path(self) -> Path: ...
    @property
    def started(self) -> float: ...  # monotonic
    @property
    def last_stats(self) -> StoreStats | None: ...
    @property
    def health(self) -> Mapping[str, DeviceHealth]: ...
    @property
    def writer(self) -> StoreWriter | None: ...
    @property
    def uplink(self) -> Uplink | None: ...
    @property
    def extra_uplinks(self) -> Mapping[str, Upstream]: ...
    @property
    def commands(self) -> CommandProcessor | None: ...
    @property
    def remote(self) -> RemoteConfig: ...
    @property
    def config_hash(self) -> str: ...
    @property
    def config_applied_ts(self) -> int: ...
    @property
    def config_source(self) -> str: ...
    @property
    def reloads(self) -> int: ...
    @property
    def reload_ts(self) -> int | None: ...
    @property
    def reload_error(self) -> str | None: ...


def _buffer_doc(st: StoreStats | None) -> dict[str, Any]:
    return {
        "pending": st.pending if st else 0,
        "oldest_ts": st.oldest_ts if st else None,
        "evicted": st.evicted if st else 0,
        "bytes": st.bytes if st else 0,
    }


def _upstreams_doc(gw: Gateway) -> dict[str, Any]:
    """Compatible extension: every upstream's format, link and lane (pending = not yet acknowledged)."""
    stats = gw.last_stats
    lanes = stats.lanes if stats else {}
    ups: list[tuple[str, Upstream | None]] = [("mqtt", gw.uplink), *gw.extra_uplinks.items()]
    doc: dict[str, Any] = {}
    for name, up in ups:
        if up is None:
            continue
        doc[name] = {
            "format": up.format_name,
            "connected": bool(up.connected),
            "sent": up.sent,
            "pending": lanes.get(name, stats.pending if stats else 0),
            "last_error": up.last_error,
        }
    return doc


def health_document(gw: Gateway) -> dict[str, Any]:
    """SPEC §3 health."""
    up = gw.uplink
    return {
        "ts": now_ms(),
        "uptime_s": int(time.monotonic() - gw.started),
        "version": __version__,
        "buffer": _buffer_doc(gw.last_stats),
        "upstream": {"connected": bool(up and up.connected), "sent": up.sent if up else 0},
        "upstreams": _upstreams_doc(gw),
        "devices": {name: h.spec() for name, h in gw.health.items()},
        # compatible extension (docs/SPEC.md "Compatible extensions: configuration")
        "config": {
            "hash": gw.config_hash,
            "version": gw.config.version,
            "reload_error": gw.reload_error,
        },
    }


def status_document(gw: Gateway) -> dict[str, Any]:
    """The local API's /api/status: health plus what a technician needs on site (docs/STATUS_API.md)."""
    doc = health_document(gw)
    st = gw.last_stats
    writer = gw.writer
    doc["gateway"] = {"id": gw.config.gateway.id, "name": gw.config.gateway.name}
    doc["buffer"].update(
        recovered=st.recovered if st else 0,
        disk_errors=st.disk_errors if st else 0,
        last_error=writer.failing if writer else None,  # cleared once the buffer is writable again
        in_memory=len(writer.pending) if writer else 0,
        dropped=writer.dropped if writer else 0,
    )
    up = gw.uplink
    if up is not None:
        doc["upstream"].update(
            url=redact_url(up.url),  # the broker in use (upstream.mqtt.url may list several)
            failovers=up.failovers,
            last_error=up.last_error,
            since_ts=up.since_ts,
            messages=up.messages,
            connections=up.connections,
        )
    if gw.commands is not None:
        # messages refused before an id could be read (docs/COMMANDS.md)
        doc["commands"] = {"malformed": gw.commands.malformed}
    doc["devices"] = {name: h.status() for name, h in gw.health.items()}
    doc["config"].update(
        path=str(gw.config_path),
        applied_ts=gw.config_applied_ts,
        source=gw.config_source,
        reloads=gw.reloads,
        reload_ts=gw.reload_ts,
        remote={
            "enabled": gw.config.remote_config.enabled,
            "state": gw.remote.state,
        },
    )
    return doc


def summary(gw: Gateway) -> str:
    """One line for systemd's STATUS= and the logs."""
    failing = sum(1 for h in gw.health.values() if h.state == "failing")
    up = "connected" if gw.uplink and gw.uplink.connected else "offline"
    pending = gw.last_stats.pending if gw.last_stats else 0
    return f"{len(gw.health)} devices ({failing} failing), upstream {up}, {pending} readings pending"
