"""Eviction ledger under CPU load: the max_size scenario of tests/faults/test_disk.py, N times, cores kept busy.

Each run: the real daemon (2 counting Modbus units x 61 points every 100 ms, ~1200 readings/s, max_size 1MB)
against a real Mosquitto; the broker stops until more than 2000 readings were evicted, comes back, the
backlog drains while the buffer is still full (evictions go on meanwhile: the interleaving that once made
gaps != evicted). An independent subscriber then audits the seqs. Meanwhile one busy-loop child per core
(bounded in time, killed by PID at the end) keeps the machine loaded, as on the loaded 2-core machine where
the test once saw 2360 gaps against 2507 evicted.

Run: .venv/bin/python -m bench.bench_eviction [--runs 20] [--no-load] [--max-seconds 900]
Prints one JSON object, then a Markdown table. No assertions: figures only (`exact` says gaps == evicted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker, free_port
from tests.daemon import Daemon
from tests.faults.conftest import CounterUnit, TimedChecker, audit, fault_config, store_high, wait_status

MAX_SIZE = 1_000_000  # "1MB"
BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_load(seconds: float) -> list[subprocess.Popen[bytes]]:
    """One busy-loop child per core, each ending by itself after `seconds` (and killed by PID before)."""
    code = BUSY.format(seconds=seconds)
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]


def stop_load(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


def db_and_wal(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


async def one_run(index: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-evict-"))
    db = tmp / "buffer.db"
    broker = Broker(persistence=True).start()
    sim = ModbusSim({u: CounterUnit() for u in (1, 2)})
    for unit in sim.units.values():
        unit.set("holding", 2, list(range(1000, 1100)))
    await sim.start_tcp("127.0.0.1", 0)
    port = free_port()
    cfg = fault_config(
        tmp, broker.port, sim.port, poll="100ms", registers=60, max_size="1MB", local_port=port
    )
    daemon = Daemon(cfg, tmp / "daemon.log")
    t0 = time.monotonic()
    peak_outage = 0
    result: dict[str, Any] = {"run": index}
    try:
        async with TimedChecker(broker.port) as checker:
            daemon.start()
            await checker.wait_for(
                lambda: len(checker.data.readings) >= 500, timeout=60, what="first readings"
            )
            broker.stop()
            deadline = time.monotonic() + 90
            while True:
                peak_outage = max(peak_outage, db_and_wal(db))
                doc = await wait_status(port, lambda d: True)
                if doc["buffer"]["evicted"] > 2000 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            broker.start()
            await wait_status(port, lambda d: d["upstream"]["connected"], timeout=60, what="reconnection")
            await wait_status(port, lambda d: d["buffer"]["pending"] < 2000, timeout=90, what="drained")
            await asyncio.sleep(1.5)
            final = await wait_status(port, lambda d: True)
            high = store_high(db)
            evicted = final["buffer"]["evicted"]
            try:
                await checker.wait_for_seqs(high, timeout=60, missing_ok=evicted)
                complete = True
            except AssertionError:
                complete = False
            a = audit(checker, high)
            result.update(
                gaps=len(a.gaps),
                evicted=evicted,
                exact=len(a.gaps) == evicted,
                complete=complete,
                stored=high,
                received=a.received,
                duplicates=a.duplicates,
                conflicting=len(a.conflicting),
                peak_outage_bytes=peak_outage,
                seconds=round(time.monotonic() - t0, 1),
            )
    except AssertionError as exc:  # a timeout: reported, the next run goes on
        result.update(error=str(exc)[:300], seconds=round(time.monotonic() - t0, 1))
    finally:
        daemon.stop()
        await sim.aclose()
        broker.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


async def main(runs: int, load: bool, max_seconds: float) -> dict[str, Any]:
    children = start_load(max_seconds + 60) if load else []
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        for i in range(runs):
            if time.monotonic() - started > max_seconds:
                break
            results.append(await one_run(i + 1))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        stop_load(children)
    return {
        "bench": "eviction",
        "load_children": len(children),
        "cpus": os.cpu_count(),
        "max_size": MAX_SIZE,
        "runs_requested": runs,
        "pairs": [[r.get("gaps"), r.get("evicted")] for r in results],
        "all_exact": bool(results) and all(r.get("exact") for r in results),
        "runs": results,
        "total_s": round(time.monotonic() - started, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| run | gaps | evicted | exact | stored | received | duplicates | peak db+wal in outage | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error'][:80]} | | | | | | | {r['seconds']} |")
            continue
        lines.append(
            f"| {r['run']} | {r['gaps']} | {r['evicted']} | {'yes' if r['exact'] else 'NO'} | {r['stored']} "
            f"| {r['received']} | {r['duplicates']} | {r['peak_outage_bytes']:,} | {r['seconds']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-load", action="store_true", help="without the busy-loop children")
    parser.add_argument("--max-seconds", type=float, default=900, help="no new run starts past this")
    parser.add_argument("--quick", action="store_true", help="CI size: 3 runs, at most 2 minutes")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.max_seconds = min(args.runs, 3), min(args.max_seconds, 120)
    out = asyncio.run(main(args.runs, not args.no_load, args.max_seconds))
    print(json.dumps(out, indent=2))
    print()
    print(markdown(out))
