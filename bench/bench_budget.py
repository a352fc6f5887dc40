"""The reference workload on a Pi-class budget: the daemon in a cgroup with a quarter of one core and 256 MiB.

Workload: bench_daemon's reference (10 Modbus TCP devices x 20 holding registers every second, QoS 1, the
durable buffer), the daemon (and the validating child it starts) confined to a cgroup:

- CPU: a quota of 25 ms per 100 ms period (cgroup v2 `cpu.max "25000 100000"`, v1 `cpu.cfs_quota_us` 25000
  with `cpu.cfs_period_us` 100000, systemd `CPUQuota=25%`);
- memory: 256 MiB (v2 `memory.max`, v1 `memory.limit_in_bytes`, systemd `MemoryMax=256M`).

Which mechanism is used is detected and printed (`"cgroup"`): `systemd-run --scope` where systemd is PID 1 and
a probe scope starts, else cgroup v2 (`/sys/fs/cgroup/cgroup.controllers`; the cpu and memory controllers are
enabled in the parent's `cgroup.subtree_control` if needed), else cgroup v1 (the `cpu` and `memory`
hierarchies). The child cgroup is created under the bench's own cgroup (the place delegated to it), and
removed at the end. Without root or without a writable hierarchy the bench says so and exits with code 2.

Measured: CPU-s per minute and RSS under the budget (and how often the quota throttled the daemon), start to
the first reading upstream (target <= 1 s), live lag; then a broker outage of `--outage` seconds with a
`kill -9` of the daemon in its middle (restarted at once, the broker still down): readings lost (gaps in the
`seq`s the subscriber received; must be 0), the backlog's drain rate once the broker is back (target
>= 20,000 readings/s) and how far behind live data were during the drain (target: never more than 2 s).
A run with gaps keeps its work directory (the buffer, the daemon's log) and reports which seqs are missing and
how many of them are still in the buffer (durable but not yet sent when the count was made).

    python -m bench.bench_budget [--quick] [--runs N] [--seconds N] [--outage N] [--cpu-quota PCT] [--memory MIB]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from bench.bench_daemon import (
    BenchDaemon,
    cpu_seconds,
    machine_speed,
    precompile,
    proc_status,
    start_simulator,
    write_config,
)
from tests.broker import Broker
from tests.daemon import REPO

PERIOD_US = 100_000


class Refused(Exception):
    """No way to confine the daemon here: the message says why (exit code 2)."""


class Budget:
    """One child cgroup with a CPU quota and a memory limit; `enter()` runs in the child before exec."""

    kind = ""

    def __init__(self, cpu_pct: float, memory_mib: int) -> None:
        self.quota_us = int(PERIOD_US * cpu_pct / 100)
        self.memory_bytes = memory_mib * 1024 * 1024
        self.name = f"fieldgate-bench-{os.getpid()}"

    def prefix(self) -> list[str]:
        """Words put before the daemon's command (systemd-run); none for a cgroup joined in preexec."""
        return []

    def enter(self) -> None:
        """Called in the forked child before exec: join the cgroup (so the daemon's first instruction counts)."""

    def stats(self) -> dict[str, Any]:
        return {}

    def remove(self) -> None:
        pass


