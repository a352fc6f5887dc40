"""Bytes sent upstream per hour by one realistic cabinet, with and without edge processing and compression.

The cabinet: a three-phase meter (the eastron-sdm630 profile, polled every 10 s),
20 street lamps (the streetlamp-controller profile, every 30 s) and an SDS011 air
sensor (every 5 min), at night with the lamps on. Value series are simulated
(seeded), decoded through the real Modbus codec, then run through the real
processing (agent/pipeline/processing.py) and the real payload encoding (agent/upstream/payloads.py)
with the uplink's batching (one message per second of readings, at most
`batch_max`), for one simulated hour: no wall clock, no sockets.

Run: .venv/bin/python -m bench.bench_bandwidth [--quick]
Prints one JSON object, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from agent.config.base import DeviceConfigBase
from agent.pipeline.clock import FixedClock
from agent.pipeline.processing import WINDOW_GRACE_MS, DeviceProcessor
from agent.pipeline.reading import Reading, Value
from agent.upstream import payloads
from drivers.modbus import codec
from drivers.modbus.config import ModbusDeviceConfig, ModbusPoint
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.profile import load_profile, merge_profile

GATEWAY = "gw-lyon-0042"
PREFIX = "fieldgate"
T0 = 1_767_222_000_000  # 2025-12-31 23:00 UTC: a night hour, lamps on
BATCH_MAX = 500
# Per-message costs beyond the MQTT packet, for the "wire" estimate (documented in docs/EDGE_PROCESSING.md):
TLS_RECORD = 29  # TLS 1.2/1.3 AEAD record header + tag (+ nonce), per record
TCP_IP = 40  # IPv4 + TCP headers per segment (no options)
MSS = 1400


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    meter: dict[str, Any]
    lamp: dict[str, Any]
    air: dict[str, Any]
    compression: str = "none"


def _scenarios() -> list[Scenario]:
    meter_rbe: dict[str, Any] = {
        "deadband": "1%",
        "heartbeat": "15m",
        "points": {
            **{p: {"deadband": 0.1} for p in ("frequency",)},
            **{p: {"deadband": 0.01} for p in ("power_factor_l1", "power_factor_l2", "power_factor_l3")},
            "total_power_factor": {"deadband": 0.01},
            **{
                p: {"deadband": 0.1}
                for p in (
                    "import_active_energy",
                    "total_active_energy",
                    "import_reactive_energy",
                    "total_reactive_energy",
                    "export_active_energy",
                    "export_reactive_energy",
                )
            },
        },
    }
    lamp_rbe: dict[str, Any] = {
        "report": "on_change",
        "heartbeat": "15m",
        "points": {"power": {"deadband": 2.0}, "voltage": {"deadband": 2.0}, "energy": {"deadband": 10}},
    }
    air_rbe: dict[str, Any] = {"deadband": "10%", "heartbeat": "15m"}
    meter_agg: dict[str, Any] = {
        "aggregate": {"window": "5m", "functions": ["min", "max", "mean"]},
        "heartbeat": "15m",
        "points": meter_rbe["points"]
        | {p: {"report": "on_change"} for p in ("export_active_energy", "export_reactive_energy")},
    }
    # Points with their own deadband or report mode (counters, frequency, power factors) stay out of the
    # device's aggregate: aggregating a counter's mean says little.
    return [
        Scenario("baseline", "every value, every poll (report: always)", {}, {}, {}),
        Scenario("gzip", "baseline + compression: gzip", {}, {}, {}, "gzip"),
        Scenario("report-by-exception", "deadbands + on_change, heartbeat 15m", meter_rbe, lamp_rbe, air_rbe),
        Scenario("rbe+gzip", "report by exception + gzip", meter_rbe, lamp_rbe, air_rbe, "gzip"),
        Scenario(
            "aggregates+rbe+gzip",
            "meter: 5m min/max/mean; lamps, air as above; gzip",
            meter_agg,
            lamp_rbe,
            air_rbe,
            "gzip",
        ),
    ]


# --- simulated field values -------------------------------------------------------------------------------


def _registers(point: ModbusPoint, value: float | bool) -> list[int]:
    """What the device would hold for a physical value (then decoded by the real driver code)."""
    kind = point.effective_type()
    if point.table in ("coil", "discrete"):
        return [int(bool(value))]
    if point.bit is not None:
        return [int(bool(value)) << point.bit]
    raw = (float(value) - point.offset) / point.scale
    if kind.startswith("float"):
        return codec.encode(raw, kind, point.order)
    return codec.encode(round(raw), kind, point.order)


def _decode(point: ModbusPoint, value: float | bool) -> Value:
    return ModbusDriver._decode(point, _registers(point, value))


class MeterSim:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.kwh = 18_432.5
        self.kvarh = 4_210.25

    def values(self, t: float, dt: float) -> dict[str, float]:
        g = self.rng.gauss
        v: dict[str, float] = {}
        p_total = q_total = s_total = 0.0
        for ph in (1, 2, 3):
            volt = 231.0 + 1.5 * math.sin(t / 700 + ph) + g(0, 0.25)
            amp = 5.0 + ph + 0.8 * math.sin(t / 1100 + 2 * ph) + g(0, 0.03)
            pf = 0.95 + g(0, 0.002)
            s = volt * amp
            p = s * pf
            q = math.sqrt(max(s * s - p * p, 0.0))
            v |= {
                f"voltage_l{ph}": volt,
                f"current_l{ph}": amp,
                f"active_power_l{ph}": p,
                f"apparent_power_l{ph}": s,
                f"reactive_power_l{ph}": q,
                f"power_factor_l{ph}": pf,
            }
            p_total, q_total, s_total = p_total + p, q_total + q, s_total + s
        self.kwh += p_total * dt / 3.6e6
        self.kvarh += q_total * dt / 3.6e6
        volts = [v[f"voltage_l{k}"] for k in (1, 2, 3)]
        amps = [v[f"current_l{k}"] for k in (1, 2, 3)]
        v |= {
            "voltage_avg": sum(volts) / 3,
            "current_avg": sum(amps) / 3,
            "current_sum": sum(amps),
            "total_active_power": p_total,
            "total_apparent_power": s_total,
            "total_reactive_power": q_total,
            "total_power_factor": p_total / s_total,
            "frequency": 50.0 + g(0, 0.02),
            "import_active_energy": self.kwh,
            "export_active_energy": 0.0,
            "import_reactive_energy": self.kvarh,
            "export_reactive_energy": 0.0,
            "total_active_energy": self.kwh,
            "total_reactive_energy": self.kvarh,
        }
        for a, b, name in ((1, 2, "voltage_l1_l2"), (2, 3, "voltage_l2_l3"), (3, 1, "voltage_l3_l1")):
            v[name] = (v[f"voltage_l{a}"] + v[f"voltage_l{b}"]) / 2 * math.sqrt(3)
        return v


class LampSim:
    def __init__(self, rng: random.Random, k: int) -> None:
        self.rng = rng
        self.wh = 52_000.0 + 1000 * k
        self.hours = 8_760.0 + 10 * k

    def values(self, t: float, dt: float) -> dict[str, float | bool]:
        power = 80.0 + self.rng.gauss(0, 0.3)
        self.wh += power * dt / 3600
        self.hours += dt / 3600
        return {
            "on": True,
            "dim": 80,
            "power": power,
            "energy": math.floor(self.wh),
            "burning_hours": self.hours,
            "voltage": 231.0 + self.rng.gauss(0, 0.6),
            "lamp_failure": False,
            "driver_failure": False,
            "over_temperature": False,
        }


# --- one scenario -----------------------------------------------------------------------------------------


def _meter_config(options: dict[str, Any]) -> ModbusDeviceConfig:
    points = options.get("points", {})
    profile = load_profile("eastron-sdm630")
    own = {n: profile.points[n].model_dump() | extra for n, extra in points.items() if n in profile.points}
    device = {k: v for k, v in options.items() if k != "points"}
    cfg = ModbusDeviceConfig(bus="rs485-1", profile="eastron-sdm630", points=own, **device)
    return merge_profile(cfg, profile)


def _lamp_config(options: dict[str, Any]) -> ModbusDeviceConfig:
    profile = load_profile("streetlamp-controller")
    own = {n: profile.points[n].model_dump() | extra for n, extra in options.get("points", {}).items()}
    device = {k: v for k, v in options.items() if k != "points"}
    return merge_profile(
        ModbusDeviceConfig(bus="lan", profile="streetlamp-controller", points=own, **device), profile
    )


def run_scenario(sc: Scenario, seconds: int, seed: int = 42) -> dict[str, Any]:
    rng = random.Random(seed)
    clock = FixedClock(True)
    by_second: dict[int, list[Reading]] = defaultdict(list)
    now = [T0]

    def sink_for() -> Any:
        def sink(readings: list[Reading]) -> None:
            by_second[now[0] // 1000].extend(readings)

        return sink

    meter_cfg = _meter_config(sc.meter)
    lamp_cfg = _lamp_config(sc.lamp)
    air_cfg = DeviceConfigBase(driver="sds011", poll="5m", **sc.air)
    procs: list[tuple[str, DeviceProcessor, float, float, Any]] = []  # name, processor, period, phase, values
    meter = MeterSim(rng)
    procs.append(
        (
            "meter",
            DeviceProcessor("meter", meter_cfg, sink_for(), clock, lambda: now[0]),
            10,
            0.3,
            lambda t, dt: {n: _decode(meter_cfg.points[n], x) for n, x in meter.values(t, dt).items()},
        )
    )
    for k in range(20):
        lamp = LampSim(rng, k)
        procs.append(
            (
                f"lamp-{k + 1:02d}",
                DeviceProcessor(f"lamp-{k + 1:02d}", lamp_cfg, sink_for(), clock, lambda: now[0]),
                30,
                1.1 + 1.37 * k,
                lambda t, dt, lamp=lamp: {
                    n: _decode(lamp_cfg.points[n], x) for n, x in lamp.values(t, dt).items()
                },
            )
        )
    procs.append(
        (
            "air-1",
            DeviceProcessor("air-1", air_cfg, sink_for(), clock, lambda: now[0]),
            300,
            4.2,
            lambda t, dt: {
                "pm2_5": round(max(0.0, rng.gauss(12, 1.5)), 1),
                "pm10": round(max(0.0, rng.gauss(20, 2.0)), 1),
            },
        )
    )
    units = {"pm2_5": "µg/m³", "pm10": "µg/m³"}
    polls: list[tuple[float, int]] = []
    for i, (_, _, period, phase, _) in enumerate(procs):
        t = phase
        while t < seconds:
            polls.append((t, i))
            t += period
    polls.sort()
    raw = 0
    for t, i in polls:
        name, proc, period, _, values = procs[i]
        now[0] = T0 + int(t * 1000)
        cfg = proc.config
        point_units = {n: p.unit for n, p in getattr(cfg, "points", {}).items()}
        readings = [
            Reading(name, n, now[0], v, point_units.get(n) or units.get(n))
            for n, v in values(t, period).items()
        ]
        raw += len(readings)
        proc(readings)
    now[0] = T0 + seconds * 1000 + WINDOW_GRACE_MS
    for _, proc, _, _, _ in procs:
        proc.close_due()

    topic = payloads.Topics(PREFIX, GATEWAY).telemetry_for(sc.compression)
    seq = 0
    sent = payload = mqtt = wire = messages = 0
    for second in sorted(by_second):
        batch = by_second[second]
        for start in range(0, len(batch), BATCH_MAX):
            chunk = batch[start : start + BATCH_MAX]
            bodies = []
            for r in chunk:
                seq += 1
                bodies.append(payloads.reading_body(seq, r))
            body = payloads.compress(payloads.telemetry(GATEWAY, bodies), sc.compression)
            packet = _publish_size(topic, len(body))
            messages += 1
            sent += len(chunk)
            payload += len(body)
            mqtt += packet + 4  # + the broker's PUBACK (downlink bytes are billed too)
            segments = math.ceil(packet / MSS)
            wire += packet + 4 + 2 * TLS_RECORD + TCP_IP * (segments + 1 + 1)  # data, PUBACK, a bare ACK
    scale = 3600 / seconds
    return {
        "scenario": sc.name,
        "what": sc.what,
        "values_read_per_hour": round(raw * scale),
        "readings_sent_per_hour": round(sent * scale),
        "messages_per_hour": round(messages * scale),
        "payload_bytes_per_hour": round(payload * scale),
        "mqtt_bytes_per_hour": round(mqtt * scale),
        "wire_bytes_per_hour_est": round(wire * scale),
    }


def _publish_size(topic: str, body_len: int) -> int:
    """An MQTT 3.1.1 QoS 1 PUBLISH: fixed header, remaining length, topic, packet id, payload."""
    remaining = 2 + len(topic.encode()) + 2 + body_len
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + varint + remaining


def main(quick: bool) -> dict[str, Any]:
    seconds = 900 if quick else 3600
    rows = [run_scenario(sc, seconds) for sc in _scenarios()]
    base = rows[0]["mqtt_bytes_per_hour"]
    for r in rows:
        r["mqtt_vs_baseline"] = round(r["mqtt_bytes_per_hour"] / base, 3)
        r["mqtt_mb_per_30_days"] = round(r["mqtt_bytes_per_hour"] * 24 * 30 / 1e6, 1)
    return {"simulated_seconds": seconds, "cabinet": "SDM630 @10s, 20 lamps @30s, SDS011 @5m", "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| scenario | readings sent/h | messages/h | MQTT bytes/h | MB / 30 days | vs baseline | wire est. bytes/h |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scenario']} | {r['readings_sent_per_hour']:,} | {r['messages_per_hour']:,} | "
            f"{r['mqtt_bytes_per_hour']:,} | {r['mqtt_mb_per_30_days']} | {r['mqtt_vs_baseline']:.1%} | "
            f"{r['wire_bytes_per_hour_est']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="simulate 15 minutes (figures scaled to an hour)"
    )
    result = main(parser.parse_args().quick)
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
