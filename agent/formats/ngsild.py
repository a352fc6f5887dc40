"""NGSI-LD upstream: readings -> Smart Data Models entities (normalized), batch upserts to a context broker.

Each device becomes one entity `urn:ngsi-ld:{Type}:{gateway}:{device}` whose attributes are Properties with
`observedAt` and a UN/CEFACT `unitCode`, plus the gateway's `location` (GeoProperty Point) — OASC MIM1/MIM2/MIM7.
The entity type and the point -> attribute names come from `upstream.extra.NAME.ngsi_ld.devices` (per device),
`.profiles` (per profile name), then the built-in defaults below (by profile name, then by driver); a device
matching none is sent as one `DeviceMeasurement` entity per point (the generic model).

Sending: `POST {url}/ngsi-ld/v1/entityOperations/upsert?options=update` with `application/ld+json` (the
@context is in each entity), over the stdlib's asyncio streams. A batch that mentions an entity several times
(several poll cycles) is split into successive requests, each naming an entity once, in time order.
Rows are acknowledged in the lane after a 201/204 (or 207: the entities the broker refused are counted in
`rejected`; sending them again would be refused again). A 400/422 is counted as rejected the same way; a
413 halves the batch; any other answer or a network error is retried with a back-off, nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from agent.config import GatewayConfig, NgsiEntityConfig, NgsiLdConfig
from agent.errors import StoreError
from agent.formats import decode_rows
from agent.reading import now_ms
from agent.store import AsyncStore, StoredRow
from agent.tls import read_secret
from agent.urls import redact_url

log = logging.getLogger("fieldgate.ngsild")

UPSERT_PATH = "/ngsi-ld/v1/entityOperations/upsert?options=update"
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0

UNIT_CODES = {
    "V": "VLT", "A": "AMP", "W": "WTT", "kW": "KWT", "Wh": "WHR", "kWh": "KWH", "Hz": "HTZ",
    "VA": "D46", "VAr": "D44", "var": "D44", "kVAr": "KVR", "kVArh": "K3", "°C": "CEL", "%": "P1", "hPa": "A97", "ppm": "59",
    "ppb": "61", "µg/m³": "GQ", "ug/m3": "GQ", "mg/m³": "GP", "m³": "MTQ", "L": "LTR", "l": "LTR",
    "L/h": "E32", "m³/h": "MQH", "h": "HUR", "lx": "LUX", "m/s": "MTS",
}  # fmt: skip
"""fieldgate units -> UN/CEFACT Rec. 20 common codes (the `unitCode` of the Smart Data Models)."""

RATIO_ATTRIBUTES = {"illuminanceLevel", "relativeHumidity", "thdVoltage", "thdCurrent"}
"""Attributes the models define as 0..1: a point in % is divided by 100."""

REQUIRED = {
    "Streetlight": {"status": "ok"},
    "StreetlightControlCabinet": {"workingMode": "automatic"},
}
"""Required attributes a batch may not carry: the last value sent, else this default (or `static`)."""

DEFAULTS: dict[str, NgsiEntityConfig] = {
    # Every built-in point goes to the model's own attribute (tests/data/sdm: the official schemas); a point
    # the model has no place for (an average, a sum, a burning-hours counter...) is left out (only_mapped):
    # a user who wants it sends it under a name of their choice with `devices:`/`profiles:` mappings.
    "eastron-sdm120": NgsiEntityConfig(
        type="ThreePhaseAcMeasurement",
        attributes={
            "voltage": "phaseVoltage.L1", "current": "current.L1", "active_power": "totalActivePower",
            "apparent_power": "totalApparentPower", "reactive_power": "totalReactivePower",
            "power_factor": "totalPowerFactor", "frequency": "frequency",
            "import_active_energy": "totalActiveEnergyImport", "export_active_energy": "totalActiveEnergyExport",
            "import_reactive_energy": "totalReactiveEnergyImport",
            "export_reactive_energy": "totalReactiveEnergyExport",
        },
        only_mapped=True,
    ),
    "eastron-sdm630": NgsiEntityConfig(
        type="ThreePhaseAcMeasurement",
        attributes={
            **{f"voltage_l{i}": f"phaseVoltage.L{i}" for i in (1, 2, 3)},
            **{f"current_l{i}": f"current.L{i}" for i in (1, 2, 3)},
            **{f"active_power_l{i}": f"activePower.L{i}" for i in (1, 2, 3)},
            **{f"apparent_power_l{i}": f"apparentPower.L{i}" for i in (1, 2, 3)},
            **{f"reactive_power_l{i}": f"reactivePower.L{i}" for i in (1, 2, 3)},
            **{f"power_factor_l{i}": f"powerFactor.L{i}" for i in (1, 2, 3)},
            "voltage_l1_l2": "phaseToPhaseVoltage.L12", "voltage_l2_l3": "phaseToPhaseVoltage.L23",
            "voltage_l3_l1": "phaseToPhaseVoltage.L31",
            "total_active_power": "totalActivePower", "total_apparent_power": "totalApparentPower",
            "total_reactive_power": "totalReactivePower", "total_power_factor": "totalPowerFactor",
            "frequency": "frequency",
            "import_active_energy": "totalActiveEnergyImport", "export_active_energy": "totalActiveEnergyExport",
            "import_reactive_energy": "totalReactiveEnergyImport",
            "export_reactive_energy": "totalReactiveEnergyExport",
        },
        only_mapped=True,
    ),
    "streetlamp-controller": NgsiEntityConfig(
        type="Streetlight",
        attributes={
            "on": "powerState", "dim": "illuminanceLevel", "power": "powerConsumption",
            "energy": "lifetimePowerConsumption", "voltage": "voltage", "lamp_failure": "status",
        },
        only_mapped=True,
    ),
    "senseair-s8": NgsiEntityConfig(type="AirQualityObserved", attributes={"co2": "co2"}, only_mapped=True),
    "sds011": NgsiEntityConfig(
        type="AirQualityObserved", attributes={"pm2_5": "pm25", "pm10": "pm10"}, only_mapped=True
    ),
    "pms5003": NgsiEntityConfig(
        type="AirQualityObserved", attributes={"pm1_0": "pm1", "pm2_5": "pm25", "pm10": "pm10"}, only_mapped=True
    ),
    "mhz19": NgsiEntityConfig(type="AirQualityObserved", attributes={"co2": "co2"}, only_mapped=True),
    "mbus": NgsiEntityConfig(
        type="WaterConsumptionObserved", attributes={"volume": "waterConsumption"}, only_mapped=True
    ),
}  # fmt: skip
"""Defaults by profile name, then by driver name (docs/PLATFORMS.md lists them)."""


def iso(ts_ms: int) -> str:
    """Epoch ms -> ISO 8601 UTC with milliseconds (`observedAt`)."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _convert(attr: str, value: Any, unit: str | None) -> tuple[Any, str | None]:
    """Model-specific value rules: % -> 0..1 ratios, a lamp-failure flag -> Streetlight `status`, an on/off
    flag -> Streetlight `powerState`, a water meter's volume -> whole litres."""
    if (
        attr in RATIO_ATTRIBUTES
        and unit == "%"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        return value / 100, None
    if attr == "status" and isinstance(value, bool):
        return ("defectiveLamp" if value else "ok"), None
    if attr == "waterConsumption" and unit in ("m³", "L", "l") and isinstance(value, int | float):
        # WaterConsumptionObserved wants an integer meter reading; its examples count litres (LTR).
        return round(value * 1000 if unit == "m³" else value), "L"
    if attr == "powerState" and isinstance(value, bool):
        return ("on" if value else "off"), None  # Streetlight's enum: bootingUp, low, off, on
    return value, unit


@dataclass(slots=True)
class _Fragment:
    entity: dict[str, Any]
    seqs: list[int]


class EntityMapper:
    """Readings -> NGSI-LD entity fragments (one per entity and timestamp)."""

    def __init__(
        self,
        cfg: NgsiLdConfig,
        gateway: GatewayConfig,
        device_kinds: Callable[[], dict[str, tuple[str, str | None]]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.device_kinds = device_kinds or dict  # device -> (driver, profile name)
        self.last: dict[str, dict[str, Any]] = {}  # entity id -> required attribute -> last attribute sent
        self.unknown_units: set[str] = set()

    def mapping(self, device: str) -> NgsiEntityConfig | None:
        if device in self.cfg.devices:
            return self.cfg.devices[device]
        driver, profile = self.device_kinds().get(device, ("", None))
        if profile is not None:
            name = profile.rsplit("/", 1)[-1].removesuffix(".yaml")
            if name in self.cfg.profiles:
                return self.cfg.profiles[name]
            if name in DEFAULTS:
                return DEFAULTS[name]
        return DEFAULTS.get(driver)

    def _base(self, type_: str, local_id: str) -> dict[str, Any]:
        entity: dict[str, Any] = {"id": f"urn:ngsi-ld:{type_}:{self.gateway.id}:{local_id}", "type": type_}
        loc = self.gateway.location
        if loc is not None:
            entity["location"] = {
                "type": "GeoProperty",
                "value": {"type": "Point", "coordinates": [loc.longitude, loc.latitude]},
            }
        return entity

    def _property(self, value: Any, ts: int, unit: str | None) -> dict[str, Any]:
        prop: dict[str, Any] = {"type": "Property", "value": value, "observedAt": iso(ts)}
        if unit is not None:
            code = UNIT_CODES.get(unit)
            if code is not None:
                prop["unitCode"] = code
            elif unit not in self.unknown_units:
                self.unknown_units.add(unit)
                log.warning("unit %r has no UN/CEFACT code here: sent without unitCode", unit)
        return prop

    def fragments(self, rows: list[StoredRow]) -> list[_Fragment]:
        """One fragment per (entity, ts), in row order; every row's seq in exactly one fragment (or none:
        a point the mapping leaves out is acknowledged with the fragment before it, see `batch`)."""
        out: dict[tuple[str, int], _Fragment] = {}
        skipped: list[int] = []
        for row, doc in zip(rows, decode_rows(rows), strict=True):
            device, point, ts = str(doc["device"]), str(doc["point"]), int(doc["ts"])
            value, unit = doc.get("value"), doc.get("unit")
            mapping = self.mapping(device)
            if mapping is None:
                key = (f"DeviceMeasurement:{device}:{point}", ts)
                frag = out.get(key)
                if frag is None:
                    entity = self._base("DeviceMeasurement", f"{device}:{point}")
                    entity["refDevice"] = {
                        "type": "Relationship",
                        "object": f"urn:ngsi-ld:Device:{self.gateway.id}:{device}",
                    }
                    entity["controlledProperty"] = {"type": "Property", "value": point}
                    entity["dateObserved"] = {
                        "type": "Property",
                        "value": {"@type": "DateTime", "@value": iso(ts)},
                    }
                    frag = out[key] = _Fragment(entity, [])
                name = (
                    "numValue"
                    if isinstance(value, int | float) and not isinstance(value, bool)
                    else "textValue"
                )
                frag.entity[name] = self._property(value if name == "numValue" else str(value), ts, unit)
                frag.seqs.append(row.seq)
                continue
            attr_path = mapping.attributes.get(point)
            if attr_path is None and (mapping.only_mapped or point.startswith("_")):
                skipped.append(row.seq)  # not part of this model: acknowledged, never sent
                continue
            attr_path = attr_path or point
            key = (f"{mapping.type}:{device}", ts)
            frag = out.get(key)
            if frag is None:
                entity = self._base(mapping.type, device)
                for name, static in mapping.static.items():
                    entity[name] = (
                        static
                        if isinstance(static, dict) and "type" in static
                        else {"type": "Property", "value": static}
                    )
                if mapping.type == "AirQualityObserved":
                    entity["dateObserved"] = {
                        "type": "Property",
                        "value": {"@type": "DateTime", "@value": iso(ts)},
                    }
                frag = out[key] = _Fragment(entity, [])
            attr, _, sub = attr_path.partition(".")
            value, unit = _convert(attr, value, unit)
            if sub:
                prop = frag.entity.setdefault(attr, self._property({}, ts, unit))
                prop["value"][sub] = value
            else:
                frag.entity[attr] = self._property(value, ts, unit)
            frag.seqs.append(row.seq)
        fragments = list(out.values())
        for frag in fragments:
            self._fill_required(frag.entity)
        if skipped:
            if fragments:
                fragments[0].seqs.extend(skipped)
            else:
                fragments.append(_Fragment({}, skipped))  # nothing to send, only to acknowledge
        return fragments

    def _fill_required(self, entity: dict[str, Any]) -> None:
        required = REQUIRED.get(entity["type"], {})
        if not required:
            return
        last = self.last.setdefault(entity["id"], {})
        for name, default in required.items():
            if name in entity:
                last[name] = entity[name]
            elif name in last:
                entity[name] = last[name]
            else:
                entity[name] = {"type": "Property", "value": default}

    def requests(self, rows: list[StoredRow]) -> list[tuple[list[dict[str, Any]], list[int]]]:
        """Upsert bodies (each naming an entity at most once, in time order) with the seqs they carry."""
        layers: list[tuple[list[dict[str, Any]], list[int]]] = []
        depth: dict[str, int] = {}
        for frag in self.fragments(rows):
            if not frag.entity:
                if not layers:
                    layers.append(([], []))
                layers[0][1].extend(frag.seqs)
                continue
            frag.entity["@context"] = list(self.cfg.context)
            level = depth.get(frag.entity["id"], 0)
            depth[frag.entity["id"]] = level + 1
            while len(layers) <= level:
                layers.append(([], []))
            layers[level][0].append(frag.entity)
            layers[level][1].extend(frag.seqs)
        return layers


class HttpError(Exception):
    """The broker answered with a status that means: try again later."""


async def http_post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    deadline_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on its own connection (asyncio streams); returns (status, body)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(deadline_s):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=(ssl_context or ssl.create_default_context()) if https else None
        )
        try:
            head = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            head.append("Connection: close")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
            try:
                status = int(status_line.split(b" ", 2)[1])
            except (IndexError, ValueError):
                raise HttpError(f"not an HTTP answer: {status_line[:80]!r}") from None
            length: int | None = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                data = b""
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
            elif length is not None:
                data = await reader.readexactly(length)
            else:
                data = await reader.read()
            return status, data
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


class NgsiLdUplink:
    """One NGSI-LD context broker, fed from its own lane of the buffer (one request in flight at a time)."""

    def __init__(
        self,
        name: str,
        cfg: NgsiLdConfig,
        mapper: EntityMapper,
        store: AsyncStore,
        lane: str | None,
        *,
        next_seq: int = 1,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.mapper = mapper
        self.store = store
        self.lane = lane
        self.fmt_name = "ngsi-ld"
        self.connected = False
        self.sent = 0
        self.messages = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.since_ts: int | None = None
        self.connections = 0
        self._next_seq = next_seq
        self._cursor = 0
        self._limit = cfg.batch_max
        self._event = asyncio.Event()
        self._stopping = False
        self._unacked: list[int] = []
        self.beat: Callable[[], None] = lambda: None
        self.on_connect: list[Callable[[], None]] = []
        self.url = cfg.url.rstrip("/") + UPSERT_PATH

    def offer(self, rows: list[StoredRow]) -> None:
        if rows:
            self._next_seq = rows[-1].seq + 1
            self._event.set()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/ld+json", "Accept": "application/json"}
        if self.cfg.tenant:
            headers["NGSILD-Tenant"] = self.cfg.tenant
        if self.cfg.token_file is not None:
            headers["Authorization"] = f"Bearer {read_secret(self.cfg.token_file)}"
        return headers

    async def run(self) -> None:
        attempt = 0
        last_send = 0.0
        while not self._stopping:
            self.beat()
            self._event.clear()
            try:
                if self._unacked:
                    await self._ack([])
                rows = await self.store.fetch(self._cursor, None, self._limit, self.lane)
            except StoreError as exc:
                log.error("upstream %s: buffer unreadable, retrying: %s", self.name, exc)
                await asyncio.sleep(1.0)
                continue
            if not rows:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await self._event.wait()
                continue
            wait = self.cfg.batch_interval - (time.monotonic() - last_send)
            if len(rows) < self._limit and wait > 0:
                await asyncio.sleep(wait)  # let a live batch fill up
                continue
            last_send = time.monotonic()
            try:
                await self._send(rows)
            except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError) as exc:
                self._failed(str(exc) or type(exc).__name__)
                delay = min(RECONNECT_MAX, RECONNECT_MIN * (2**attempt)) * random.uniform(0.8, 1.2)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self._cursor = rows[-1].seq
            await self._ack([r.seq for r in rows])

    def _failed(self, message: str) -> None:
        if self.connected:
            log.warning("upstream %s lost: %s", self.name, message)
        elif message != self.last_error:
            log.warning("upstream %s unreachable: %s", self.name, message)
        self.connected = False
        self.last_error = message
        self.since_ts = now_ms()

    async def _ack(self, seqs: list[int]) -> None:
        self._unacked.extend(seqs)
        pending, self._unacked = self._unacked, []
        try:
            await self.store.ack(pending, self.lane)
        except StoreError:
            self._unacked = pending + self._unacked  # retried before the next fetch
            raise

    async def _send(self, rows: list[StoredRow]) -> None:
        for entities, seqs in self.mapper.requests(rows):
            if not entities:
                continue
            body = orjson.dumps(entities)
            status, answer = await http_post(self.url, body, self._headers(), self.cfg.timeout)
            if status == 413 and self._limit > 1:
                self._limit = max(1, self._limit // 2)
                raise HttpError(f"413 request too large: batches reduced to {self._limit} readings")
            if status in (400, 422):
                self.rejected += len(seqs)
                log.error(
                    "upstream %s refused %d entities (%d readings, not sent again): %d %s",
                    self.name,
                    len(entities),
                    len(seqs),
                    status,
                    answer[:500].decode("utf-8", "replace"),
                )
            elif status == 207:
                self._multi_status(answer)
            elif status not in (200, 201, 204):
                raise HttpError(
                    f"HTTP {status} from {redact_url(self.cfg.url)}: {answer[:200].decode('utf-8', 'replace')}"
                )
            self.messages += 1
            self.sent += len(seqs)
            if not self.connected:
                self.connections += 1
                self.connected = True
                self.last_error = None
                self.since_ts = now_ms()
                log.info("upstream %s (ngsi-ld) reached %s", self.name, redact_url(self.cfg.url))
                for hook in self.on_connect:
                    hook()
        self.beat()

    def _multi_status(self, answer: bytes) -> None:
        try:
            errors = orjson.loads(answer).get("errors", [])
        except (orjson.JSONDecodeError, AttributeError):
            errors = []
        if errors:
            self.rejected += len(errors)
            log.error(
                "upstream %s refused %d entities, e.g. %s", self.name, len(errors), str(errors[0])[:300]
            )

    async def stop(self) -> None:
        self._stopping = True
        self._event.set()
        if self._unacked:
            with contextlib.suppress(StoreError):
                await self._ack([])