def own_cgroup_v1(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise Refused(f"this process is in no cgroup v1 `{controller}` hierarchy")


def v1_mount(controller: str) -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and controller in parts[3].split(","):
            return Path(parts[1])
    return None


class CgroupV1(Budget):
    kind = "cgroup v1 (cpu.cfs_quota_us, memory.limit_in_bytes)"

    def __init__(self, cpu_pct: float, memory_mib: int) -> None:
        super().__init__(cpu_pct, memory_mib)
        self.dirs: dict[str, Path] = {}
        for controller in ("cpu", "memory"):
            mount = v1_mount(controller)
            if mount is None:
                raise Refused(f"no cgroup v1 `{controller}` hierarchy is mounted")
            parent = mount / own_cgroup_v1(controller).lstrip("/")
            child = parent / self.name
            try:
                child.mkdir()
            except OSError as e:
                self.remove()
                raise Refused(f"cannot create {child}: {e.strerror}") from None
            self.dirs[controller] = child
        try:
            (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(self.quota_us))
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
        except OSError as e:
            self.remove()
            raise Refused(f"cannot set the limits in {self.dirs}: {e.strerror}") from None

    def enter(self) -> None:
        for d in self.dirs.values():
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict[str, Any]:
        cpu = dict(line.split() for line in (self.dirs["cpu"] / "cpu.stat").read_text().splitlines())
        mem = self.dirs["memory"]
        return {
            "periods": int(cpu["nr_periods"]),
            "throttled_periods": int(cpu["nr_throttled"]),
            "throttled_s": round(int(cpu["throttled_time"]) / 1e9, 2),
            "memory_peak_mib": round(int((mem / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
            "memory_limit_hits": int((mem / "memory.failcnt").read_text()),
        }

    def remove(self) -> None:
        for d in self.dirs.values():
            remove_cgroup(d, d.parent)


class CgroupV2(Budget):
    kind = "cgroup v2 (cpu.max, memory.max)"

    def __init__(self, cpu_pct: float, memory_mib: int) -> None:
        super().__init__(cpu_pct, memory_mib)
        root = Path("/sys/fs/cgroup")
        own = next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line[:3] == "0::"
        )
        # A process may not sit in a cgroup that delegates controllers to children ("no internal processes"):
        # the bench's own cgroup usually holds processes, so the child goes beside it, in its parent.
        parent = (root / own.lstrip("/")).parent if own != "/" else root
        controllers = (parent / "cgroup.controllers").read_text().split()
        if not {"cpu", "memory"} <= set(controllers):
            raise Refused(
                f"{parent}: the cpu and memory controllers are not available ({' '.join(controllers)})"
            )
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        try:
            for c in ("cpu", "memory"):
                if c not in enabled:
                    (parent / "cgroup.subtree_control").write_text(f"+{c}")
            self.dir = parent / self.name
            self.dir.mkdir()
            (self.dir / "cpu.max").write_text(f"{self.quota_us} {PERIOD_US}")
            (self.dir / "memory.max").write_text(str(self.memory_bytes))
        except OSError as e:
            with contextlib.suppress(OSError):
                self.dir.rmdir()
            raise Refused(f"cannot set up a child cgroup under {parent}: {e.strerror}") from None
        self.parent = parent

    def enter(self) -> None:
        (self.dir / "cgroup.procs").write_text("0")

    def stats(self) -> dict[str, Any]:
        cpu = dict(line.split() for line in (self.dir / "cpu.stat").read_text().splitlines())
        out: dict[str, Any] = {
            "periods": int(cpu.get("nr_periods", 0)),
            "throttled_periods": int(cpu.get("nr_throttled", 0)),
            "throttled_s": round(int(cpu.get("throttled_usec", 0)) / 1e6, 2),
        }
        peak = self.dir / "memory.peak"
        if peak.exists():
            out["memory_peak_mib"] = round(int(peak.read_text()) / 2**20, 1)
        events = dict(line.split() for line in (self.dir / "memory.events").read_text().splitlines())
        out["memory_limit_hits"] = int(events.get("max", 0))
        return out

    def remove(self) -> None:
        remove_cgroup(self.dir, self.parent)


class SystemdScope(Budget):
    kind = "systemd-run --scope (CPUQuota=25%, MemoryMax=256M)"

    def __init__(self, cpu_pct: float, memory_mib: int) -> None:
        super().__init__(cpu_pct, memory_mib)
        self.props = ["-p", f"CPUQuota={cpu_pct:g}%", "-p", f"MemoryMax={memory_mib}M"]
        self.kind = f"systemd-run --scope (CPUQuota={cpu_pct:g}%, MemoryMax={memory_mib}M)"
        probe = subprocess.run(
            ["systemd-run", "--scope", "--quiet", "--collect", *self.props, "true"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            raise Refused(f"systemd-run --scope failed: {probe.stderr.strip()[:200]}")
        self.runs = 0

    def prefix(self) -> list[str]:
        # systemd-run --scope execs the command itself: the PID we get is the daemon's.
        self.runs += 1
        unit = f"{self.name}-{self.runs}"
        return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}", *self.props]


def remove_cgroup(d: Path, parent: Path) -> None:
    """Move any process left (none, normally) to the parent, then remove the directory."""
    if not d.exists():
        return
    with contextlib.suppress(OSError):
        for pid in (d / "cgroup.procs").read_text().split():
            (parent / "cgroup.procs").write_text(pid)
    for _ in range(50):
        try:
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    print(f"warning: could not remove {d}", file=sys.stderr)


def make_budget(cpu_pct: float, memory_mib: int) -> Budget:
    if os.geteuid() != 0:
        raise Refused("needs root: it creates a cgroup and sets its CPU quota and memory limit")
    reasons = []
    candidates: list[Callable[[float, int], Budget]] = []
    if Path("/proc/1/comm").read_text().strip() == "systemd" and shutil.which("systemd-run"):
        candidates.append(SystemdScope)
    else:
        reasons.append("systemd is not PID 1")
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        candidates.append(CgroupV2)
    else:
        reasons.append("no cgroup v2 hierarchy at /sys/fs/cgroup")
    if v1_mount("cpu") and v1_mount("memory"):
        candidates.append(CgroupV1)
    else:
        reasons.append("no cgroup v1 cpu and memory hierarchies")
    for make in candidates:
        try:
            return make(cpu_pct, memory_mib)
        except (Refused, OSError) as e:
            reasons.append(str(e))
    raise Refused("no writable cgroup hierarchy: " + "; ".join(reasons))


class BudgetDaemon(BenchDaemon):
    """`fieldgate run` started inside the budget: it joins the cgroup between fork and exec."""

    def __init__(self, config: Path, log: Path, budget: Budget) -> None:
        super().__init__(config, log, "info")
        self.budget = budget

    def start(self) -> BudgetDaemon:
        precompile()
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        env = dict(os.environ, PYTHONPATH=str(REPO), FIELDGATE_CACHE_DIR=str(self.config.parent / "cache"))
        cmd = [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "-c",
            str(self.config),
            "--log-level",
            self.log_level,
        ]
        self.proc = subprocess.Popen(
            [*self.budget.prefix(), *cmd],
            stdout=out,
            stderr=out,
            cwd=REPO,
            env=env,
            preexec_fn=self.budget.enter,  # in the child before exec: only file writes
        )
        out.close()
        return self


class Platform:
    """Every reading's seq, live lag, and backlog arrival times (a persistent session, like a platform)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seqs: set[int] = set()
        self.received = 0
        self.live = 0
        self.backlog = 0
        self.first_at: float | None = None
        self.backlog_first: float | None = None
        self.backlog_last: float | None = None
        self.lags: list[tuple[float, float]] = []  # (arrival, lag ms) of every live reading
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="bench-budget-platform", clean_session=False
                ) as client:
                    await client.subscribe("fieldgate/bench/telemetry", qos=1)
                    self.ready.set()
                    async for msg in client.messages:
                        now = time.monotonic()
                        doc = orjson.loads(msg.payload)  # type: ignore[arg-type]
                        rows = doc["readings"]
                        self.first_at = self.first_at or now
                        self.received += len(rows)
                        self.seqs.update(r["seq"] for r in rows)
                        if doc.get("backlog"):
                            self.backlog += len(rows)
                            self.backlog_first = self.backlog_first or now
                            self.backlog_last = now
                        else:
                            self.live += len(rows)
                            wall = time.time() * 1000
                            self.lags.extend((now, wall - r["ts"]) for r in rows)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    def lost(self) -> int:
        if not self.seqs:
            return 0
        return max(self.seqs) - min(self.seqs) + 1 - len(self.seqs)


def keep_if_gaps(workdir: Path, platform: Platform) -> dict[str, Any] | None:
    """A run with gaps keeps its work directory (buffer, daemon log) and says which seqs are missing and which
    of them are still in the buffer: a reading durable but unsent when the count was made is not one deleted."""
    if not platform.seqs:
        return None
    lo, hi = min(platform.seqs), max(platform.seqs)
    missing = sorted(set(range(lo, hi + 1)) - platform.seqs)
    if not missing:
        return None
    in_buffer: set[int] = set()
    with contextlib.suppress(sqlite3.Error):
        conn = sqlite3.connect(f"file:{workdir / 'buffer.db'}?mode=ro", uri=True)
        try:
            in_buffer = {row[0] for row in conn.execute("SELECT seq FROM readings")} & set(missing)
        finally:
            conn.close()
    return {
        "missing_first": missing[:10],
        "missing_count": len(missing),
        "still_in_buffer": len(in_buffer),
        "workdir_kept": str(workdir),
    }


async def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def one_run(
    budget: Budget, seconds: float, outage: float, devices: int, registers: int
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fg-budget-"))
    broker = Broker(persistence=True).start()
    sim, sim_port = start_simulator(devices)
    platform = Platform(broker.port)
    watcher = asyncio.create_task(platform.run())
    await platform.ready.wait()
    cfg = write_config(workdir, broker, sim_port, devices, registers)
    precompile()
    t0 = time.monotonic()
    daemon = BudgetDaemon(cfg, workdir / "daemon.log", budget).start()
    try:
        await wait_until(lambda: platform.first_at is not None, 30)
        first_reading_s = (platform.first_at or time.monotonic()) - t0
        await asyncio.sleep(3)  # warm-up
        cpu0, w0, live0 = cpu_seconds(daemon.pid), time.monotonic(), platform.live
        await asyncio.sleep(seconds)
        cpu1, w1 = cpu_seconds(daemon.pid), time.monotonic()
        steady = proc_status(daemon.pid)
        values_per_s = (platform.live - live0) / (w1 - w0)
        steady_lags = [lag for at, lag in platform.lags if at >= w0]

        # Outage, with a kill -9 in its middle and a restart at once (the broker still down).
        broker.stop()
        await asyncio.sleep(outage / 2)
        daemon.kill9()
        daemon = BudgetDaemon(cfg, workdir / "daemon.log", budget).start()
        await asyncio.sleep(outage / 2)
        live_before, backlog_before = platform.live, platform.backlog
        platform.backlog_first = platform.backlog_last = None
        broker.start()
        back = time.monotonic()
        await wait_until(lambda: platform.live > live_before or platform.backlog > backlog_before, 30)
        resume_s = time.monotonic() - back
        expected = int(outage * devices * registers)
        await wait_until(lambda: platform.backlog - backlog_before >= expected * 0.98, 120)
        # The backlog's tail and a few live ticks more, so that any gap would show.
        await asyncio.sleep(3)
        drained = platform.backlog - backlog_before
        d0, d1 = platform.backlog_first or back, platform.backlog_last or back
        drain_s = max(d1 - d0, 1e-3)
        # Live readings that arrived while the backlog drained: how far behind the clock were they?
        drain_lags = [lag for at, lag in platform.lags if d0 <= at <= d1 + 0.5]
        cg = budget.stats()

        # A restart with the file unchanged (systemd's Restart=): from the snapshot of the last validation.
        daemon.stop()
        platform.first_at = None
        t1 = time.monotonic()
        daemon = BudgetDaemon(cfg, workdir / "daemon.log", budget).start()
        await wait_until(lambda: platform.first_at is not None, 30)
        restart_first_reading_s = (platform.first_at or time.monotonic()) - t1
    finally:
        code = daemon.stop()
        sim.terminate()
        sim.wait()
        # What the stop flushed and sent is counted too; readings still in the buffer are not lost (top seqs).
        await asyncio.sleep(0.5)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        broker.cleanup()
        kept = keep_if_gaps(workdir, platform)
        if kept is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "cpu_s_per_min": round((cpu1 - cpu0) / (w1 - w0) * 60, 3),
        "cpu_pct_of_budget": round(
            (cpu1 - cpu0) / (w1 - w0) * 100 / (budget.quota_us / PERIOD_US * 100) * 100, 1
        ),
        "rss_mib": round(steady["VmRSS"] / 1024, 1),
        "values_per_s": round(values_per_s, 1),
        "first_reading_s": round(first_reading_s, 3),
        "first_reading_after_restart_s": round(restart_first_reading_s, 3),
        "live_lag_ms_median": round(statistics.median(steady_lags or [0.0]), 1),
        "live_lag_ms_max": round(max(steady_lags or [0.0]), 1),
        "resume_after_broker_back_s": round(resume_s, 3),
        "backlog_readings": drained,
        "drain_readings_per_s": round(drained / drain_s),
        "live_during_drain": len(drain_lags),
        "live_lag_during_drain_ms_max": round(max(drain_lags or [0.0]), 1),
        "received": platform.received,
        "lost": platform.lost(),
        **({"gaps": kept} if kept is not None else {}),
        "duplicates": platform.received - len(platform.seqs),
        "stop_exit_code": code,
        **{f"cgroup_{k}": v for k, v in cg.items()},
    }


TARGETS = {
    "first_reading_s": "<= 1",
    "first_reading_after_restart_s": "<= 1",
    "lost": "0",
    "drain_readings_per_s": ">= 20000",
    "live_lag_during_drain_ms_max": "<= 2000",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short run (about 40 s)")
    ap.add_argument("--seconds", type=float, default=60, help="measured steady window")
    ap.add_argument("--outage", type=float, default=60, help="broker outage (a kill -9 in its middle)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=20)
    ap.add_argument("--cpu-quota", type=float, default=25, help="percent of one core")
    ap.add_argument("--memory", type=int, default=256, help="MiB")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.outage, args.runs = 15, 10, 1
    runs = []
    for _ in range(args.runs):
        # A fresh cgroup per run: its counters (throttling, peak memory) are the run's own.
        try:
            budget = make_budget(args.cpu_quota, args.memory)
        except Refused as e:
            print(f"bench_budget: cannot run under a budget here: {e}", file=sys.stderr)
            sys.exit(2)
        try:
            runs.append(asyncio.run(one_run(budget, args.seconds, args.outage, args.devices, args.registers)))
        finally:
            budget.remove()
    report(args, budget, runs)


def report(args: argparse.Namespace, budget: Budget, runs: list[dict[str, Any]]) -> None:
    keys = [k for k in runs[0] if k != "gaps"]  # "gaps": only in a run that had some (keep_if_gaps)
    result = {
        "workload": f"{args.devices} devices x {args.registers} holding registers every 1 s, QoS 1, "
        f"{args.seconds:g} s measured, {args.outage:g} s outage with a kill -9 in its middle",
        "budget": f"{args.cpu_quota:g} % of one core, {args.memory} MiB",
        "cgroup": budget.kind,
        "machine_loop_s": machine_speed(),
        "runs": len(runs),
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
        "all": runs,
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print()
    print(f"Budget: {result['budget']}, through {budget.kind}.")
    print(f"Machine speed: {result['machine_loop_s']} s of CPU for the reference loop (lower is faster).")
    print()
    print("| figure | median | runs | target |")
    print("| --- | --- | --- | --- |")
    for k in keys:
        print(
            f"| {k} | {result['median'][k]} | {', '.join(str(r[k]) for r in runs)} | {TARGETS.get(k, '')} |"
        )
    for i, r in enumerate(runs, 1):
        if "gaps" in r:
            g = r["gaps"]
            print(
                f"\nrun {i}: {g['missing_count']} seqs missing (first {g['missing_first']}), "
                f"{g['still_in_buffer']} of them still in the buffer; kept: {g['workdir_kept']}"
            )


if __name__ == "__main__":
    main()
