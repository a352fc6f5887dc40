"""No phone-home: the running daemon's sockets go only to the configured broker, Modbus device and listener.

Sockets are read from /proc: the daemon's fds (`socket:[INODE]` links) matched against its network
namespace's tables (`/proc/PID/net/tcp`, `tcp6`, `udp`, `udp6`, `raw`, `raw6`, `unix`, `netlink`).
The config uses IP addresses only, so there is no DNS traffic to tell apart (docs/OPERATIONS.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Checker, Daemon, write_config

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Sock:
    family: str  # tcp, tcp6, udp, udp6, raw, raw6, unix, netlink, or "unknown"
    local: tuple[str, int] | None = None
    remote: tuple[str, int] | None = None
    state: str = ""


def _addr(text: str, v6: bool) -> tuple[str, int]:
    host_hex, port_hex = text.split(":")
    raw = bytes.fromhex(host_hex)
    if v6:
        # Four 32-bit words, each in host (little-endian) order.
        raw = b"".join(struct.pack("<I", w) for w in struct.unpack(">4I", raw))
        ip = ipaddress.IPv6Address(raw)
        host = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
    else:
        host = str(ipaddress.IPv4Address(struct.pack("<I", int(host_hex, 16))))
    return host, int(port_hex, 16)


def sockets_of(pid: int) -> list[Sock]:
    """Every socket the process holds, classified through its namespace's tables."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed between listdir and readlink
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    table: dict[str, Sock] = {}
    for family in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        try:
            lines = Path(f"/proc/{pid}/net/{family}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            table[f[9]] = Sock(family, _addr(f[1], "6" in family), _addr(f[2], "6" in family), f[3])
    for family, column in (("unix", 6), ("netlink", 9)):
        try:
            lines = Path(f"/proc/{pid}/net/{family}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > column:
                table[f[column]] = Sock(family)
    return [table.get(inode, Sock("unknown")) for inode in sorted(inodes)]


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit()})
    await s.start_tcp("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.aclose()


async def test_only_configured_peers(tmp_path: Path, sim: ModbusSim, broker: Broker) -> None:
    listen_port = free_port()
    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway="gw-quiet",
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        local=f"127.0.0.1:{listen_port}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  meter:
    bus: lan
    unit_id: 1
    poll: 200ms
    points:
      r0: {table: holding, address: 0}
""",
    )
    allowed_remote = {("127.0.0.1", broker.port), ("127.0.0.1", sim.port)}
    seen: list[Sock] = []
    async with Checker(broker.port, "gw-quiet") as checker:
        daemon = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            await checker.wait_for(lambda: len(checker.data.readings) >= 5, what="readings delivered")
            deadline = time.monotonic() + 3  # a few seconds of sampling, status page requests included
            while time.monotonic() < deadline:
                with socket.create_connection(("127.0.0.1", listen_port), timeout=5) as page:
                    # Half a request: the daemon holds the connection open while we sample.
                    page.sendall(b"GET /api/status HTTP/1.1\r\n")
                    await asyncio.sleep(0.05)
                    seen.extend(sockets_of(daemon.pid))
                    page.sendall(b"Host: x\r\n\r\n")
                    page.recv(65536)
                await asyncio.sleep(0.1)
            # The config was validated in a child process: pydantic never loaded here (docs/PERFORMANCE.md).
            assert any(n.startswith("_sqlite3") for n in daemon.mapped_files())
            assert not daemon.loads_pydantic()
        finally:
            assert daemon.stop() == 0, daemon.log_text()[-3000:]

    families = {s.family for s in seen}
    assert not families & {"udp", "udp6", "raw", "raw6"}, [
        s for s in seen if s.family.startswith(("udp", "raw"))
    ]
    assert "unknown" not in families, "a socket of a family this test does not know"
    tcp = [s for s in seen if s.family.startswith("tcp")]
    unexpected = [
        s
        for s in tcp
        if not (
            (s.state == TCP_LISTEN and s.local == ("127.0.0.1", listen_port))
            or s.remote in allowed_remote
            or (s.local == ("127.0.0.1", listen_port) and s.remote is not None and s.remote[0] == "127.0.0.1")
        )
    ]
    assert unexpected == [], unexpected
    # The sampling saw what it should: otherwise an empty list above would prove nothing.
    remotes = {s.remote for s in tcp}
    assert ("127.0.0.1", broker.port) in remotes and ("127.0.0.1", sim.port) in remotes
    assert any(s.state == TCP_LISTEN and s.local == ("127.0.0.1", listen_port) for s in tcp)
    assert any(s.local == ("127.0.0.1", listen_port) and s.state != TCP_LISTEN for s in tcp)
