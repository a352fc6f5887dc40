"""Fleet figures: N gateway daemons against one shared Modbus simulator, publishing to a 3-node NATS cluster.

Each gateway runs the real daemon with a light config (5 devices x 10 points every 10 s by default) and lists
the three nodes, rotated so the fleet spreads over them. One platform subscriber (persistent session) on the
cluster records every reading. Measured:

- total readings/s received, RSS and CPU per gateway (from /proc, over the steady window);
- after a full cluster restart (every node stopped, then started): per gateway, seconds from the start of
  the nodes until its first new reading reaches the platform (distribution);
- after one node is killed (SIGKILL) under load: seq gaps per gateway once everything has settled.

Run: .venv/bin/python -m bench.bench_fleet [--gateways 200] [--steady 60] [--interval 10s]
Prints one JSON object, then a Markdown table. No assertions: figures only. Starting hundreds of daemons
needs the RAM (about 30 MB each) and takes a while on a small machine; docs/FLEET.md says which N ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.daemon import Daemon
from tests.natsbroker import NatsCluster

TICK = os.sysconf("SC_CLK_TCK")


def gateway_config(
    path: Path, gw: str, urls: list[str], sim_port: int, devices: int, points: int, poll: str
) -> None:
    lines = [
        f"gateway: {{id: {gw}, clock: assume_synced}}",
        f"storage: {{path: {path.parent / 'buffer.db'}, max_size: 16MB}}",
        "upstream:",
        "  mqtt:",
        f"    url: [{', '.join(urls)}]",
        "    failback: 0s",
        "    keepalive: 10s",
        "    health_interval: 60s",
        'local: {listen: ""}',
        "buses:",
        f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim_port}, timeout: 2s}}",
        "devices:",
    ]
    for d in range(1, devices + 1):
        lines += [f"  m{d}:", "    bus: lan", f"    unit_id: {d}", f"    poll: {poll}", "    points:"]
        lines += [f"      p{i}: {{table: holding, address: {i}}}" for i in range(points)]
    path.write_text("\n".join(lines) + "\n")


def proc_figures(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds so far) of one process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / TICK


def store_high(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=10)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


class Platform:
    """One persistent session on the cluster (the first node that answers), recording every reading."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.seqs: dict[str, set[int]] = defaultdict(set)
        self.arrivals: list[tuple[float, str, int]] = []  # (monotonic, gateway, seq)
        self.count = 0
        self.messages = 0
        self.bytes = 0
        self.connected = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.ports[i % len(self.ports)], identifier="bench-platform",
                    clean_session=False, keepalive=10, timeout=10,
                ) as client:  # fmt: skip
                    await client.subscribe("fieldgate/+/telemetry", qos=1)
                    self.connected.set()
                    async for msg in client.messages:
                        gw = str(msg.topic).split("/")[1]
                        now = time.monotonic()
                        payload = msg.payload if isinstance(msg.payload, bytes) else b"{}"
                        self.messages += 1
                        self.bytes += len(payload)
                        doc = orjson.loads(payload)
                        for r in doc.get("readings", []):
                            self.seqs[gw].add(r["seq"])
                            self.arrivals.append((now, gw, r["seq"]))
                        self.count += len(doc.get("readings", []))
            except aiomqtt.MqttError:
                self.connected.clear()
                i += 1
                await asyncio.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fg-bench-fleet-"))
    sim = ModbusSim({u: SimUnit() for u in range(1, args.devices + 1)})
    for unit in sim.units.values():
        unit.set("holding", 0, list(range(100, 100 + args.points)))
    await sim.start_tcp("127.0.0.1", 0)
    cluster = NatsCluster(3)
    await asyncio.to_thread(cluster.start)
    platform = Platform([n.port for n in cluster.nodes])
    ptask = asyncio.create_task(platform.run())
    await asyncio.wait_for(platform.connected.wait(), 30)
    daemons: dict[str, Daemon] = {}
    out: dict[str, Any] = {"gateways": args.gateways, "devices": args.devices, "points": args.points}
    try:
        t0 = time.monotonic()
        for g in range(args.gateways):
            gw = f"gw-{g:04d}"
            d = work / gw
            d.mkdir()
            k = g % 3
            urls = cluster.urls[k:] + cluster.urls[:k]  # rotated: the fleet spreads over the nodes
            gateway_config(d / "fieldgate.yaml", gw, urls, sim.port, args.devices, args.points, args.interval)
            daemons[gw] = Daemon(d / "fieldgate.yaml", d / "daemon.log").start()
            await asyncio.sleep(args.start_spacing)
        expected = args.gateways * args.devices * args.points
        deadline = time.monotonic() + 600
        while sum(1 for s in platform.seqs.values() if s) < args.gateways and time.monotonic() < deadline:
            await asyncio.sleep(1)
        out["start_all_s"] = round(time.monotonic() - t0, 1)

        # Steady state.
        first = {gw: proc_figures(d.pid) for gw, d in daemons.items()}
        c0, m0, b0, w0 = platform.count, platform.messages, platform.bytes, time.monotonic()
        await asyncio.sleep(args.steady)
        c1, m1, b1, w1 = platform.count, platform.messages, platform.bytes, time.monotonic()
        last = {gw: proc_figures(d.pid) for gw, d in daemons.items()}
        rss = [last[gw][0] for gw in daemons]
        cpu = [(last[gw][1] - first[gw][1]) / (w1 - w0) * 100 for gw in daemons]
        out["steady"] = {
            "readings_per_s": round((c1 - c0) / (w1 - w0), 1),
            "messages_per_s": round((m1 - m0) / (w1 - w0), 2),
            "payload_bytes_per_reading": round((b1 - b0) / max(1, c1 - c0), 1),
            "expected_readings_per_s": round(expected / _seconds(args.interval), 1),
            "rss_mib_median": round(statistics.median(rss), 1),
            "rss_mib_max": round(max(rss), 1),
            "cpu_pct_median": round(statistics.median(cpu), 2),
            "cpu_pct_p95": round(pct(cpu, 0.95), 2),
        }

        # Full cluster restart.
        tops = {gw: max(platform.seqs[gw], default=0) for gw in daemons}
        for n in cluster.nodes:
            n.stop()
        await asyncio.sleep(args.outage)
        restart = time.monotonic()
        await asyncio.to_thread(cluster.start)
        ready = time.monotonic()
        back: dict[str, float] = {}
        deadline = time.monotonic() + 300
        while len(back) < len(daemons) and time.monotonic() < deadline:
            for t, gw, seq in platform.arrivals[-20000:]:
                if gw not in back and seq > tops[gw] and t >= restart:
                    back[gw] = t - restart
            await asyncio.sleep(0.5)
        values = list(back.values())
        out["cluster_restart"] = {
            "outage_s": args.outage,
            "cluster_ready_s": round(ready - restart, 2),  # started until every node passed wait_ready
            "gateways_back": len(back),
            "after_start_s": {
                "min": round(min(values), 2) if values else None,
                "p50": round(pct(values, 0.5), 2),
                "p90": round(pct(values, 0.9), 2),
                "max": round(max(values), 2) if values else None,
            },
        }

        # One node killed under load, then everything settled.
        victim = cluster.nodes[0]
        victim.kill9()
        await asyncio.sleep(args.after_kill)
        await asyncio.to_thread(victim.start)
        await asyncio.to_thread(victim.wait_ready)
        await asyncio.sleep(args.interval_s * 2)
        highs = {gw: store_high(work / gw / "buffer.db") for gw in daemons}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            missing = {
                gw: sum(1 for s in range(1, highs[gw] + 1) if s not in platform.seqs[gw]) for gw in daemons
            }
            if not any(missing.values()):
                break
            await asyncio.sleep(2)
        out["node_kill"] = {
            "gateways_with_gaps": sum(1 for v in missing.values() if v),
            "missing_seqs": sum(missing.values()),
            "stored": sum(highs.values()),
        }
    finally:
        for d in daemons.values():
            with contextlib.suppress(Exception):
                d.stop()
        ptask.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ptask
        cluster.cleanup()
        await sim.aclose()
    return out


