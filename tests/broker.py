"""A private Mosquitto broker for tests: started on a free loopback port, stoppable and restartable."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if not found:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (scripts/test does it)")
    return found


class Broker:
    """One mosquitto process we own (never the machine's own broker on 1883)."""

    def __init__(self, port: int | None = None, extra_conf: str = "", persistence: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fg-mosq-"))
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _write_conf(self) -> Path:
        conf = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            # Started as root (CI), mosquitto drops to the `mosquitto` user, which cannot write the
            # persistence file in our directory: sessions were silently lost across a restart ("Error:
            # Permission denied" in its log), and a subscriber missed what was published before it came
            # back. Staying the user we are keeps persistence real; as another user the line changes nothing.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            self.extra_conf,
        ]
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Broker:
        conf = self._write_conf()
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen([mosquitto_path(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill9(self) -> None:
        """SIGKILL: the broker dies without closing anything cleanly (failover tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


BROKERS = ("mosquitto", "nats")  # the implementations the delivery contract runs against (PLATFORMS.md)


def make_broker(kind: str) -> Broker:
    """A started broker of `kind` that keeps persistent sessions across its restarts (NATS: JetStream).

    The NATS node (tests/natsbroker.py) has the same interface: host, port, url, start, stop, restart, cleanup.
    """
    if kind == "nats":
        from tests.natsbroker import NatsNode

        return NatsNode().start()  # type: ignore[return-value]
    return Broker(persistence=True).start()
