"""The long `kill -9` loop (tests/faults/test_kill9.py) with its figures: kills per phase, lost, duplicates.

The real daemon is killed `--kills` times (default 150; `--quick`: 20), each kill aimed at a phase of its
life (starting, polling offline, replaying a backlog, polling live), the middle third with the broker down;
a last run delivers everything and an independent subscriber's record is audited against the buffer's
high-water mark. The same checks as the test are reported (not asserted: figures only, `violations` lists
what the test would have failed on).

Run: .venv/bin/python -m bench.bench_kill9 [--quick | --kills N] [--seed S]
Prints one JSON object, then a Markdown table. Latest figures: docs/TESTING.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from drivers.modbus.simulator import ModbusSim
from tests.broker import Broker
from tests.faults.conftest import CounterUnit
from tests.faults.test_kill9 import DUPLICATES_FRACTION, DUPLICATES_PER_KILL, PHASES, KillReport, kill_loop


def violations(rep: KillReport) -> list[str]:
    out: list[str] = []
    if rep.gaps:
        out.append(f"{len(rep.gaps)} seqs lost")
    if rep.conflicting:
        out.append(f"{len(rep.conflicting)} seqs reused")
    if rep.counter_reused:
        out.append(f"{len(rep.counter_reused)} reads stored twice")
    if rep.counter_disorder:
        out.append(f"{rep.counter_disorder} order violations")
    worst = max((k.in_flight for k in rep.kills), default=0)
    if worst > DUPLICATES_PER_KILL:
        out.append(f"{worst} left in flight by one kill > {DUPLICATES_PER_KILL} (SPEC §5)")
    explained = sum(k.in_flight for k in rep.kills)
    if rep.duplicates > explained:
        out.append(f"{rep.duplicates} duplicates > {explained} rows left in flight by the kills")
    unfrozen = sum(k.in_flight for k in rep.kills if not k.frozen)
    if unfrozen > DUPLICATES_FRACTION * rep.high:
        out.append(f"{unfrozen} left in flight by unfrozen kills > {DUPLICATES_FRACTION:.0%} of {rep.high}")
    missing = [p for p in PHASES if not rep.phases()[p]]
    if missing:
        out.append(f"no kill in {', '.join(missing)}")
    return out


async def main(kills: int, seed: int) -> dict[str, Any]:
    sim = ModbusSim({u: CounterUnit() for u in (1, 2, 3, 4)})
    for unit in sim.units.values():
        unit.set("holding", 2, list(range(1000, 1100)))
    await sim.start_tcp("127.0.0.1", 0)
    broker = Broker(persistence=True).start()
    try:
        with tempfile.TemporaryDirectory(prefix="fg-kill9-") as tmp:
            rep = await kill_loop(Path(tmp), broker, sim, kills=kills, seed=seed)
    finally:
        broker.cleanup()
        await sim.aclose()
    by_phase: dict[str, dict[str, int]] = {}
    for k in rep.kills:
        row = by_phase.setdefault(k.phase, {"kills": 0, "in_flight": 0, "max_in_flight": 0})
        row["kills"] += 1
        row["in_flight"] += k.in_flight
        row["max_in_flight"] = max(row["max_in_flight"], k.in_flight)
    return {
        "bench": "kill9",
        "seed": seed,
        **rep.summary(),
        "by_phase": dict(sorted(by_phase.items())),
        "violations": violations(rep),
        "over_bound": [vars(k) for k in rep.kills if k.in_flight > DUPLICATES_PER_KILL],
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"{r['kills']} kills in {r['seconds']} s (seed {r['seed']}): {r['stored']:,} readings stored, "
        f"{r['received']:,} received, {r['lost']} lost, {r['duplicates']} duplicates "
        f"(at most {r['max_duplicates_per_kill']} left in flight by one kill, SPEC §5 bound "
        f"{r['duplicates_per_kill_bound']}; {r['duplicates_from_unfrozen_kills']} by kills without the broker "
        "frozen), "
        f"{r['reused_seqs']} reused seqs, {r['reads_stored_twice']} reads stored twice, "
        f"{r['order_violations']} order violations; violations: {', '.join(r['violations']) or 'none'}",
        "",
        "| phase at the kill | kills | rows left in flight (duplicates caused) | max by one kill |",
        "| --- | ---: | ---: | ---: |",
    ]
    for phase, row in r["by_phase"].items():
        lines.append(f"| {phase} | {row['kills']} | {row['in_flight']} | {row['max_in_flight']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 kills (CI, about 30 s)")
    parser.add_argument("--kills", type=int, default=150)
    parser.add_argument("--seed", type=int, default=150)
    args = parser.parse_args()
    result = asyncio.run(main(20 if args.quick else args.kills, args.seed))
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
