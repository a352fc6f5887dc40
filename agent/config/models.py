"""The configuration file's models (SPEC §2) and the rules that span sections."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from agent import registry
from agent.config import modelkit
from agent.config.base import DeviceConfigBase, Model
from agent.config.control import CommandsConfig, ScheduleConfig, known_timezone, schedule_problems
from agent.config.migrate import CURRENT_VERSION, version_problem
from agent.config.modelkit import Discriminator, Field, Tag, field_validator, model_validator
from agent.config.units import Duration, Size, duration_field, size_field
from agent.config.urls import redact_url, url_problem

# Characters no name that travels in a topic, a header or a log line may hold (C0 controls, DEL).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TOPIC_PREFIX_MAX = 200  # characters; a whole topic is at most 65535 bytes (MQTT 3.1.1 §1.5.3)


def _no_control(value: str | None, what: str) -> str | None:
    if value is not None and _CONTROL.search(value):
        raise ValueError(f"{what} cannot contain control characters (NUL, ESC, newline...)")
    return value


def topic_prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot start MQTT topic names (None when it can): MQTT 3.1.1 §4.7 forbids the wildcards
    + and # and NUL in a topic name; an empty level (a leading, trailing or doubled /) and a leading $
    (the broker's $SYS topics) are refused too, as mistakes no platform subscription would match."""
    if not prefix:
        return "the topic prefix cannot be empty"
    if len(prefix) > TOPIC_PREFIX_MAX:
        return f"the topic prefix is at most {TOPIC_PREFIX_MAX} characters"
    if "+" in prefix or "#" in prefix:
        return f"'{prefix}': + and # are MQTT wildcards, not allowed in a topic name"
    if _CONTROL.search(prefix):
        return "the topic prefix cannot contain control characters (NUL, ESC, newline...)"
    if prefix.startswith("$"):
        return f"'{prefix}': topics starting with $ are reserved to the broker ($SYS)"
    if "" in prefix.split("/"):
        return f"'{prefix}': empty topic level (a leading, trailing or doubled '/')"
    return None


def listen_problem(listen: str) -> str | None:
    """Why `local.listen` cannot be bound as written (None when it can): HOST:PORT, [V6]:PORT or ""."""
    if listen == "":
        return None
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not port_text.isascii():
        return f"'{listen}': expected HOST:PORT, e.g. 127.0.0.1:8470 (or \"\" to disable)"
    if int(port_text) > 65535:
        return f"'{listen}': the port must be a number from 0 to 65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"'{listen}': '{host}' is not an IPv6 address"
        return None
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
        return f"'{listen}': '{host}' is not an address or host name (an IPv6 address goes in [ ])"
    return None


class Location(Model):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    timezone: str | None = Field(None, description="IANA zone for local schedules, e.g. Europe/Paris")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return known_timezone(value)


class GatewayConfig(Model):
    id: str = Field(max_length=64, description="[a-z0-9_-]+, unique in the fleet; appears in topics")
    name: str | None = Field(None, max_length=200)
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
    max_size: Size = size_field(
        256 * 1000**2,
        "256KiB",
        "1024GiB",
        description="bound on disk (at least 256KiB); past it the oldest unsent readings are evicted",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: full = a stored reading survives a power cut; "
        "normal = faster, a power cut may lose the readings committed since the last WAL checkpoint "
        "(never on kill -9); see docs/STORE.md",
    )
    commit_interval: Duration = duration_field(
        0.2, "10ms", "10s", description="readings are committed in one transaction at most this often"
    )


