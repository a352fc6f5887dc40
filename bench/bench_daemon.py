"""The whole daemon under the reference workload: CPU seconds and RSS, start-up, resume and backlog drain.

Workload (issue 13's reference): 10 Modbus TCP devices x 20 holding registers polled every second (200 values/s),
forwarded over MQTT QoS 1 through the durable buffer. The simulator runs in its own process so that only the
daemon's own CPU is counted (read from /proc/PID/stat).

    python -m bench.bench_daemon [--quick] [--seconds N] [--outage N] [--runs N] [--devices N] [--registers N]
                                 [--poll S] [--log-level LEVEL] [--scrape S | --scrape-compare S]

`--scrape S` turns the local API on and fetches GET /metrics every S seconds during the run, as a Prometheus
server would (`--scrape 0`: the API listens, nobody scrapes), and reports the CPU of one scrape (a burst of
back-to-back scrapes after the measured window, so it does not disturb it). `--scrape-compare S` runs pairs,
interleaved: without scraping, then scraping every S seconds, `--runs` times, and prints both medians.

The daemon runs as deployed: `--log-level info` (debug logs every Modbus frame and is not a production
setting) and `gateway.clock: assume_synced` (this bench host has no NTP; a deployed gateway is synchronised,
and an unsynchronised one marks every reading `uncertain`, which costs a copy of each reading).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from tests.broker import Broker, free_port
from tests.daemon import REPO, Daemon

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def start_simulator(devices: int) -> tuple[subprocess.Popen[str], int]:
    units = ",".join(str(u) for u in range(1, devices + 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "drivers.modbus.simulator", "--port", "0", "--units", units],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "modbus simulator listening on 127.0.0.1:PORT, units [...]"
    port = int(line.split("127.0.0.1:")[1].split(",")[0])
    return proc, port


UNITS_PER_BUS = 200  # Modbus unit ids stop at 247: more devices than this get another simulator and bus


def start_simulators(devices: int) -> list[tuple[subprocess.Popen[str], int]]:
    """One simulator process per UNITS_PER_BUS devices (1,000 devices: 5 buses of 200 units)."""
    counts = [min(UNITS_PER_BUS, devices - first) for first in range(0, devices, UNITS_PER_BUS)]
    return [start_simulator(n) for n in counts]


def machine_speed() -> float:
    """CPU seconds of a pure-Python loop of 3 million additions (median of 3): how fast this machine is now.
    The same code measures differently on machines, or on one VM an hour apart (docs/PERFORMANCE.md); this
    figure puts each report's numbers in their context."""
    times = []
    for _ in range(3):
        t0, total = time.process_time(), 0
        for i in range(3_000_000):
            total += i
        times.append(time.process_time() - t0)
    return round(statistics.median(times), 3)


