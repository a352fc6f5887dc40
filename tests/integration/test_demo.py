"""`fieldgate demo`, the README's first command: it shows readings, and Ctrl-C ends it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import REPO, fieldgate_exe

pytestmark = pytest.mark.timeout(90)


def test_ctrl_c_ends_the_demo_cleanly() -> None:
    """Ctrl-C reaches the terminal's whole foreground group: the demo, and whatever it started there. The
    demo must stop its agent, then its broker, and exit 0 with its count (it used to end in a traceback:
    the broker had died of the same Ctrl-C)."""
    proc = subprocess.Popen(
        [*fieldgate_exe(), "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        start_new_session=True,  # a group of its own, as a terminal's foreground job
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while sum(" seq " in line for line in seen) < 10:
            assert time.monotonic() < deadline, "".join(seen)
            line = proc.stdout.readline()
            assert line, "the demo ended early:\n" + "".join(seen)
            seen.append(line)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("fieldgate demo:") and "readings received by the platform" in last
    assert int(last.split()[2]) >= 10


def test_a_demo_that_cannot_load_its_config_leaves_no_broker_behind(tmp_path: Path) -> None:
    """A bad profile makes the demo's config invalid: the demo says so and exits 1, and no Mosquitto of its
    own keeps running (it used to start the broker first and leak it, holding the terminal's output)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "eastron-sdm630.yaml").write_text("points:\n  v: {table: input, adress: 0}\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
        # Files, not pipes: a leaked broker would hold a pipe open and hang the test instead of failing it.
        code = subprocess.run(
            [*fieldgate_exe(), "demo", "--duration", "5"],
            stdout=out,
            stderr=err,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), FIELDGATE_PROFILES=str(profiles), TMPDIR=str(tmp)),
            timeout=60,
        ).returncode
    brokers = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(tmp) in _cmdline(p) and "mosquitto" in _cmdline(p)
    ]
    for p in brokers:  # started by this test's demo: end them by PID before failing
        os.kill(int(p.name), signal.SIGTERM)
    stderr = (tmp_path / "err").read_text()
    assert not brokers, stderr
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert "devices.meter-1" in stderr and "adress" in stderr, stderr


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