def _seconds(text: str) -> float:
    from agent.units import parse_duration

    return parse_duration(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gateways", type=int, default=200)
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--points", type=int, default=10)
    p.add_argument("--interval", default="10s", help="poll interval of every device")
    p.add_argument("--steady", type=float, default=60, help="seconds of steady state measured")
    p.add_argument("--outage", type=float, default=5, help="seconds the whole cluster stays down")
    p.add_argument("--after-kill", type=float, default=15, help="seconds before the killed node restarts")
    p.add_argument("--start-spacing", type=float, default=0.2, help="seconds between daemon starts")
    args = p.parse_args()
    args.interval_s = _seconds(args.interval)
    result = asyncio.run(bench(args))
    print(json.dumps(result))
    s, r, k = result["steady"], result["cluster_restart"], result["node_kill"]
    a = r["after_start_s"]
    print()
    print(
        "| gateways | readings/s (expected) | RSS MiB p50/max | CPU % p50/p95 | back after cluster restart p50/p90/max s | node kill: seq missing |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {result['gateways']} | {s['readings_per_s']} ({s['expected_readings_per_s']}) | "
        f"{s['rss_mib_median']} / {s['rss_mib_max']} | {s['cpu_pct_median']} / {s['cpu_pct_p95']} | "
        f"{a['p50']} / {a['p90']} / {a['max']} ({r['gateways_back']} back) | {k['missing_seqs']} of {k['stored']} |"
    )


if __name__ == "__main__":
    main()