@functools.cache
def precompile() -> None:
    """Byte-compile the daemon's modules, as `pip install` does on a gateway. The bench runs from the source
    tree, and where PYTHONDONTWRITEBYTECODE is set (this machine) every start would compile them again:
    +0.4 MiB of RSS and about 0.1 s of start-up that a deployed daemon does not pay. Once per bench process,
    and before any start is timed (the check alone is a 30-50 ms subprocess)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO / "agent"), str(REPO / "drivers")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


# The allocator settings of systemd/fieldgate.service (`Environment=`), so that the bench runs the daemon as
# deployed; FIELDGATE_BENCH_PLAIN_MALLOC=1 leaves glibc's defaults (to measure what they change).
ALLOCATOR_ENV = (
    {}
    if os.environ.get("FIELDGATE_BENCH_PLAIN_MALLOC")
    else {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "524288", "MALLOC_TRIM_THRESHOLD_": "1048576"}
)


class BenchDaemon(Daemon):
    """`fieldgate run` at a production log level (the test harness runs it at debug)."""

    def __init__(self, config: Path, log: Path, log_level: str) -> None:
        super().__init__(config, log)
        self.log_level = log_level

    def start(self) -> BenchDaemon:
        precompile()
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        # As systemd's CacheDirectory= gives it: where the snapshot of the last validation is kept
        env = dict(os.environ, PYTHONPATH=str(REPO), FIELDGATE_CACHE_DIR=str(self.config.parent / "cache"))
        env.update(ALLOCATOR_ENV)  # as systemd/fieldgate.service sets them
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(self.config), "--log-level", self.log_level],
            stdout=out,
            stderr=out,
            cwd=REPO,
            env=env,
        )
        out.close()
        return self


def write_config(
    workdir: Path,
    broker: Broker,
    sim_port: int | list[int],
    devices: int,
    registers: int,
    poll: float = 1.0,
    local_port: int | None = None,
) -> Path:
    """The bench's config; with several simulator ports (start_simulators), device d is unit
    (d - 1) % UNITS_PER_BUS + 1 of bus `lan`, `lan2`... in turn."""
    ports = sim_port if isinstance(sim_port, list) else [sim_port]
    buses = [("lan" if i == 0 else f"lan{i + 1}", port) for i, port in enumerate(ports)]
    listen = f"'127.0.0.1:{local_port}'" if local_port else "''"
    lines = [
        "gateway: {id: bench, clock: assume_synced}",
        f"storage: {{path: {workdir / 'buffer.db'}, max_size: 512MB}}",
        f"upstream: {{mqtt: {{url: 'mqtt://127.0.0.1:{broker.port}', keepalive: 5s}}}}",
        f"local: {{listen: {listen}}}",
        "buses: {"
        + ", ".join(f"{n}: {{type: modbus-tcp, host: 127.0.0.1, port: {p}, timeout: 1s}}" for n, p in buses)
        + "}",
        "devices:",
    ]
    for d in range(1, devices + 1):
        points = ", ".join(f"r{i}: {{table: holding, address: {i}}}" for i in range(registers))
        bus = buses[(d - 1) // UNITS_PER_BUS][0] if len(buses) > 1 else "lan"
        unit = (d - 1) % UNITS_PER_BUS + 1 if len(buses) > 1 else d
        lines.append(f"  dev{d:03d}: {{bus: {bus}, unit_id: {unit}, poll: {poll:g}s, points: {{{points}}}}}")
    cfg = workdir / "fieldgate.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


class Platform:
    """Counts readings as they arrive, live and backlog, with arrival times."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.live = 0
        self.backlog = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.backlog_first: float | None = None
        self.backlog_last: float | None = None
        self.live_lag_ms: list[float] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="bench-platform", clean_session=False
                ) as client:
                    await client.subscribe("fieldgate/bench/telemetry", qos=1)
                    self.ready.set()
                    async for msg in client.messages:
                        now = time.monotonic()
                        doc = orjson.loads(msg.payload)  # type: ignore[arg-type]
                        n = len(doc["readings"])
                        self.first_at = self.first_at or now
                        self.last_at = now
                        if doc.get("backlog"):
                            self.backlog += n
                            self.backlog_first = self.backlog_first or now
                            self.backlog_last = now
                        else:
                            self.live += n
                            wall = time.time() * 1000
                            self.live_lag_ms.extend(wall - r["ts"] for r in doc["readings"])
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)


