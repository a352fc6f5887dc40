"""Start -> first reading upstream, cold and warm, for one source tree or several interleaved.

The reference workload's config (bench_daemon: 10 Modbus TCP devices x 20 holding registers at 1 s, QoS 1, the
durable buffer, the local API off). Each round starts the daemon twice per tree, the way bench_daemon times
it (from the Popen of `fieldgate run` to the first telemetry message at a subscriber), with the CPU seconds
the start cost by then (the daemon's and its validating child's, from /proc: clock ticks of 10 ms):

- *cold*: a fresh work directory, so no snapshot of an earlier validation beside the buffer: the daemon waits
  for its validating child (agent/config/validate.py);
- *warm*: the same file again after a clean stop: the daemon starts from the kept snapshot.

Several trees (`--tree PATH`, repeatable; default: this checkout) are run in turn within each round, so that a
before/after comparison shares the machine's speed of the moment (it drifts; docs/PERFORMANCE.md). Each tree
runs from its own source with this venv's interpreter and packages (PYTHONPATH and the working directory are
the tree), its modules byte-compiled first as installed. `--budget` confines each daemon (and its child) to a
quarter of one core and 256 MiB, as bench_budget does (root; a fresh cgroup per start).

    python -m bench.bench_startup [--quick] [--rounds N] [--tree PATH ...] [--budget] [--devices N] [--registers N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from bench.bench_budget import Budget, Refused, make_budget
from bench.bench_daemon import machine_speed, start_simulator, write_config
from tests.broker import Broker
from tests.daemon import REPO

CLK_TCK = os.sysconf("SC_CLK_TCK")


class FirstArrival:
    """The first telemetry message of each gateway id, by arrival time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.first: dict[str, float] = {}
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-startup") as client:
                    await client.subscribe("fieldgate/+/telemetry", qos=1)
                    self.ready.set()
                    async for msg in client.messages:
                        gateway = str(msg.topic).split("/")[1]
                        self.first.setdefault(gateway, time.monotonic())
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)


def precompile(tree: Path) -> None:
    """Byte-compile a tree's modules, as `pip install` leaves them (bench_daemon.precompile, for any tree)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree / "agent"), str(tree / "drivers")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def start(tree: Path, config: Path, budget: Budget | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(tree), FIELDGATE_CACHE_DIR=str(config.parent / "cache"))
    out = open(config.parent / "daemon.log", "ab")  # noqa: SIM115 - owned by the process
    cmd = [sys.executable, "-m", "agent.cli", "run", "-c", str(config), "--log-level", "info"]
    try:
        return subprocess.Popen(
            [*(budget.prefix() if budget else []), *cmd],
            stdout=out,
            stderr=out,
            cwd=tree,
            env=env,
            preexec_fn=budget.enter if budget else None,  # in the child before exec: only file writes
        )
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_of(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process, and of its children it has waited for (the validating child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


async def first_reading(
    tree: Path, config: Path, gateway: str, platform: FirstArrival, budget_args: tuple[float, int] | None
) -> tuple[float, float]:
    """Seconds from the start of `fieldgate run` to the first telemetry message of `gateway`, and the CPU
    seconds the start cost by then (the daemon's and its validating child's)."""
    budget = make_budget(*budget_args) if budget_args else None
    try:
        platform.first.pop(gateway, None)
        t0 = time.monotonic()
        proc = start(tree, config, budget)
        try:
            while gateway not in platform.first and time.monotonic() - t0 < 60:
                await asyncio.sleep(0.002)
            own, children = cpu_of(proc.pid)
            return round(platform.first.get(gateway, time.monotonic()) - t0, 3), round(own + children, 2)
        finally:
            stop(proc)
            await asyncio.sleep(0.3)  # what the stop flushed arrives now, not during the next start
            platform.first.pop(gateway, None)
    finally:
        if budget is not None:
            budget.remove()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    trees = [Path(t).resolve() for t in args.tree] or [REPO]
    for tree in trees:
        precompile(tree)
    broker = Broker().start()
    sim, sim_port = start_simulator(args.devices)
    platform = FirstArrival(broker.port)
    watcher = asyncio.create_task(platform.run())
    budget_args = (25.0, 256) if args.budget else None
    kinds = ("cold", "warm", "cold_cpu_s", "warm_cpu_s")
    results: dict[str, dict[str, list[float]]] = {str(t): {k: [] for k in kinds} for t in trees}
    try:
        await platform.ready.wait()
        n = 0
        for _ in range(args.rounds):
            for tree in trees:
                n += 1
                workdir = Path(tempfile.mkdtemp(prefix="fg-startup-"))
                try:
                    config = write_config(workdir, broker, sim_port, args.devices, args.registers)
                    gateway = f"start{n}"
                    config.write_text(config.read_text().replace("id: bench,", f"id: {gateway},"))
                    for kind in ("cold", "warm"):
                        s, cpu = await first_reading(tree, config, gateway, platform, budget_args)
                        results[str(tree)][kind].append(s)
                        results[str(tree)][f"{kind}_cpu_s"].append(cpu)
                        # The warm start's first message must be a fresh reading, not the rest of the buffer.
                        for db in workdir.glob("buffer.db*"):
                            db.unlink()
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
    finally:
        sim.terminate()
        sim.wait()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        broker.cleanup()
    return {
        "workload": f"{args.devices} devices x {args.registers} holding registers every 1 s, QoS 1, "
        "start -> first reading upstream",
        "budget": "25 % of one core, 256 MiB" if args.budget else "none",
        "machine_loop_s": machine_speed(),
        "rounds": args.rounds,
        "median": {
            tree: {kind: statistics.median(v) for kind, v in r.items()} for tree, r in results.items()
        },
        "all": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tree", action="append", default=[], help="a source tree to start (repeatable)")
    ap.add_argument("--budget", action="store_true", help="a quarter of one core and 256 MiB (root)")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=20)
    args = ap.parse_args()
    if args.quick:
        args.rounds = 3
    if args.budget:
        try:
            make_budget(25.0, 256).remove()
        except Refused as e:
            print(f"bench_startup: cannot run under a budget here: {e}", file=sys.stderr)
            sys.exit(2)
    result = asyncio.run(run(args))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print()
    print(f"Machine speed: {result['machine_loop_s']} s of CPU for the reference loop (lower is faster).")
    print(
        f"Budget: {result['budget']}. Medians of {args.rounds} rounds, trees interleaved within each round."
    )
    print()
    print(
        "| tree | cold start -> first reading, s | its CPU, s | warm (snapshot kept), s | its CPU, s | cold runs |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for tree, r in result["all"].items():
        med = result["median"][tree]
        print(
            f"| {tree} | {med['cold']} | {med['cold_cpu_s']} | {med['warm']} | {med['warm_cpu_s']} "
            f"| {', '.join(str(x) for x in r['cold'])} |"
        )


if __name__ == "__main__":
    main()
