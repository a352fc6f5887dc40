"""What the daemon imports at start (issue 24, steady-state RSS): the remote upgrade's download and install
(agent/control/upgrade.py) import urllib.request and shutil only when an upgrade runs, not when the daemon
starts. Not a timing assertion: the modules present in a fresh interpreter's sys.modules.

The MQTT upstream still brings urllib.request (paho imports it for its proxy settings), and the modules the
forked validating child shares (validate.SHARED_MODULES) are loaded before the fork: this checks the
daemon's own modules, without an MQTT upstream and before the fork."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RARE = {"urllib.request", "http.client", "email", "shutil", "bz2", "lzma", "tempfile"}

DAEMON = textwrap.dedent(
    """
    import json, sys
    from agent.config import modelkit
    modelkit.select("plain")
    import agent.verbs.run, agent.runtime, agent.control.upgrade, drivers.modbus.driver
    print(json.dumps(sorted(sys.modules)))
    """
)


def test_the_daemon_does_not_import_the_upgrades_download_modules() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DAEMON],
        capture_output=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    modules = set(json.loads(proc.stdout))
    assert "agent.control.upgrade" in modules
    assert modules & RARE == set()
