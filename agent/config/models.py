"""The configuration file's models (SPEC §2) and the rules that span sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from agent import registry
from agent.config.base import DeviceConfigBase, Model
from agent.config.migrate import CURRENT_VERSION, version_problem
from agent.config.modelkit import Discriminator, Field, Tag, field_validator, model_validator
from agent.config.units import Duration, Size
from agent.control.commands import CommandsConfig
from agent.control.lamp_schedule import ScheduleConfig, schedule_problems


class Location(Model):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    timezone: str | None = Field(None, description="IANA zone for local schedules, e.g. Europe/Paris")


class GatewayConfig(Model):
    id: str = Field(max_length=64, description="[a-z0-9_-]+, unique in the fleet; appears in topics")
    name: str | None = None
    location: Location | None = None
    clock: Literal["detect", "assume_synced"] = Field(
        "detect",
        description="detect: readings taken before the system clock is synchronised are marked uncertain; "
        "assume_synced: for gateways with a battery-backed RTC (docs/EDGE_PROCESSING.md)",
    )

    @field_validator("id")
    @classmethod
    def _id_chars(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_-]+", value):
            raise ValueError(
                f"'{value}': use lower-case letters, digits, '_' and '-' only (it appears in MQTT topics)"
            )
        return value


class StorageConfig(Model):
    path: Path = Path("/var/lib/fieldgate/buffer.db")
    max_size: Size = Field(
        256 * 1000**2,
        ge=256 * 1024,
        description="bound on disk (at least 256KiB); past it the oldest unsent readings are evicted",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: full = a stored reading survives a power cut; "
        "normal = faster, a power cut may lose the readings committed since the last WAL checkpoint "
        "(never on kill -9); see docs/STORE.md",
    )
    commit_interval: Duration = Field(
        0.2, description="readings are committed in one transaction at most this often"
    )


class TlsConfig(Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(False, description="disable hostname verification (never in production)")


class SparkplugConfig(Model):
    group_id: str = Field("fieldgate", pattern=r"^[^/+#\s]+$", description="Sparkplug group id")
    edge_node_id: str | None = Field(
        None, pattern=r"^[^/+#\s]+$", description="Sparkplug edge node id; default: gateway.id"
    )
    primary_host_id: str | None = Field(
        None,
        pattern=r"^[^/+#\s]+$",
        description="Sparkplug primary host application id: births and data wait for its STATE online",
    )


class MqttConfig(Model):
    url: str = Field(pattern=r"^mqtts?://[^/\s]+(:\d+)?/?$")
    format: Literal["fieldgate", "sparkplug", "thingsboard"] = Field(
        "fieldgate",
        description="payload format: fieldgate (SPEC §3), sparkplug (Sparkplug B), thingsboard (gateway "
        "MQTT API); docs/PLATFORMS.md",
    )
    sparkplug: SparkplugConfig = SparkplugConfig()
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    topic_prefix: str = "fieldgate"
    batch_max: int = Field(500, ge=1, le=10000)
    batch_interval: Duration = 1.0
    keepalive: Duration = Field(
        30.0, description="MQTT keepalive; a silent link is detected within 1.5x this"
    )
    health_interval: Duration = 60.0
    max_inflight: int = Field(16, ge=1, le=1000, description="telemetry messages awaiting PUBACK at once")
    compression: Literal["none", "gzip"] = Field(
        "none", description="gzip: telemetry bodies gzip-compressed on {p}/telemetry/gz (metered links)"
    )

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1].rstrip("/").rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        rest = self.url.split("://", 1)[1].rstrip("/")
        if ":" in rest:
            return int(rest.rsplit(":", 1)[1])
        return 8883 if self.url.startswith("mqtts://") else 1883

    @property
    def use_tls(self) -> bool:
        return self.url.startswith("mqtts://")


class NgsiEntityConfig(Model):
    """How one device (or every device of a profile) becomes an NGSI-LD entity (docs/PLATFORMS.md)."""

    type: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Smart Data Model entity type")
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="point -> attribute; 'attr.KEY' puts the value under KEY of an object value "
        "(e.g. phaseVoltage.L1); points not listed keep their name",
    )
    static: dict[str, Any] = Field(
        default_factory=dict, description="attributes sent with every update (e.g. workingMode: automatic)"
    )
    only_mapped: bool = Field(False, description="send only the points listed in `attributes`")


class NgsiLdConfig(Model):
    url: str = Field(pattern=r"^https?://[^/\s]+(:\d+)?(/[^\s]*)?$", description="the context broker")
    tenant: str | None = Field(None, description="NGSILD-Tenant header")
    token_file: Path | None = Field(None, description="bearer token for the broker (Authorization header)")
    context: list[str] = Field(
        default_factory=lambda: [
            "https://raw.githubusercontent.com/smart-data-models/dataModel.Energy/master/context.jsonld",
            "https://raw.githubusercontent.com/smart-data-models/dataModel.Streetlighting/master/context.jsonld",
            "https://raw.githubusercontent.com/smart-data-models/dataModel.Environment/master/context.jsonld",
            "https://raw.githubusercontent.com/smart-data-models/dataModel.WaterConsumption/master/context.jsonld",
            "https://raw.githubusercontent.com/smart-data-models/dataModel.Device/master/context.jsonld",
            "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld",
        ],
        description="@context of every entity",
    )
    batch_max: int = Field(500, ge=1, le=10000, description="readings per upsert request at most")
    batch_interval: Duration = 1.0
    timeout: Duration = 10.0
    devices: dict[str, NgsiEntityConfig] = Field(default_factory=dict)
    profiles: dict[str, NgsiEntityConfig] = Field(default_factory=dict)


class ExtraUpstreamConfig(Model):
    """One more upstream: an MQTT broker (any format) or an NGSI-LD context broker."""

    mqtt: MqttConfig | None = None
    ngsi_ld: NgsiLdConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ExtraUpstreamConfig:
        if (self.mqtt is None) == (self.ngsi_ld is None):
            raise ValueError("give exactly one of 'mqtt' or 'ngsi_ld'")
        return self


class UpstreamConfig(Model):
    mqtt: MqttConfig
    extra: dict[str, ExtraUpstreamConfig] = Field(
        default_factory=dict,
        description="more upstreams at once, each with its own lane in the buffer (docs/PLATFORMS.md)",
    )

    @field_validator("extra")
    @classmethod
    def _extra_names(cls, value: dict[str, ExtraUpstreamConfig]) -> dict[str, ExtraUpstreamConfig]:
        for name in value:
            if not re.fullmatch(r"[a-z0-9_-]+", name) or name == "mqtt":
                raise ValueError(f"upstream name {name!r}: use [a-z0-9_-]+ (and not 'mqtt', the main one)")
        return value


class LocalConfig(Model):
    listen: str = Field("127.0.0.1:8470", description='status page and JSON API; "" disables')
    token_file: Path | None = None


class RemoteConfigConfig(Model):
    """Configuration pushed by the platform on {p}/config/set (docs/CONFIG_LIFECYCLE.md); off by default."""

    enabled: bool = False
    public_key_file: Path | None = Field(
        None, description="Ed25519 public key (PEM); when set, every pushed config must be signed with it"
    )
    rollback_after: Duration = Field(
        120.0, gt=0, description="a pushed config that cannot reach the upstream this long is rolled back"
    )
    accept_unbound: bool = Field(
        False,
        description="also accept the old signed form (signature over the config bytes only, not bound to this "
        "gateway nor to a serial: replayable); off by default, for a platform not yet upgraded",
    )


def _tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("driver", "modbus"))
    return str(getattr(value, "driver", "modbus"))


def _bus_tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", ""))
    return str(getattr(value, "type", ""))


def _device_union() -> Any:
    members = tuple(Annotated[registry.config_class(n), Tag(n)] for n in registry.DRIVERS)
    return Annotated[Union[members], Discriminator(_tag)]  # noqa: UP007 - built at run time from the registry


def _bus_union() -> Any:
    members = tuple(Annotated[registry.load(p), Tag(n)] for n, p in registry.BUSES.items())
    return Annotated[Union[members], Discriminator(_bus_tag)]  # noqa: UP007


DeviceConfig = _device_union()
BusConfig = _bus_union()


class FieldgateConfig(Model):
    """The whole file."""

    version: int = Field(CURRENT_VERSION, ge=0, description="config format version")
    gateway: GatewayConfig
    storage: StorageConfig = StorageConfig()
    upstream: UpstreamConfig
    local: LocalConfig = LocalConfig()
    buses: dict[str, BusConfig] = Field(default_factory=dict)  # type: ignore[valid-type]
    devices: dict[str, DeviceConfig] = Field(default_factory=dict)  # type: ignore[valid-type]
    commands: CommandsConfig = CommandsConfig()
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    remote_config: RemoteConfigConfig = RemoteConfigConfig()

    @model_validator(mode="before")
    @classmethod
    def _format_version(cls, data: Any) -> Any:
        # Checked before anything else: keys of another format version would only add noise.
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool):
            problem = version_problem(version)
            if problem is not None:
                raise ValueError(problem)
        return data

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Rules that span sections, as (key path, message); the loader adds FILE:LINE:COL."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        for name, device in self.devices.items():
            if not re.fullmatch(r"[A-Za-z0-9_.:-]+", name):
                found.append(
                    (("devices", name), f"device name {name!r}: use letters, digits, '_', '-', '.', ':'")
                )
            bus = getattr(device, "bus", None)
            if bus is not None and bus not in self.buses:
                known = ", ".join(sorted(self.buses)) or "none defined"
                import difflib  # only for this message

                hint = difflib.get_close_matches(bus, list(self.buses), n=1)
                more = f"; did you mean '{hint[0]}'?" if hint else ""
                found.append((("devices", name, "bus"), f"unknown bus '{bus}' (buses: {known}){more}"))
        found.extend(schedule_problems(self))
        return found

    def device_items(self) -> list[tuple[str, DeviceConfigBase]]:
        items: list[tuple[str, DeviceConfigBase]] = list(self.devices.items())
        return [(n, d) for n, d in items if d.enabled]
