"""Buffer figures: append rate by batch size and synchronous mode, backlog drain rate, disk bytes per reading.

Run: .venv/bin/python -m bench.bench_store [--quick] [--dir DIR]
Prints one JSON object, then a Markdown table. The files go to a temporary directory under DIR (default: the
current directory, so that the figures are those of the disk, not of a tmpfs /tmp).
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from agent.pipeline.reading import Reading
from agent.pipeline.store import Store

T0 = 1_715_000_000_000
MAX_BYTES = 1024 * 1024 * 1024  # large enough that no run evicts
POINTS = ("power_w", "voltage_v", "current_a", "energy_wh", "pf")
UNITS = ("W", "V", "A", "Wh", None)


def make_readings(n: int) -> list[Reading]:
    """Readings shaped like a meter's: five points per device, floats, ms timestamps."""
    return [
        Reading(f"meter-{i // 50 % 20}", POINTS[i % 5], T0 + i * 200, 230.0 + (i % 97) * 0.37, UNITS[i % 5])
        for i in range(n)
    ]


def append_rate(
    workdir: Path, synchronous: Literal["full", "normal"], batch: int, total: int, runs: int
) -> dict[str, Any]:
    rates: list[float] = []
    data = make_readings(total)
    batches = [data[i : i + batch] for i in range(0, total, batch)]
    for run in range(runs):
        store = Store(workdir / f"append-{synchronous}-{batch}-{run}.db", MAX_BYTES, synchronous)
        store.open()
        try:
            t0 = time.perf_counter()
            for chunk in batches:
                store.append(chunk)
            rates.append(total / (time.perf_counter() - t0))
        finally:
            store.close()
    return {
        "synchronous": synchronous,
        "batch": batch,
        "readings": total,
        "runs": runs,
        "rate_median": statistics.median(rates),
        "rates": rates,
    }


def drain_and_size(
    workdir: Path, synchronous: Literal["full", "normal"], total: int, runs: int
) -> dict[str, Any]:
    """Fill a backlog, measure its size on disk, then drain it as the uplink does: fetch 500, ack them."""
    rates: list[float] = []
    bytes_live = bytes_closed = 0
    data = make_readings(total)
    for run in range(runs):
        path = workdir / f"drain-{synchronous}-{run}.db"
        store = Store(path, MAX_BYTES, synchronous)
        store.open()
        try:
            for i in range(0, total, 1000):
                store.append(data[i : i + 1000])
            bytes_live = store.stats().bytes
            store.close()
            bytes_closed = path.stat().st_size
            store = Store(path, MAX_BYTES, synchronous)
            store.open()
            t0 = time.perf_counter()
            after = 0
            while rows := store.fetch(after, None, 500):
                store.ack([r.seq for r in rows])
                after = rows[-1].seq
            rates.append(total / (time.perf_counter() - t0))
            drained_bytes = store.stats().bytes
        finally:
            store.close()
    return {
        "synchronous": synchronous,
        "readings": total,
        "runs": runs,
        "rate_median": statistics.median(rates),
        "rates": rates,
        "bytes_per_reading_open": bytes_live / total,
        "bytes_per_reading_closed": bytes_closed / total,
        "bytes_after_drain": drained_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under ~10 s")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the temporary buffers go")
    args = parser.parse_args()
    runs = 3
    big = 20_000 if args.quick else 100_000
    single = 100 if args.quick else 500  # batch size 1 with synchronous=full is one fsync per reading
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "quick": args.quick,
        "append": [],
        "drain": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        results["dir"] = str(workdir.resolve().parent)
        for synchronous in ("full", "normal"):
            for batch in (1, 100, 500, 1000):
                total = single if batch == 1 else big
                results["append"].append(append_rate(workdir, synchronous, batch, total, runs))
            results["drain"].append(drain_and_size(workdir, synchronous, big, runs))
    print(json.dumps(results, indent=2))
    print()
    print("| synchronous | batch | append readings/s (median of 3) |")
    print("| --- | ---: | ---: |")
    for a in results["append"]:
        print(f"| {a['synchronous']} | {a['batch']} | {a['rate_median']:,.0f} |")
    print()
    print("| synchronous | drain readings/s (fetch 500 + ack) | bytes/reading (open, with WAL) | (closed) |")
    print("| --- | ---: | ---: | ---: |")
    for d in results["drain"]:
        print(
            f"| {d['synchronous']} | {d['rate_median']:,.0f} | {d['bytes_per_reading_open']:.0f} "
            f"| {d['bytes_per_reading_closed']:.0f} |"
        )


if __name__ == "__main__":
    main()
