"""Reliability figures: backlog drain rate, live latency during the drain, disk bytes per buffered reading.

A backlog is written straight into the buffer file with the Store API (as a long outage would leave it),
then the real daemon starts against a real Mosquitto and counting Modbus units; an independent subscriber
notes when every reading arrives. The drain is measured for several `max_inflight` values.

Run: .venv/bin/python -m bench.bench_reliability [--quick]   (full: 1,000,000 buffered readings)
Prints one JSON object, then a Markdown table. No assertions: figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.pipeline.reading import Reading
from agent.pipeline.store import Store
from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.daemon import Daemon
from tests.faults.conftest import CounterUnit, TimedChecker, fault_config

PREFILL_BATCH = 5000


def prefill(db: Path, count: int) -> dict[str, Any]:
    """Write `count` readings (shaped like a meter's) into a fresh buffer; returns size figures."""
    store = Store(db, 4 * 1000**3, "normal")
    store.open()
    t0 = time.perf_counter()
    ts0 = time.time_ns() // 1_000_000 - count  # one reading per ms of "outage", all in the past
    try:
        done = 0
        while done < count:
            n = min(PREFILL_BATCH, count - done)
            store.append(
                [
                    Reading(
                        f"meter-{(done + i) % 8}",
                        f"p{(done + i) % 20}",
                        ts0 + done + i,
                        230.0 + i % 97 / 10,
                        "V",
                    )
                    for i in range(n)
                ]
            )
            done += n
        stats = store.stats()
    finally:
        store.close()
    return {
        "buffered": count,
        "prefill_s": round(time.perf_counter() - t0, 2),
        "buffer_bytes": stats.bytes,
        "bytes_per_reading": round(stats.bytes / max(1, stats.pending), 1),
    }


def _pct(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drain_run(count: int, max_inflight: int, batch_max: int) -> dict[str, Any]:
    """One drain of `count` buffered readings with live polling going on; figures of the run."""
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-rel-"))
    db = tmp / "buffer.db"
    sizes = prefill(db, count)
    broker = Broker(persistence=False).start()
    sim = ModbusSim({u: CounterUnit() for u in (1, 2)})
    await sim.start_tcp("127.0.0.1", 0)
    cfg = fault_config(
        tmp,
        broker.port,
        sim.port,
        db=db,
        poll="100ms",
        registers=8,
        batch_max=batch_max,
        max_inflight=max_inflight,
        max_size="4GB",  # the whole backlog must fit: this measures the drain, not eviction
    )
    daemon = Daemon(cfg, tmp / "daemon.log")
    try:
        async with TimedChecker(broker.port, "gw-faults") as checker:
            t_start = time.time_ns() // 1_000_000
            daemon.start()
            deadline = time.monotonic() + max(120.0, count / 2000)
            got: set[int] = set()
            seen = 0
            while len(got) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                new = checker.data.readings[seen:]
                seen += len(new)
                got.update(r["seq"] for r in new if r["seq"] <= count)
            t_end = time.time_ns() // 1_000_000
            data = checker.data
            rows = list(zip(data.readings, data.backlog_flags, checker.arrivals, strict=False))
            backlog_arrivals = [t for r, b, t in rows if b and r["seq"] <= count]
            first_backlog = min(backlog_arrivals) if backlog_arrivals else t_start
            last_backlog = max(backlog_arrivals) if backlog_arrivals else t_end
            live = [t - r["ts"] for r, b, t in rows if not b and first_backlog <= t <= last_backlog]
            drain_s = max(0.001, (last_backlog - first_backlog) / 1000)
            duplicates = len(backlog_arrivals) - len(
                {r["seq"] for r, b, _ in rows if b and r["seq"] <= count}
            )
    finally:
        daemon.stop()
        await sim.aclose()
        broker.cleanup()
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        tmp.rmdir()
    return {
        **sizes,
        "max_inflight": max_inflight,
        "batch_max": batch_max,
        "complete": len(got) == count,
        "start_to_first_backlog_s": round((first_backlog - t_start) / 1000, 2),
        "drain_s": round(drain_s, 2),
        "drain_rate_per_s": int(len(got) / drain_s),
        "backlog_duplicates": duplicates,
        "live_during_drain": len(live),
        "live_latency_ms_p50": _pct(live, 0.5),
        "live_latency_ms_p95": _pct(live, 0.95),
        "live_latency_ms_max": max(live) if live else None,
        "live_latency_ms_mean": int(statistics.fmean(live)) if live else None,
    }


async def main(quick: bool) -> dict[str, Any]:
    big = 300_000 if quick else 1_000_000
    sweep = 50_000 if quick else 300_000
    runs = [await drain_run(big, 16, 500)]
    for inflight in (1, 2, 4):
        runs.append(await drain_run(sweep, inflight, 500))
    if not quick:
        runs.append(await drain_run(sweep, 16, 500))
    return {"bench": "reliability", "quick": quick, "runs": runs}


def markdown(result: dict[str, Any]) -> str:
    head = (
        "| buffered | max_inflight | bytes/reading | drain s | drain readings/s | live during drain "
        "| live latency p50 / p95 / max (ms) | backlog dups |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in result["runs"]:
        lines.append(
            f"| {r['buffered']:,} | {r['max_inflight']} | {r['bytes_per_reading']} | {r['drain_s']} "
            f"| {r['drain_rate_per_s']:,} | {r['live_during_drain']} "
            f"| {r['live_latency_ms_p50']} / {r['live_latency_ms_p95']} / {r['live_latency_ms_max']} "
            f"| {r['backlog_duplicates']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small backlogs, for CI (< 60 s)")
    result = asyncio.run(main(parser.parse_args().quick))
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
