"""Fleet figures: N gateway daemons against one shared Modbus simulator, publishing to a 3-node NATS cluster.

Each gateway runs the real daemon with a light config (5 devices x 10 points every 10 s by default) and lists
the three nodes, rotated so the fleet spreads over them. One platform subscriber (persistent session) on the
cluster records every reading. Measured:

- total readings/s received, RSS and CPU per gateway (from /proc, over the steady window, after `--settle`);
then the `--phases`, in this order:
- `rollout`: a staged rollout (`fieldgate fleet push`, signed, stages 1,10%,50%,100%) over all N gateways,
  where the last gateway's new config names a device profile it does not have: the rollout must halt at the
  last stage and every gateway must end on its exact previous file;
- `kill`: one node killed (SIGKILL) under load: seq gaps per gateway once everything has settled;
- `restart`: a full cluster restart (every node stopped, then started): per gateway, seconds from the start
  of the nodes until its first new reading reaches the platform (distribution), and until every /healthz
  is ok;
then the seq gaps at the end (must be 0).

Run: .venv/bin/python -m bench.bench_fleet [--gateways 200] [--steady 60] [--phases rollout,kill,restart]
Prints the rollout's own output (progress line per stage, final table) and a line per phase on stderr as they
come, then one JSON object (with `--json FILE`, also written there; bench/results/ keeps the N = 200 runs),
then a Markdown table. No assertions: figures only. Starting hundreds of daemons needs the RAM (about 35 MiB
each) and CPU (about a second each); docs/FLEET.md says which N ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.daemon import REPO, Daemon, connect_ro, fieldgate_exe
from tests.natsbroker import NatsCluster

TICK = os.sysconf("SC_CLK_TCK")


def gateway_config(
    gw: str,
    urls: list[str],
    db: Path,
    sim_port: int,
    devices: int,
    points: int,
    poll: str,
    pub: Path,
    variant: str = "current",
) -> str:
    """One gateway's config. `new` adds a point to m1 (the rollout's change); `broken` is `new` with m{devices}
    naming a profile the gateway does not have (its devices make the new config fail: refused)."""
    lines = [
        f"gateway: {{id: {gw}, clock: assume_synced}}",
        f"storage: {{path: {db}, max_size: 16MB}}",
        "upstream:",
        "  mqtt:",
        f"    url: [{', '.join(urls)}]",
        "    failback: 0s",
        "    keepalive: 10s",
        "    health_interval: 60s",
        'local: {listen: ""}',
        f"remote_config: {{enabled: true, rollback_after: 2m, public_key_file: {pub}}}",
        "buses:",
        f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim_port}, timeout: 2s}}",
        "devices:",
    ]
    for d in range(1, devices + 1):
        if variant == "broken" and d == devices:
            lines += [f"  m{d}:", "    bus: lan", f"    unit_id: {d}", "    profile: no-such-profile"]
            continue
        lines += [f"  m{d}:", "    bus: lan", f"    unit_id: {d}", f"    poll: {poll}", "    points:"]
        n = points + 1 if variant != "current" and d == 1 else points
        lines += [f"      p{i}: {{table: holding, address: {i}}}" for i in range(n)]
    return "\n".join(lines) + "\n"


def signing_key(work: Path) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair (PEM): the platform's private key and the gateways' public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    keyfile, pub = work / "platform.key", work / "platform.pub"
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return keyfile, pub


async def run_push(args: list[str], timeout: float) -> tuple[int, list[str]]:
    """`fieldgate fleet push ...`, its output echoed on stderr line by line as it comes (a person follows it)."""
    proc = await asyncio.create_subprocess_exec(
        *fieldgate_exe(), "fleet", "push", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                print(line, file=sys.stderr, flush=True)
            code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        lines.append(f"(bench: fleet push did not finish within {timeout:g} s)")
        code = -1
    return code, lines


async def settle_gaps(
    work: Path, platform: Platform, gateways: list[str], wait: float
) -> tuple[dict[str, int], int]:
    """Seqs stored but not (yet) at the platform, waited on for up to `wait` s; and the seqs stored."""
    highs = {gw: store_high(work / gw / "buffer.db") for gw in gateways}
    deadline = time.monotonic() + wait
    while True:
        missing = {
            gw: sum(1 for s in range(1, highs[gw] + 1) if s not in platform.seqs[gw]) for gw in gateways
        }
        if not any(missing.values()) or time.monotonic() > deadline:
            return missing, sum(highs.values())
        await asyncio.sleep(2)


def proc_figures(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds so far) of one process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / TICK


def store_high(db: Path) -> int:
    conn = connect_ro(db)
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
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the shared simulator's complaints, at N = 200
    work = Path(tempfile.mkdtemp(prefix="fg-bench-fleet-"))
    n = args.gateways
    # Waits that grow with the fleet: every daemon start, reconnect and config check costs CPU on the same cores.
    patience = max(300.0, 3.0 * n)
    sim = ModbusSim({u: SimUnit() for u in range(1, args.devices + 1)})
    for unit in sim.units.values():
        unit.set("holding", 0, list(range(100, 100 + args.points + 1)))
    await sim.start_tcp("127.0.0.1", 0)
    cluster = NatsCluster(3)
    await asyncio.to_thread(cluster.start, patience)
    platform = Platform([nd.port for nd in cluster.nodes])
    ptask = asyncio.create_task(platform.run())
    await asyncio.wait_for(platform.connected.wait(), 30)
    keyfile, pub = signing_key(work)
    current, new = work / "configs-current", work / "configs-new"
    current.mkdir()
    new.mkdir()
    daemons: dict[str, Daemon] = {}
    out: dict[str, Any] = {
        "gateways": n,
        "devices": args.devices,
        "points": args.points,
        "interval": args.interval,
    }
    try:
        t0 = time.monotonic()
        for g in range(n):
            gw = f"gw-{g:04d}"
            d = work / gw
            d.mkdir()
            k = g % 3
            urls = cluster.urls[k:] + cluster.urls[:k]  # rotated: the fleet spreads over the nodes
            common = (gw, urls, d / "buffer.db", sim.port, args.devices, args.points, args.interval, pub)
            text = gateway_config(*common)
            (d / "fieldgate.yaml").write_text(text)
            (current / f"{gw}.yaml").write_text(text)
            variant = "broken" if g == n - 1 else "new"  # the last gateway's devices make the new config fail
            (new / f"{gw}.yaml").write_text(gateway_config(*common, variant=variant))
            daemons[gw] = Daemon(d / "fieldgate.yaml", d / "daemon.log").start()
            await asyncio.sleep(args.start_spacing)
        expected = n * args.devices * args.points
        deadline = time.monotonic() + patience
        while sum(1 for s in platform.seqs.values() if s) < n and time.monotonic() < deadline:
            await asyncio.sleep(1)
        out["start_all_s"] = round(time.monotonic() - t0, 1)
        out["started"] = sum(1 for s in platform.seqs.values() if s)
        say(f"{out['started']} of {n} gateways delivering after {out['start_all_s']} s")

        await asyncio.sleep(
            args.settle
        )  # the last gateways' subscriptions and first backlog, before measuring
        # Steady state.
        first = {gw: proc_figures(d.pid) for gw, d in daemons.items()}
        c0, m0, b0, w0 = platform.count, platform.messages, platform.bytes, time.monotonic()
        await asyncio.sleep(args.steady)
        c1, m1, b1, w1 = platform.count, platform.messages, platform.bytes, time.monotonic()
        last = {gw: proc_figures(d.pid) for gw, d in daemons.items()}
        rss = [last[gw][0] for gw in daemons]
        cpu = [(last[gw][1] - first[gw][1]) / (w1 - w0) * 100 for gw in daemons]
        out["steady"] = {
            "seconds": round(w1 - w0, 1),
            "readings_per_s": round((c1 - c0) / (w1 - w0), 1),
            "messages_per_s": round((m1 - m0) / (w1 - w0), 2),
            "payload_bytes_per_reading": round((b1 - b0) / max(1, c1 - c0), 1),
            "expected_readings_per_s": round(expected / _seconds(args.interval), 1),
            "rss_mib_median": round(statistics.median(rss), 1),
            "rss_mib_max": round(max(rss), 1),
            "cpu_pct_median": round(statistics.median(cpu), 2),
            "cpu_pct_p95": round(pct(cpu, 0.95), 2),
            "cpu_pct_max": round(max(cpu), 2),
        }
        say(f"steady: {out['steady']}")

        if "rollout" in args.phases:
            # Staged rollout over the whole fleet; the last gateway refuses its new config.
            push_wait = max(180.0, 1.0 * n)  # per stage: the gateways of a stage check their config at once
            t_push = time.monotonic()
            code, lines = await run_push(
                [
                    str(new), "--previous", str(current), "--broker", cluster.urls[1], "--key", str(keyfile),
                    "--stages", args.stages, "--timeout", f"{push_wait:g}s", "--id", "bench-roll",
                ],
                timeout=10 * push_wait,
            )  # fmt: skip
            took = time.monotonic() - t_push
            rows = table_rows(lines)
            outcomes: dict[str, int] = defaultdict(int)
            rollbacks: dict[str, int] = defaultdict(int)
            for r in rows:
                outcomes[r["OUTCOME"]] += 1
                if r["ROLLBACK"] != "-":
                    rollbacks[r["ROLLBACK"]] += 1
            changed = [
                gw
                for gw in daemons
                if (work / gw / "fieldgate.yaml").read_bytes() != (current / f"{gw}.yaml").read_bytes()
            ]
            out["rollout"] = {
                "stages": args.stages,
                "exit_code": code,
                "seconds": round(took, 1),
                "stage_lines": [
                    ln for ln in lines if ln.startswith(("stage ", "  gw-", "halted", "fleet push"))
                ],
                "outcomes": dict(outcomes),
                "rollbacks": dict(rollbacks),
                "refused": [r["GATEWAY"] for r in rows if r["OUTCOME"] == "refused"],
                "files_not_previous_after": changed,  # must be empty: nothing else changes
            }
        if "kill" in args.phases:
            # One node killed under load, then everything settled.
            victim = cluster.nodes[0]
            victim.kill9()
            await asyncio.sleep(args.after_kill)
            await asyncio.to_thread(victim.start)
            try:
                await asyncio.to_thread(victim.wait_ready, patience)
            except RuntimeError as exc:  # not healthy in time: the gaps below say whether anything was lost
                say(f"killed node not ready again: {str(exc)[:200]}")
            await asyncio.sleep(args.interval_s * 2)
            missing, stored = await settle_gaps(work, platform, list(daemons), patience)
            out["node_kill"] = {
                "gateways_with_gaps": sum(1 for v in missing.values() if v),
                "missing_seqs": sum(missing.values()),
                "stored": stored,
            }
            say(f"node kill: {out['node_kill']}")

        if "restart" in args.phases:
            # Full cluster restart, last: with hundreds of R3 consumers JetStream takes minutes to recover here.
            tops = {gw: max(platform.seqs[gw], default=0) for gw in daemons}
            await asyncio.to_thread(stop_all, cluster)  # off the event loop: the simulator keeps answering
            await asyncio.sleep(args.outage)
            restart = time.monotonic()
            cursor = len(platform.arrivals)
            for nd in cluster.nodes:
                await asyncio.to_thread(nd.start, False)
            ready: float | None = None
            back: dict[str, float] = {}
            deadline = time.monotonic() + patience
            while (len(back) < len(daemons) or ready is None) and time.monotonic() < deadline:
                arrivals = platform.arrivals
                for i in range(cursor, len(arrivals)):
                    t, gw, seq = arrivals[i]
                    if gw not in back and seq > tops[gw]:
                        back[gw] = t - restart
                cursor = len(arrivals)
                if ready is None and all(
                    await asyncio.gather(*(asyncio.to_thread(nd.healthy) for nd in cluster.nodes))
                ):
                    ready = time.monotonic() - restart
                await asyncio.sleep(0.5)
            values = list(back.values())
            out["cluster_restart"] = {
                "outage_s": args.outage,
                "cluster_healthy_s": round(ready, 2) if ready is not None else None,  # every /healthz ok
                "gateways_back": len(back),
                "after_start_s": {
                    "min": round(min(values), 2) if values else None,
                    "p10": round(pct(values, 0.1), 2),
                    "p50": round(pct(values, 0.5), 2),
                    "p90": round(pct(values, 0.9), 2),
                    "max": round(max(values), 2) if values else None,
                },
                # how many gateways came back in each second after the nodes were started (the storm's shape)
                "per_second": dict(sorted(
                    (str(sec), sum(1 for v in values if int(v) == sec)) for sec in {int(v) for v in values}
                )),
            }  # fmt: skip
            say(f"cluster restart: {out['cluster_restart']}")

        # Every seq stored (through the rollout's reloads, the kill and the restart) reaches the platform.
        await asyncio.sleep(args.interval_s * 2)
        missing, stored = await settle_gaps(work, platform, list(daemons), patience)
        out["final"] = {
            "gateways_with_gaps": sum(1 for v in missing.values() if v),
            "missing_seqs": sum(missing.values()),
            "stored": stored,
            "daemons_alive": sum(1 for d in daemons.values() if d.alive()),
        }
    except Exception as exc:  # a phase that broke: keep the figures measured so far
        out["error"] = f"{type(exc).__name__}: {exc}"
        say(f"bench broke: {out['error']}")
    finally:
        stops = [d.stop() for d in daemons.values()]
        out["daemon_exit_codes"] = dict(sorted((str(c), stops.count(c)) for c in set(stops)))
        ptask.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ptask
        cluster.cleanup()
        await sim.aclose()
        if args.keep:
            say(f"kept: {work} (configs, buffers and logs of every gateway)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return out


def table_rows(lines: list[str]) -> list[dict[str, str]]:
    """The rows of the rollout's final table (`GATEWAY  OUTCOME  ROLLBACK  DETAIL`), cut at the header's columns."""
    head = next((i for i, ln in enumerate(lines) if ln.startswith("GATEWAY ")), None)
    if head is None:
        return []
    names = lines[head].split()
    starts = [lines[head].index(name) for name in names]
    rows = []
    for ln in lines[head + 1 :]:
        if not ln.startswith("gw-"):
            break
        cells = [ln[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def stop_all(cluster: NatsCluster) -> None:
    for nd in cluster.nodes:
        nd.stop()


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _seconds(text: str) -> float:
    from agent.config.units import parse_duration

    return parse_duration(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gateways", type=int, default=200)
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--points", type=int, default=10)
    p.add_argument("--interval", default="10s", help="poll interval of every device")
    p.add_argument("--steady", type=float, default=60, help="seconds of steady state measured")
    p.add_argument("--settle", type=float, default=30, help="seconds between start-up and the steady window")
    p.add_argument("--outage", type=float, default=5, help="seconds the whole cluster stays down")
    p.add_argument("--after-kill", type=float, default=15, help="seconds before the killed node restarts")
    p.add_argument("--start-spacing", type=float, default=0.2, help="seconds between daemon starts")
    p.add_argument("--stages", default="1,10%,50%,100%", help="the rollout's stages (fleet push --stages)")
    p.add_argument(
        "--phases", default="rollout,kill,restart", help="what runs after the steady window, in this order"
    )
    p.add_argument("--keep", action="store_true", help="keep the gateways' directories (logs) afterwards")
    p.add_argument("--json", type=Path, help="also write the JSON object to this file")
    args = p.parse_args()
    args.interval_s = _seconds(args.interval)
    result = asyncio.run(bench(args))
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if "error" in result or "final" not in result:
        print(f"\n(incomplete run: {result.get('error', 'no final figures')})")
        return
    s = result["steady"]
    r, k, ro = (result.get(key, {}) for key in ("cluster_restart", "node_kill", "rollout"))
    a = r.get("after_start_s", {})
    print()
    print(
        "| gateways | readings/s (expected) | RSS MiB p50/max | CPU % p50/p95 | back after cluster restart "
        "p50/p90/max s | node kill: seq missing | rollout: outcome, files changed after | seq missing at the end |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    rollout = (
        f"exit {ro['exit_code']}, {ro['outcomes']}, rolled back {ro['rollbacks']}, "
        f"{len(ro['files_not_previous_after'])} files changed"
        if ro
        else "-"
    )
    print(
        f"| {result['gateways']} | {s['readings_per_s']} ({s['expected_readings_per_s']}) | "
        f"{s['rss_mib_median']} / {s['rss_mib_max']} | {s['cpu_pct_median']} / {s['cpu_pct_p95']} | "
        f"{a.get('p50', '-')} / {a.get('p90', '-')} / {a.get('max', '-')} ({r.get('gateways_back', '-')} back) | "
        f"{k.get('missing_seqs', '-')} of {k.get('stored', '-')} | {rollout} | "
        f"{result['final']['missing_seqs']} of {result['final']['stored']} |"
    )


if __name__ == "__main__":
    main()
