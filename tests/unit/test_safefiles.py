"""agent/safefiles.py: only regular files under the size bound are read; a FIFO or a device is refused at
once (never opened for a blocking read); what the daemon writes is private whatever the umask."""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.safefiles import MAX_FILE_BYTES, create_private, read_regular, write_private
from agent.upstream.tls import SecretError, read_secret

REPO = Path(__file__).resolve().parents[2]


def test_regular_file_is_read(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_bytes(b"x" * MAX_FILE_BYTES)
    assert read_regular(f) == b"x" * MAX_FILE_BYTES


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "directory", "too-large"])
def test_anything_else_is_refused_at_once(tmp_path: Path, what: str) -> None:
    if what == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)  # nobody ever writes to it: a blocking open or read would hang the test
        expected = "a FIFO, not a regular file"
    elif what == "dev-zero":
        path, expected = Path("/dev/zero"), "a character device, not a regular file"
    elif what == "directory":
        path, expected = tmp_path, "a directory, not a regular file"
    else:
        path = tmp_path / "big"
        path.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
        expected = "larger than 1 MiB"
    result: list[BaseException] = []

    def attempt() -> None:
        try:
            read_regular(path)
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(30)  # a bound for a broken implementation, not a timing assertion
    assert result, f"{what}: read_regular did not refuse"
    assert isinstance(result[0], OSError) and expected in str(result[0].strerror)


def test_secret_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    with pytest.raises(SecretError, match="a FIFO, not a regular file"):
        read_secret(fifo)


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_written_files_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_private(tmp_path / "f", b"data")
        create_private(tmp_path / "db")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o600


def _limit_memory() -> None:  # a regression must fail the test, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("profile", ["/dev/zero", "fifo"])
def test_check_refuses_a_device_or_fifo_profile_with_a_position(tmp_path: Path, profile: str) -> None:
    if profile == "fifo":
        os.mkfifo(tmp_path / "fifo")
        profile = str(tmp_path / "fifo")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        "gateway: {id: gw}\n"
        'upstream: {mqtt: {url: "mqtt://127.0.0.1:1"}}\n'
        f"storage: {{path: {tmp_path / 'b.db'}}}\n"
        "buses: {lan: {type: modbus-tcp, host: 127.0.0.1}}\n"
        "devices:\n"
        "  x:\n"
        "    bus: lan\n"
        "    unit_id: 1\n"
        f"    profile: {profile}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        preexec_fn=_limit_memory,
        timeout=60,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-2000:]
    kind = "a FIFO" if profile.endswith("fifo") else "a character device"
    assert f"{cfg}:9:14: devices.x.profile: {profile}: {kind}, not a regular file: refused" in said, said[
        -2000:
    ]


@pytest.mark.parametrize("verb", ["check", "run"])
def test_a_config_that_is_a_fifo_is_refused_at_once(tmp_path: Path, verb: str) -> None:
    fifo = tmp_path / "fieldgate.yaml"
    os.mkfifo(fifo)  # nobody writes to it: any blocking open or read hangs (the timeout fails the test)
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", verb, "-c", str(fifo)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-2000:]
    assert f"{fifo}:1:1: (file): cannot read: a FIFO, not a regular file: refused" in said, said[-2000:]


@pytest.mark.parametrize("verb", ["reload", "migrate"])
def test_the_config_verbs_refuse_a_fifo_at_once(tmp_path: Path, verb: str) -> None:
    """`fieldgate reload` and `migrate` read the file themselves: a FIFO is refused, never waited on."""
    fifo = tmp_path / "fieldgate.yaml"
    os.mkfifo(fifo)  # nobody writes to it: any blocking open or read hangs (the timeout fails the test)
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", verb, "-c", str(fifo)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-2000:]
    assert "FIFO, not a regular file: refused" in said, said[-2000:]
