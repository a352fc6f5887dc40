"""A stop asked at any moment ends the daemon: even while a device connects or the uplink reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.loader import load_config
from agent.runtime import Runtime
from tests.broker import Broker, free_port
from tests.daemon import REPO, write_config


def task_stacks() -> str:
    """Where every other task of the loop is waiting: what a hang's report needs."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(limit=12, file=out)
    return out.getvalue()


def dead_end_config(tmp: Path, broker: Broker) -> Path:
    """Devices on a Modbus port where nothing listens: every poll is a failed connect."""
    port = free_port()
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-stop",
        broker_port=broker.port,
        db=tmp / "buffer.db",
        local=f"127.0.0.1:{free_port()}",  # its start is an await: the devices begin connecting meanwhile
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {port}}}",
        devices="\n".join(
            f"  d{i}: {{bus: lan, unit_id: {i}, poll: 1s, points: {{r: {{address: 0}}}}}}"
            for i in range(1, 4)
        ),
    )


@pytest.mark.parametrize("after", [None, 0.0, 0.05, 0.3, 1.0])
async def test_runtime_stops_while_devices_are_connecting(
    tmp_path: Path, broker: Broker, after: float | None
) -> None:
    path = dead_end_config(tmp_path, broker)
    runtime = Runtime(load_config(path), path)
    if after is None:  # asked before the start: the device tasks are cancelled in their first connect
        runtime.request_stop()
    run = asyncio.create_task(runtime.run())
    if after is not None:
        await asyncio.sleep(after)
        runtime.request_stop()
    done, _ = await asyncio.wait([run], timeout=20)
    assert run in done, "the runtime did not stop: a cancellation was swallowed somewhere\n" + task_stacks()
    run.result()


def test_sigterm_during_start_up_exits_cleanly(tmp_path: Path, broker: Broker) -> None:
    path = dead_end_config(tmp_path, broker)
    codes = []
    for delay in (0.3, 0.6, 1.2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(path)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(delay)
        proc.send_signal(signal.SIGTERM)
        try:
            codes.append(proc.wait(20))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append("hung")
    assert codes == [0, 0, 0]
