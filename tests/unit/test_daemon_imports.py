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
from typing import Any

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


def fresh_interpreter(code: str) -> Any:
    """What `code` prints as JSON, run in a new interpreter (so sys.modules holds only what it imported)."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def test_the_daemon_does_not_import_the_upgrades_download_modules() -> None:
    modules = set(fresh_interpreter(DAEMON))
    assert "agent.control.upgrade" in modules
    assert modules & RARE == set()


TCP_ONLY = textwrap.dedent(
    """
    import asyncio, json, sys
    from agent.config import modelkit
    modelkit.select("plain")
    import agent.verbs.run, agent.runtime, drivers.modbus.driver, drivers.modbus.scan
    from drivers.modbus.bus import ModbusBus
    from drivers.modbus.config import ModbusRtuTcpBusConfig, ModbusTcpBusConfig

    def pymodbus():
        return sorted(m for m in sys.modules if m.split(".")[0] == "pymodbus")

    async def main():
        ModbusBus("lan", ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=502))
        before = pymodbus()
        # an RTU-over-TCP bus builds pymodbus's client (it connects only on its first request)
        ModbusBus("gw", ModbusRtuTcpBusConfig(type="modbus-rtu-tcp", host="127.0.0.1", port=502))._make_client()
        print(json.dumps([before, pymodbus()]))

    asyncio.run(main())
    """
)


def test_a_daemon_with_only_modbus_tcp_buses_never_imports_pymodbus() -> None:
    """Issue 24: our client serves Modbus TCP (drivers/modbus/tcpclient.py); pymodbus's client, ~2.2 MiB of
    RSS once imported, is loaded only by a serial or RTU-over-TCP bus."""
    before, after = fresh_interpreter(TCP_ONLY)
    assert before == []
    assert "pymodbus.client" in after  # the check above can see pymodbus when it is there
