"""Soak: hours of readings compressed into minutes; RSS, file descriptors and threads sampled over time.

The reference workload (10 Modbus TCP devices x 20 holding registers) polled `--speedup` times faster than
every second, so one minute here carries as many readings, requests, commits, publishes and acks as
`--speedup` minutes of the real workload. A leak shows as a slope: the figures compare the second half of
the run with the first (the start-up allocations are behind us by then), and fit RSS linearly over the
second half (MiB per simulated hour). Prints JSON, then a Markdown table of the samples.

    python -m bench.bench_soak [--quick] [--minutes N] [--speedup N] [--every S]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.bench_daemon import BenchDaemon, Platform, cpu_seconds, proc_status, start_simulator, write_config
from tests.broker import Broker


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) in value per hour; 0 with fewer than two points."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 3600


async def soak(seconds: float, speedup: float, every: float, devices: int, registers: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fg-soak-"))
    broker = Broker(persistence=True).start()
    sim, sim_port = start_simulator(devices)
    platform = Platform(broker.port)
    watcher = asyncio.create_task(platform.run())
    await platform.ready.wait()
    cfg = write_config(workdir, broker, sim_port, devices, registers, poll=1.0 / speedup)
    daemon = BenchDaemon(cfg, workdir / "daemon.log", "info").start()
    samples: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        while platform.first_at is None and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            st = proc_status(daemon.pid)
            samples.append(
                {
                    "t_s": round(elapsed, 1),
                    "simulated_min": round(elapsed * speedup / 60, 1),
                    "rss_mib": round(st["VmRSS"] / 1024, 2),
                    "fds": st["fds"],
                    "threads": st["Threads"],
                    "cpu_s": round(cpu_seconds(daemon.pid), 2),
                    "delivered": platform.live + platform.backlog,
                }
            )
            await asyncio.sleep(every)
    finally:
        daemon.stop()
        sim.terminate()
        sim.wait()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        broker.cleanup()
    half = samples[len(samples) // 2 :]
    first = samples[: max(len(samples) // 2, 1)]
    span = max(samples[-1]["t_s"] - samples[0]["t_s"], 1e-3)
    return {
        "workload": f"{devices} devices x {registers} registers every {1000 / speedup:g} ms "
        f"({speedup:g}x the reference), {seconds:g} s = {seconds * speedup / 3600:.2f} simulated hours",
        "values_per_s": round((samples[-1]["delivered"] - samples[0]["delivered"]) / span),
        "cpu_pct_of_core": round((samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / span * 100, 1),
        "rss_first_half_max_mib": max(s["rss_mib"] for s in first),
        "rss_second_half_max_mib": max(s["rss_mib"] for s in half),
        "rss_end_mib": samples[-1]["rss_mib"],
        "rss_slope_mib_per_simulated_hour": round(
            slope_per_hour([(s["t_s"] * speedup, s["rss_mib"]) for s in half]), 3
        ),
        "fds_min_max": [min(s["fds"] for s in samples), max(s["fds"] for s in samples)],
        "threads_min_max": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="about 30 s, for CI")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--speedup", type=float, default=10, help="poll this many times faster than 1 s")
    ap.add_argument("--every", type=float, default=10, help="seconds between samples")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=20)
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.every = 0.4, 2
    result = asyncio.run(soak(args.minutes * 60, args.speedup, args.every, args.devices, args.registers))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print()
    print("| t (s) | simulated (min) | RSS (MiB) | fds | threads | delivered |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in result["samples"]:
        print(
            f"| {s['t_s']} | {s['simulated_min']} | {s['rss_mib']} | {s['fds']} | {s['threads']} "
            f"| {s['delivered']} |"
        )


if __name__ == "__main__":
    main()
