"""`fieldgate demo`, the README's first command: it shows readings, and Ctrl-C ends it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time

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