async def fetch_metrics(port: int) -> int:
    """One GET /metrics, as a Prometheus server does it; returns the body's size."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return len(body)


async def scraper(port: int, every: float, done: list[int]) -> None:
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(OSError):  # not listening yet
            done.append(await fetch_metrics(port))


async def one_run(
    seconds: float,
    outage: float,
    devices: int,
    registers: int,
    poll: float = 1.0,
    log_level: str = "info",
    warmup: float = 3.0,
    scrape: float | None = None,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fg-bench-"))
    broker = Broker(persistence=True).start()
    sims = start_simulators(devices)
    platform = Platform(broker.port)
    watcher = asyncio.create_task(platform.run())
    await platform.ready.wait()
    local_port = free_port() if scrape is not None else None
    cfg = write_config(workdir, broker, [port for _, port in sims], devices, registers, poll, local_port)
    scrapes: list[int] = []
    scraping = (
        asyncio.create_task(scraper(local_port, scrape, scrapes))
        if local_port is not None and scrape
        else None
    )
    scrape_figures: dict[str, Any] = {}
    precompile()
    t0 = time.monotonic()
    daemon = BenchDaemon(cfg, workdir / "daemon.log", log_level).start()
    try:
        while platform.first_at is None and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.005)
        first_reading_s = (platform.first_at or time.monotonic()) - t0
        await asyncio.sleep(warmup)  # warm-up: imports done, caches hot, every device polled
        cpu0, w0, live0 = cpu_seconds(daemon.pid), time.monotonic(), platform.live
        samples = []
        while time.monotonic() - w0 < seconds:
            await asyncio.sleep(min(5, seconds / 4))
            samples.append(proc_status(daemon.pid))
        cpu1, w1 = cpu_seconds(daemon.pid), time.monotonic()
        steady = proc_status(daemon.pid)
        values_per_s = (platform.live - live0) / (w1 - w0)
        lag = sorted(platform.live_lag_ms[-2000:]) or [0.0]
        if scraping is not None and local_port is not None:
            scraping.cancel()
            burst, c0, b0 = 100, cpu_seconds(daemon.pid), time.monotonic()
            for _ in range(burst):
                size = await fetch_metrics(local_port)
            c1, b1 = cpu_seconds(daemon.pid), time.monotonic()
            # the burst's CPU includes the workload's own for its duration: subtract it
            own = (cpu1 - cpu0) / (w1 - w0) * (b1 - b0)
            scrape_figures = {
                "scrapes_in_window": len(scrapes),
                "metrics_bytes": size,
                "scrape_cpu_ms": round(max(c1 - c0 - own, 0.0) / burst * 1000, 2),
            }

        # Outage: the broker goes away, readings pile up in the buffer, then it comes back.
        broker.stop()
        await asyncio.sleep(outage)
        live_before, backlog_before = platform.live, platform.backlog
        # Only the outage's replay is timed: readings stored in the few ms before the first connection also
        # come as backlog (by design), and would stretch the drain over the whole run.
        platform.backlog_first = platform.backlog_last = None
        broker.start()
        back = time.monotonic()
        while (
            platform.live == live_before
            and platform.backlog == backlog_before
            and time.monotonic() - back < 30
        ):
            await asyncio.sleep(0.005)
        resume_s = time.monotonic() - back
        expected = int(outage * devices * registers / poll)
        while platform.backlog - backlog_before < expected * 0.98 and time.monotonic() - back < 60:
            await asyncio.sleep(0.05)
        drained = platform.backlog - backlog_before
        drain_s = max((platform.backlog_last or back) - (platform.backlog_first or back), 1e-3)

        # A restart with the same file (systemd's Restart=, a power cut): the daemon starts from the snapshot
        # of its last validation (agent/config/validate.py) instead of waiting for the validating child.
        daemon.stop()
        platform.first_at = None
        t1 = time.monotonic()
        daemon = BenchDaemon(cfg, workdir / "daemon.log", log_level).start()
        while platform.first_at is None and time.monotonic() - t1 < 30:
            await asyncio.sleep(0.005)
        restart_first_reading_s = (platform.first_at or time.monotonic()) - t1
    finally:
        if scraping is not None:
            scraping.cancel()
        daemon.stop()
        for sim, _ in sims:
            sim.terminate()
            sim.wait()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        broker.cleanup()
    return {
        "cpu_s_per_min": round((cpu1 - cpu0) / (w1 - w0) * 60, 3),
        "cpu_pct_of_core": round((cpu1 - cpu0) / (w1 - w0) * 100, 2),
        "rss_mib": round(steady["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(steady["VmHWM"] / 1024, 1),
        "threads": steady["Threads"],
        "fds": steady["fds"],
        "values_per_s": round(values_per_s, 1),
        "first_reading_s": round(first_reading_s, 3),
        "first_reading_after_restart_s": round(restart_first_reading_s, 3),
        "live_lag_ms_median": round(statistics.median(lag), 1),
        "resume_after_broker_back_s": round(resume_s, 3),
        "backlog_readings": drained,
        "drain_readings_per_s": round(drained / drain_s),
        **scrape_figures,
        "rss_samples_mib": [round(s["VmRSS"] / 1024, 1) for s in samples],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short run for CI (about 30 s)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--outage", type=float, default=60)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=20)
    ap.add_argument("--poll", type=float, default=1.0, help="poll interval of every device, seconds")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    ap.add_argument("--scrape", type=float, default=None, help="local API on, GET /metrics every S seconds")
    ap.add_argument(
        "--scrape-compare", type=float, default=None, help="interleaved pairs: no scrape / a scrape every S s"
    )
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.outage, args.runs = 10, 8, 1
    if args.scrape_compare:
        compare_scrape(args)
        return
    report(args, "holding registers")


def compare_scrape(args: argparse.Namespace) -> None:
    """Pairs of runs, interleaved (the machine's speed drifts): local API listening and nobody scraping,
    then GET /metrics every `args.scrape_compare` seconds."""
    pairs = []
    for _ in range(args.runs):
        pair = {}
        for label, scrape in (("idle", 0.0), ("scraped", args.scrape_compare)):
            pair[label] = asyncio.run(
                one_run(args.seconds, args.outage, args.devices, args.registers, args.poll, args.log_level,
                        warmup=max(3.0, args.poll + 2.0), scrape=scrape)
            )  # fmt: skip
        pairs.append(pair)
    keys = ("cpu_s_per_min", "rss_mib", "live_lag_ms_median")
    result: dict[str, Any] = {
        "workload": f"{args.devices} devices x {args.registers} registers every {args.poll:g} s, "
        f"{args.seconds:g} s measured per run, GET /metrics every {args.scrape_compare:g} s or never",
        "machine_loop_s": machine_speed(),
        "pairs": len(pairs),
        "median": {
            label: {k: statistics.median(p[label][k] for p in pairs) for k in keys}
            for label in ("idle", "scraped")
        },
        "scrape_cpu_ms_median": statistics.median(p["scraped"]["scrape_cpu_ms"] for p in pairs),
        "metrics_bytes": pairs[-1]["scraped"]["metrics_bytes"],
        "cpu_s_per_min_pairs": [(p["idle"]["cpu_s_per_min"], p["scraped"]["cpu_s_per_min"]) for p in pairs],
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def report(args: argparse.Namespace, what: str) -> None:
    """Run the workload `args.runs` times; print medians as JSON, then a Markdown table."""
    runs = [
        asyncio.run(
            one_run(
                args.seconds,
                args.outage,
                args.devices,
                args.registers,
                args.poll,
                args.log_level,
                warmup=max(3.0, args.poll + 2.0),
            )
        )
        for _ in range(args.runs)
    ]
    keys = [k for k in runs[0] if k != "rss_samples_mib"]
    result = {
        "workload": f"{args.devices} devices x {args.registers} {what} every {args.poll:g} s, QoS 1, "
        f"{args.seconds:g} s measured, {args.outage:g} s outage, log level {args.log_level}",
        "machine_loop_s": machine_speed(),
        "runs": len(runs),
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
        "all": runs,
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print()
    print(f"Machine speed: {result['machine_loop_s']} s of CPU for the reference loop (lower is faster).")
    print()
    print("| figure | median |")
    print("| --- | --- |")
    for k in keys:
        print(f"| {k} | {result['median'][k]} |")


if __name__ == "__main__":
    main()
