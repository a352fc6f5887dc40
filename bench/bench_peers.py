"""fieldgate against its peers, side by side in one run: the ThingsBoard IoT Gateway and Node-RED.

The same workload for all three (bench_daemon's reference: 10 Modbus TCP devices x 20 holding registers every
second), the same Modbus simulator (drivers/modbus/simulator.py, one process, the 10 unit ids on one port),
the same Mosquitto on a free loopback port, and one collector subscribed to `v1/gateway/telemetry` (the
ThingsBoard gateway API, which all three speak: fieldgate with `format: thingsboard`) that records every
reading per device, key and timestamp.

- fieldgate: `fieldgate run` as bench_daemon starts it (log level info, durable buffer, QoS 1).
- ThingsBoard IoT Gateway: `thingsboard-gateway` from PyPI in its own venv under the cache directory (never
  the project's venv), with the pymodbus version its Modbus connector pins installed there too (it would
  otherwise pip-install it at run time); a generated Modbus connector (one slave per device, 20 timeseries
  of one register each, `pollPeriod` 1000 ms); its default memory storage, QoS 1, statistics and remote
  configuration off.
- Node-RED: `node-red` and `node-red-contrib-modbus` from the npm registry (`npm install --prefix` into the
  cache directory); a generated flow: one modbus-read node per device (20 holding registers every 1 s) ->
  a function node shaping the ThingsBoard telemetry -> one MQTT out node, QoS 1. Its generated settings.js
  turns off the update check / diagnostics, binds the editor to 127.0.0.1 and installs nothing at run time.

Each peer, in an order rotated each round, is started, measured for `--seconds` (CPU-s per minute of all its
processes, user + system, reaped children included; RSS summed over its processes), then the broker goes
away for `--outage` seconds (broker back -> data), then the peer is killed with SIGKILL (broker up) and
restarted. Readings lost: per device and key, the 1 s slots missing between consecutive readings received
(a gap of 3 s = 2 lost), over the whole run; the gap across the kill counts only up to the kill (the peer
cannot poll while dead). Every process is started and stopped by PID; only 127.0.0.1.

    python -m bench.bench_peers [--quick] [--rounds N] [--seconds N] [--outage N] [--peers fieldgate,tb,nodered]
                                [--cache DIR]

A peer that cannot be installed here is reported as such (`"unavailable": reason`) and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from bench.bench_daemon import CLK_TCK, machine_speed, precompile, start_simulator
from tests.broker import Broker, free_port
from tests.daemon import REPO

DEVICES = 10
REGISTERS = 20
POLL_S = 1.0
TB_MODBUS_PIN = "3.9.2"  # thingsboard_gateway/connectors/modbus/modbus_connector.py: required_version
KEEP = False  # --keep: leave each run's directory (configs, the peer's logs) in /tmp
NODE_RED_MODBUS = ["node-red-contrib-modbus", "node-red-contrib-modbus@5.23.3"]


class Unavailable(Exception):
    pass


def dev(d: int) -> str:
    return f"dev{d:03d}"


def descendants(pid: int) -> list[int]:
    """The process and every live descendant (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU of the tree, reaped children included (cutime, cstime)."""
    total = 0.0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15]) / CLK_TCK
    return total


def tree_rss_mib(pid: int) -> tuple[float, int, int]:
    """RSS summed over the tree, its threads, its processes."""
    rss, threads, procs = 0, 0, 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
            procs += 1
    return round(rss / 1024, 1), threads, procs


def cache_dir(arg: str | None) -> Path:
    base = Path(arg) if arg else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    d = (base if arg else base / "fieldgate-bench") / "peers"
    d.mkdir(parents=True, exist_ok=True)
    return d


class Peer:
    name = ""
    version = ""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path()

    def install(self) -> None:
        """Make the peer runnable (idempotent); raise Unavailable with the reason if it cannot be."""

    def configure(self, workdir: Path, broker_port: int, sim_port: int) -> None:
        raise NotImplementedError

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        raise NotImplementedError

    def start(self) -> None:
        cmd, env, cwd = self.command()
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=cwd, env=env, start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _end(self, sig: int, timeout: float) -> None:
        """Signal the peer's process, then any descendant it left (by PID: all were started by us)."""
        assert self.proc is not None
        tree = descendants(self.proc.pid)
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in tree[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self.proc = None

    def kill9(self) -> None:
        self._end(signal.SIGKILL, 10)

    def stop(self) -> None:
        if self.proc is not None:
            self._end(signal.SIGTERM, 15)


class Fieldgate(Peer):
    name = "fieldgate"

    def install(self) -> None:
        from agent import __version__

        self.version = __version__
        precompile()

    def configure(self, workdir: Path, broker_port: int, sim_port: int) -> None:
        self.workdir = workdir
        lines = [
            "gateway: {id: bench, clock: assume_synced}",
            f"storage: {{path: {workdir / 'buffer.db'}, max_size: 512MB}}",
            f"upstream: {{mqtt: {{url: 'mqtt://127.0.0.1:{broker_port}', keepalive: 5s, format: thingsboard,"
            " username: bench}}",
            "local: {listen: ''}",
            f"buses: {{lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim_port}, timeout: 1s}}}}",
            "devices:",
        ]
        for d in range(1, DEVICES + 1):
            points = ", ".join(f"r{i}: {{table: holding, address: {i}}}" for i in range(REGISTERS))
            lines.append(f"  {dev(d)}: {{bus: lan, unit_id: {d}, poll: {POLL_S:g}s, points: {{{points}}}}}")
        (workdir / "fieldgate.yaml").write_text("\n".join(lines) + "\n")

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        env = dict(os.environ, PYTHONPATH=str(REPO), FIELDGATE_CACHE_DIR=str(self.workdir / "cache"))
        cmd = [sys.executable, "-m", "agent.cli", "run", "-c", str(self.workdir / "fieldgate.yaml")]
        return [*cmd, "--log-level", "info"], env, REPO


class ThingsBoardGateway(Peer):
    name = "thingsboard-gateway"

    def __init__(self, cache: Path) -> None:
        super().__init__(cache)
        self.venv = cache / "tb-venv"
        self.python = self.venv / "bin" / "python"

    def install(self) -> None:
        try:
            if not self.python.exists():
                subprocess.run(
                    [sys.executable, "-m", "venv", str(self.venv)], check=True, capture_output=True
                )
            pip = [str(self.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            if not (self.venv / "bin" / "thingsboard-gateway").exists():
                subprocess.run([*pip, "thingsboard-gateway"], check=True, capture_output=True, timeout=900)
            probe = [str(self.python), "-c", "import pymodbus, serial_asyncio; print(pymodbus.__version__)"]
            have = subprocess.run(probe, capture_output=True, text=True)
            if have.stdout.strip() != TB_MODBUS_PIN:
                deps = [f"pymodbus=={TB_MODBUS_PIN}", "pyserial", "pyserial-asyncio"]
                subprocess.run([*pip, *deps], check=True, capture_output=True, timeout=900)
            out = subprocess.run(
                [str(self.python), "-m", "pip", "show", "thingsboard-gateway"], capture_output=True, text=True
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            err = getattr(e, "stderr", b"") or b""
            raise Unavailable(
                f"pip install thingsboard-gateway failed: {err.decode(errors='replace')[-300:]}"
            ) from None
        self.version = next((x.split()[1] for x in out.stdout.splitlines() if x.startswith("Version:")), "?")
        self.package = Path(
            subprocess.run(
                [
                    str(self.python),
                    "-c",
                    "import thingsboard_gateway, os; print(os.path.dirname(thingsboard_gateway.__file__))",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )

    def configure(self, workdir: Path, broker_port: int, sim_port: int) -> None:
        self.workdir = workdir
        conf = workdir / "config"
        conf.mkdir()
        shutil.copy(self.package / "config" / "logs.json", conf / "logs.json")
        logs = json.loads((conf / "logs.json").read_text())
        for h in logs.get("handlers", {}).values():  # its log files go to the run's directory
            if "filename" in h:
                h["filename"] = str(workdir / "logs" / Path(h["filename"]).name)
        for lg in logs.get("loggers", {}).values():
            lg["level"] = "WARNING"
        (conf / "logs.json").write_text(json.dumps(logs, indent=2))
        (workdir / "logs").mkdir()
        main = {
            "thingsboard": {
                "host": "127.0.0.1",
                "port": broker_port,
                "remoteShell": False,
                "remoteConfiguration": False,
                "statistics": {"enable": False, "statsSendPeriodInSeconds": 3600},
                "deviceFiltering": {"enable": False},
                "maxPayloadSizeBytes": 8196,
                "minPackSendDelayMS": 50,
                "minPackSizeToSend": 500,
                "checkConnectorsConfigurationInSeconds": 60,
                "handleDeviceRenaming": False,
                "security": {"type": "accessToken", "accessToken": "bench"},
                "qos": 1,
                "reportStrategy": {"type": "ON_RECEIVED"},
                "checkingDeviceActivity": {"checkDeviceInactivity": False},
            },
            "storage": {"type": "memory", "read_records_count": 100, "max_records_count": 1000000},
            "grpc": {"enabled": False},
            "connectors": [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}],
        }
        (conf / "tb_gateway.json").write_text(json.dumps(main, indent=2))
        slaves = [
            {
                "host": "127.0.0.1",
                "port": sim_port,
                "type": "tcp",
                "method": "socket",
                "unitId": d,
                "deviceName": dev(d),
                "deviceType": "default",
                "timeout": 1,
                "byteOrder": "BIG",
                "wordOrder": "BIG",
                "retries": 1,
                "pollPeriod": int(POLL_S * 1000),
                "connectAttemptTimeMs": 500,
                "connectAttemptCount": 5,
                "waitAfterFailedAttemptsMs": 1000,
                "attributes": [],
                "timeseries": [
                    {"tag": f"r{i}", "type": "16uint", "functionCode": 3, "objectsCount": 1, "address": i}
                    for i in range(REGISTERS)
                ],
                "attributeUpdates": [],
                "rpc": [],
            }
            for d in range(1, DEVICES + 1)
        ]
        (conf / "modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}, indent=2))

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["TB_GW_CONFIG_DIR"] = str(self.workdir / "config") + "/"
        # Its update check (tb_updater.py: an HTTPS request to updates.thingsboard.io at every start, no
        # setting turns it off) goes to a closed loopback port instead: only 127.0.0.1.
        env["HTTPS_PROXY"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"
        env["NO_PROXY"] = "127.0.0.1,localhost"
        return [str(self.venv / "bin" / "thingsboard-gateway")], env, self.workdir


class NodeRed(Peer):
    name = "node-red"

    def __init__(self, cache: Path) -> None:
        super().__init__(cache)
        self.prefix = cache / "nodered"
        self.note = ""

    def install(self) -> None:
        node, npm = shutil.which("node"), shutil.which("npm")
        if not node or not npm:
            raise Unavailable("node and npm are not installed (apt-get install nodejs npm)")
        modules = self.prefix / "node_modules"
        errors = []
        if (
            not (modules / "node-red" / "red.js").exists()
            or not (modules / "node-red-contrib-modbus").exists()
        ):
            for spec in NODE_RED_MODBUS:
                r = subprocess.run(
                    [
                        npm,
                        "install",
                        "--prefix",
                        str(self.prefix),
                        "--no-audit",
                        "--no-fund",
                        "node-red",
                        spec,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                if r.returncode == 0:
                    break
                errors.append(f"{spec}: {' '.join(r.stderr.split())[:300]}")
                print(f"bench_peers: npm install {spec} failed, trying the next", file=sys.stderr)
            else:
                raise Unavailable("npm install failed: " + " | ".join(errors))
            if errors:  # kept beside the install, so later runs report it too
                (self.prefix / "install-note.txt").write_text(
                    "latest node-red-contrib-modbus not installable here (" + errors[0] + ")"
                )
        note = self.prefix / "install-note.txt"
        self.note = note.read_text() if note.exists() else ""
        versions = {}
        for pkg in ("node-red", "node-red-contrib-modbus"):
            versions[pkg] = json.loads((modules / pkg / "package.json").read_text())["version"]
        self.version = ", ".join(f"{k} {v}" for k, v in versions.items())

    def configure(self, workdir: Path, broker_port: int, sim_port: int) -> None:
        self.workdir = workdir
        (workdir / "node_modules").symlink_to(self.prefix / "node_modules")
        settings = f"""module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {free_port()},
    flowFile: "flows.json",
    userDir: {json.dumps(str(workdir))},
    credentialSecret: false,
    diagnostics: {{ enabled: false, ui: false }},
    telemetry: {{ enabled: false }},
    editorTheme: {{ tours: false, projects: {{ enabled: false }}, palette: {{ catalogues: [] }} }},
    externalModules: {{ autoInstall: false, palette: {{ allowInstall: false, allowUpdate: false }},
                       modules: {{ allowInstall: false }} }},
    logging: {{ console: {{ level: "warn", metrics: false, audit: false }} }},
    functionExternalModules: false,
}};
"""
        (workdir / "settings.js").write_text(settings)
        flow: list[dict[str, Any]] = [
            {"id": "tab1", "type": "tab", "label": "bench"},
            {
                "id": "broker",
                "type": "mqtt-broker",
                "name": "mosquitto",
                "broker": "127.0.0.1",
                "port": str(broker_port),
                "clientid": "bench-nodered",
                "autoConnect": True,
                "usetls": False,
                "protocolVersion": "4",
                "keepalive": "5",
                "cleansession": True,
                "birthTopic": "",
                "closeTopic": "",
                "willTopic": "",
                "credentials": {"user": "bench", "password": ""},
            },
            {
                "id": "out",
                "type": "mqtt out",
                "z": "tab1",
                "name": "tb",
                "topic": "v1/gateway/telemetry",
                "qos": "1",
                "retain": "false",
                "broker": "broker",
                "wires": [],
            },
        ]
        for d in range(1, DEVICES + 1):
            # One client (one TCP connection) per device: with one client shared by the 10 unit ids,
            # node-red-contrib-modbus served 4-30 values/s of the 200 (its queue dequeues one request at a time).
            flow.append(
                {
                    "id": f"mbclient{d}",
                    "type": "modbus-client",
                    "name": f"sim {dev(d)}",
                    "clienttype": "tcp",
                    "bufferCommands": True,
                    "stateLogEnabled": False,
                    "queueLogEnabled": False,
                    "failureLogEnabled": False,
                    "tcpHost": "127.0.0.1",
                    "tcpPort": str(sim_port),
                    "tcpType": "DEFAULT",
                    "unit_id": str(d),
                    "commandDelay": "1",
                    "clientTimeout": "1000",
                    "reconnectOnTimeout": True,
                    "reconnectTimeout": "2000",
                    "parallelUnitIdsAllowed": True,
                }
            )
            flow.append(
                {
                    "id": f"read{d}",
                    "type": "modbus-read",
                    "z": "tab1",
                    "name": dev(d),
                    "topic": dev(d),
                    "showStatusActivities": False,
                    "logIOActivities": False,
                    "showErrors": False,
                    "showWarnings": False,
                    "unitid": str(d),
                    "dataType": "HoldingRegister",
                    "adr": "0",
                    "quantity": str(REGISTERS),
                    "rate": str(int(POLL_S)),
                    "rateUnit": "s",
                    "delayOnStart": False,
                    "startDelayTime": "",
                    "server": f"mbclient{d}",
                    "useIOFile": False,
                    "ioFile": "",
                    "useIOForPayload": False,
                    "emptyMsgOnFail": False,
                    "wires": [[f"shape{d}"], []],
                }
            )
            flow.append(
                {
                    "id": f"shape{d}",
                    "type": "function",
                    "z": "tab1",
                    "name": f"tb {dev(d)}",
                    "func": "const values = {};\n"
                    "msg.payload.forEach((v, i) => { values['r' + i] = v; });\n"
                    f"return {{ topic: 'v1/gateway/telemetry', qos: 1, "
                    f"payload: {{ '{dev(d)}': [{{ ts: Date.now(), values }}] }} }};",
                    "outputs": 1,
                    "wires": [["out"]],
                }
            )
        (workdir / "flows.json").write_text(json.dumps(flow, indent=2))

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        red = self.prefix / "node_modules" / "node-red" / "red.js"
        env = dict(os.environ, NODE_RED_ENABLE_TOURS="false")
        cmd = [
            "node",
            str(red),
            "--settings",
            str(self.workdir / "settings.js"),
            "--userDir",
            str(self.workdir),
        ]
        return cmd, env, self.workdir


class Collector:
    """One subscriber to v1/gateway/telemetry: every (device, key) -> timestamps received, and arrivals."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ts: dict[tuple[str, str], set[int]] = {}
        self.count = 0
        self.unique = 0  # distinct (device, key, ts): a redelivery by the broker does not count
        self.newest_ts = 0  # the newest reading timestamp received
        self.last_arrival = 0.0
        self.no_ts = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="bench-peers-collector", clean_session=False
                ) as client:
                    await client.subscribe("v1/gateway/telemetry", qos=1)
                    await client.subscribe("v1/devices/me/rpc/request/+", qos=1)
                    self.ready.set()
                    async for msg in client.messages:
                        topic = str(msg.topic)
                        if topic.startswith("v1/devices/me/rpc/request/"):
                            await self.answer(client, topic, msg.payload)  # type: ignore[arg-type]
                        else:
                            self.record(msg.payload)  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def answer(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        """Play ThingsBoard's part where a peer waits for it: the ThingsBoard IoT Gateway sends no telemetry
        before the platform answers its `getSessionLimits` RPC (tb_device_mqtt.py). Answered as a server
        without rate limits would: no limit, 100 messages in flight, 64 KiB payloads."""
        with contextlib.suppress(ValueError, KeyError):
            if orjson.loads(payload)["method"] == "getSessionLimits":
                body = {"rateLimits": {}, "maxInflightMessages": 100, "maxPayloadSize": 65536}
                response = topic.replace("/request/", "/response/")
                await client.publish(response, orjson.dumps(body), qos=1)

    def record(self, payload: bytes) -> None:
        now_ms = int(time.time() * 1000)
        doc = orjson.loads(payload)
        n = 0
        for device, entries in doc.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                if "values" in entry:
                    ts, values = int(entry.get("ts", now_ms)), entry["values"]
                else:
                    ts, values = now_ms, entry
                    self.no_ts += 1
                for key in values:
                    seen = self.ts.setdefault((device, key), set())
                    self.unique += ts not in seen
                    seen.add(ts)
                    n += 1
                self.newest_ts = max(self.newest_ts, ts)
        self.count += n
        self.last_arrival = time.monotonic()

    def lost(self, kill_wall_ms: float) -> int:
        """Missing 1 s slots between consecutive readings of each key; across the kill, only up to it."""
        step = POLL_S * 1000
        lost = 0
        for stamps in self.ts.values():
            s = sorted(stamps)
            for a, b in itertools.pairwise(s):
                if a < kill_wall_ms < b:
                    b = int(kill_wall_ms)  # the slots after the kill were never polled
                    lost += max(0, int((b - a) / step))
                else:
                    lost += max(0, round((b - a) / step) - 1)
        return lost


async def wait_until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def measure(peer: Peer, seconds: float, outage: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"fg-peer-{peer.name}-"))
    broker = Broker(persistence=True).start()
    sim, sim_port = start_simulator(DEVICES)
    col = Collector(broker.port)
    watcher = asyncio.create_task(col.run())
    await col.ready.wait()
    peer.configure(workdir, broker.port, sim_port)
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        peer.start()
        ok = await wait_until(lambda: col.count > 0, 60)
        out["first_reading_s"] = round(time.monotonic() - t0, 3) if ok else None
        if not ok:
            raise RuntimeError(f"{peer.name}: no reading upstream within 60 s (see {workdir})")
        await asyncio.sleep(5)  # warm-up
        c0, w0, n0 = tree_cpu_s(peer.pid), time.monotonic(), col.count
        rss_samples = []
        while time.monotonic() - w0 < seconds:
            await asyncio.sleep(min(5.0, seconds / 4))
            rss_samples.append(tree_rss_mib(peer.pid))
        c1, w1, n1 = tree_cpu_s(peer.pid), time.monotonic(), col.count
        out["cpu_s_per_min"] = round((c1 - c0) / (w1 - w0) * 60, 3)
        out["rss_mib"] = rss_samples[-1][0]
        out["rss_max_mib"] = max(r[0] for r in rss_samples)
        out["threads"], out["processes"] = rss_samples[-1][1], rss_samples[-1][2]
        out["values_per_s"] = round((n1 - n0) / (w1 - w0), 1)

        broker.stop()
        await asyncio.sleep(outage)
        n_before, u_before = col.count, col.unique
        broker.start()
        back = time.monotonic()
        # New data, not what the restarted broker redelivers from its persisted session (the collector's)
        ok = await wait_until(lambda: col.unique > u_before, 60)
        out["resume_after_broker_back_s"] = round(time.monotonic() - back, 3) if ok else None
        # Let what was buffered arrive: until 3 s pass without a burst above the live rate.
        await asyncio.sleep(3)
        await wait_until(
            lambda: time.monotonic() - back > outage + 5 or col.count - n_before > outage * 200, 30
        )

        kill_wall_ms = time.time() * 1000
        peer.kill9()
        t1, t1_wall_ms = time.monotonic(), time.time() * 1000
        peer.start()
        # A reading taken after the restart (what the broker still held from before the kill does not count)
        ok = await wait_until(lambda: col.newest_ts >= t1_wall_ms, 60)
        out["first_reading_after_kill_s"] = round(time.monotonic() - t1, 3) if ok else None
        await asyncio.sleep(5)
        out["received"] = col.count
        out["lost"] = col.lost(kill_wall_ms)
        out["keys"] = len(col.ts)
        if col.no_ts:
            out["entries_without_ts"] = col.no_ts
    finally:
        peer.stop()
        sim.terminate()
        sim.wait()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        broker.cleanup()
    if not KEEP:
        shutil.rmtree(workdir, ignore_errors=True)  # kept, with the peer's log, when the run failed
    return out


FIGURES = [
    "cpu_s_per_min",
    "rss_mib",
    "threads",
    "processes",
    "values_per_s",
    "first_reading_s",
    "resume_after_broker_back_s",
    "first_reading_after_kill_s",
    "lost",
    "received",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, 20 s measured, 10 s outage")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; the order of the peers rotates each round")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--outage", type=float, default=30)
    ap.add_argument("--peers", default="fieldgate,tb,nodered")
    ap.add_argument("--cache", help="where the peers are installed (default ~/.cache/fieldgate-bench/peers)")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (configs, logs)")
    args = ap.parse_args()
    global KEEP
    KEEP = args.keep
    if args.quick:
        args.rounds, args.seconds, args.outage = 1, 20, 10
    cache = cache_dir(args.cache)
    known = {"fieldgate": Fieldgate, "tb": ThingsBoardGateway, "nodered": NodeRed}
    peers: list[Peer] = []
    unavailable: dict[str, str] = {}
    for key in args.peers.split(","):
        peer = known[key](cache)
        try:
            peer.install()
            peers.append(peer)
        except Unavailable as e:
            unavailable[peer.name] = str(e)
            print(f"bench_peers: {peer.name} unavailable: {e}", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
    errors: dict[str, list[str]] = {}
    for r in range(args.rounds):
        order = peers[r % len(peers) :] + peers[: r % len(peers)] if peers else []
        for peer in order:
            try:
                runs[peer.name].append(asyncio.run(measure(peer, args.seconds, args.outage)))
            except RuntimeError as e:
                errors.setdefault(peer.name, []).append(str(e))
                print(f"bench_peers: {e}", file=sys.stderr)
    result: dict[str, Any] = {
        "workload": f"{DEVICES} devices x {REGISTERS} holding registers every {POLL_S:g} s, QoS 1, "
        f"{args.seconds:g} s measured, {args.outage:g} s broker outage, then a kill -9 and restart",
        "machine_loop_s": machine_speed(),
        "rounds": args.rounds,
        "peers": {},
        "unavailable": unavailable,
        "errors": errors,
    }
    for peer in peers:
        rs = runs[peer.name]
        entry: dict[str, Any] = {"version": peer.version, "runs": len(rs), "all": rs}
        if getattr(peer, "note", ""):
            entry["note"] = peer.note
        if rs:
            entry["median"] = {
                k: statistics.median(x[k] for x in rs if x.get(k) is not None)
                for k in FIGURES
                if any(x.get(k) is not None for x in rs)
            }
        result["peers"][peer.name] = entry
    fg = result["peers"].get("fieldgate", {}).get("median", {})
    for name, entry in result["peers"].items():
        m = entry.get("median", {})
        if name != "fieldgate" and fg.get("cpu_s_per_min") and m.get("cpu_s_per_min"):
            entry["fieldgate_cpu_ratio"] = round(fg["cpu_s_per_min"] / m["cpu_s_per_min"], 3)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print()
    print(f"Machine speed: {result['machine_loop_s']} s of CPU for the reference loop (lower is faster).")
    print()
    names = list(result["peers"])
    print("| figure (median of rounds) | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for k in FIGURES:
        cells = [str(result["peers"][n].get("median", {}).get(k, "")) for n in names]
        print(f"| {k} | " + " | ".join(cells) + " |")
    ratios = [str(result["peers"][n].get("fieldgate_cpu_ratio", "")) for n in names]
    print("| fieldgate CPU / peer CPU | " + " | ".join(ratios) + " |")
    print("| version | " + " | ".join(str(result["peers"][n]["version"]) for n in names) + " |")
    for name, why in unavailable.items():
        print(f"\n{name}: not run ({why})")


if __name__ == "__main__":
    main()