class TlsConfig(Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(False, description="disable hostname verification (never in production)")


class SparkplugConfig(Model):
    group_id: str = Field(
        "fieldgate", pattern=r"^[^/+#\s\x00-\x1f\x7f]+$", max_length=200, description="Sparkplug group id"
    )
    edge_node_id: str | None = Field(
        None,
        pattern=r"^[^/+#\s\x00-\x1f\x7f]+$",
        max_length=200,
        description="Sparkplug edge node id; default: gateway.id",
    )
    primary_host_id: str | None = Field(
        None,
        pattern=r"^[^/+#\s]+$",
        description="Sparkplug primary host application id: births and data wait for its STATE online",
    )


MQTT_URL = re.compile(r"^mqtts?://[^/\s]+(:\d+)?/?$")


def mqtt_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of one mqtt:// or mqtts:// URL (1883 / 8883 by default)."""
    rest = url.split("://", 1)[1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return rest, 8883 if url.startswith("mqtts://") else 1883


class MqttConfig(Model):
    url: str | list[str] = Field(
        description="the broker, or a list of brokers in order of preference: the first that answers is "
        "used, another within 2 s when it is lost (docs/FLEET.md)"
    )
    failback: Duration = duration_field(
        300.0,
        "1s",
        "30d",
        zero_off=True,
        description="on a broker other than the first of `url`, go back to a preferred one once it has "
        "answered for this long; 0 stays on the broker in use",
    )
    format: Literal["fieldgate", "sparkplug", "thingsboard"] = Field(
        "fieldgate",
        description="payload format: fieldgate (SPEC §3), sparkplug (Sparkplug B), thingsboard (gateway "
        "MQTT API); docs/PLATFORMS.md",
    )
    sparkplug: SparkplugConfig = SparkplugConfig()
    client_id: str | None = Field(None, min_length=1, max_length=256)
    username: str | None = Field(None, max_length=256)
    password_file: Path | None = None
    tls: TlsConfig | None = None
    topic_prefix: str = "fieldgate"
    batch_max: int = Field(500, ge=1, le=10000)
    batch_interval: Duration = duration_field(1.0, "10ms", "10m")
    keepalive: Duration = duration_field(
        30.0,
        "1s",
        "65535s",
        description="MQTT keepalive (whole seconds, the protocol's limit is 65535s); "
        "a silent link is detected within 1.5x this",
    )
    health_interval: Duration = duration_field(60.0, "1s", "1d")
    max_inflight: int = Field(16, ge=1, le=1000, description="telemetry messages awaiting PUBACK at once")
    compression: Literal["none", "gzip"] = Field(
        "none", description="gzip: telemetry bodies gzip-compressed on {p}/telemetry/gz (metered links)"
    )

    @field_validator("url")
    @classmethod
    def _urls(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        if not urls:
            raise ValueError("give at least one broker URL")
        for url in urls:
            problem = url_problem(url, ("mqtt", "mqtts"), "upstream.mqtt.username and password_file")
            if problem is not None:
                raise ValueError(problem if len(urls) == 1 else f"{redact_url(url)}: {problem}")
            if not MQTT_URL.fullmatch(url):
                raise ValueError(f"{redact_url(url)}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if len({u.split("://", 1)[0] for u in urls}) > 1:
            raise ValueError(
                "all mqtt:// or all mqtts://: the brokers of one upstream share its TLS settings"
            )
        if len(set(urls)) < len(urls):
            raise ValueError("a broker is listed twice")
        return value

    @property
    def urls(self) -> list[str]:
        """Every broker, in order of preference (a single `url` is a list of one)."""
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        problem = topic_prefix_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("client_id", "username")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return _no_control(value, "a client id or user name")

    @property
    def host(self) -> str:
        return mqtt_endpoint(self.urls[0])[0]

    @property
    def port(self) -> int:
        return mqtt_endpoint(self.urls[0])[1]

    @property
    def use_tls(self) -> bool:
        return self.urls[0].startswith("mqtts://")


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
    tenant: str | None = Field(
        None, pattern=r"^[!-~]+$", max_length=200, description="NGSILD-Tenant header (printable ASCII)"
    )
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
    batch_interval: Duration = duration_field(1.0, "10ms", "10m")
    timeout: Duration = duration_field(10.0, "100ms", "5m")
    devices: dict[str, NgsiEntityConfig] = Field(default_factory=dict)
    profiles: dict[str, NgsiEntityConfig] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        problem = url_problem(value, ("http", "https"), "token_file (a bearer token read from a file)")
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("context")
    @classmethod
    def _context(cls, value: list[str]) -> list[str]:
        for i, url in enumerate(value):
            problem = url_problem(url, ("http", "https"), "a context URL without credentials")
            if problem is not None:
                raise ValueError(f"context[{i}]: {problem}")
        return value


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

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        problem = listen_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class RemoteConfigConfig(Model):
    """Configuration pushed by the platform on {p}/config/set (docs/CONFIG_LIFECYCLE.md); off by default."""

    enabled: bool = False
    public_key_file: Path | None = Field(
        None, description="Ed25519 public key (PEM); when set, every pushed config must be signed with it"
    )
    rollback_after: Duration = duration_field(
        120.0,
        "1s",
        "1d",
        description="a pushed config that cannot reach the upstream this long is rolled back",
    )
    accept_unbound: bool = Field(
        False,
        description="also accept the old signed form (signature over the config bytes only, not bound to this "
        "gateway nor to a serial: replayable); off by default, for a platform not yet upgraded",
    )


def _bus_tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", ""))
    return str(getattr(value, "type", ""))


def _device_union() -> Any:
    """The devices' models, by their `driver`: every registered driver's, or in the validating child those
    of the drivers its file names (modelkit.only_drivers). The daemon's plain models need no union: it
    rebuilds validated snapshots, which name each model's class (a driver's config module is imported then)."""
    names = modelkit.union_drivers()
    if modelkit.selected() == "plain":
        return DeviceConfigBase
    members = tuple(Annotated[registry.config_class(n), Tag(n)] for n in names)
    return Annotated[Union[members], Discriminator(registry.device_driver)]  # noqa: UP007 - built at run time


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
            unit_id = getattr(device, "unit_id", None)
            bus_type = getattr(self.buses.get(bus), "type", None) if bus is not None else None
            if isinstance(unit_id, int) and unit_id > 247 and bus_type in ("modbus-rtu", "modbus-rtu-tcp"):
                found.append(
                    (
                        ("devices", name, "unit_id"),
                        f"unit id {unit_id} on serial line framing: the Modbus serial line allows 0-247 "
                        "(248-255 are reserved; only Modbus TCP devices use 255)",
                    )
                )
        found.extend(schedule_problems(self))
        return found

    def device_items(self) -> list[tuple[str, DeviceConfigBase]]:
        items: list[tuple[str, DeviceConfigBase]] = list(self.devices.items())
        return [(n, d) for n, d in items if d.enabled]
