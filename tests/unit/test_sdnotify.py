"""sd_notify: messages reach a datagram socket at a path or in the abstract namespace; no-op without one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A local AF_UNIX datagram socket standing in for systemd's notify socket (no network)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield sock, str(path)


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("polling 3 devices")
    assert sock.recv(4096) == b"READY=1\nSTATUS=polling 3 devices"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("line one\nline two")  # a newline would forge a second field
    assert sock.recv(4096) == b"STATUS=line one line two"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.notify(RELOADING=1, STATUS="reloading")
    assert sock.recv(4096) == b"RELOADING=1\nSTATUS=reloading"


def test_abstract_namespace() -> None:
    name = f"fieldgate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_a_vanished_socket_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.watchdog() is False
    assert n.watchdog() is False
    assert sum("cannot notify systemd" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval() == 60.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}).watchdog_interval() == 30.0
    # The variables were meant for another process (we are a child that inherited them).
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "zero"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval() is None
