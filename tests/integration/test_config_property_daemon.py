"""`check` ok => `run` works (issue 17), as a property over configurations generated from the JSON Schema.

Each example is a gateway with one Modbus TCP device on a simulator: its MQTT, storage, bus, device and
point settings are drawn from `fieldgate schema` near and beyond their bounds (tests/schema_strategies.py).
A config that `check` refuses must be refused with positioned lines; a config it accepts must start, poll
(the point's value reaches the status API and the buffer) and stop with exit 0 on SIGTERM. `poll: 0s` once
passed the check and killed the daemon at start.

What is not drawn: where things are (the broker's URL, the simulator's port, the buffer's path, the status
page's port), the unit id (the simulator answers unit 1) and timeouts below 1 s (legal, but on a loaded CI
machine a 10 ms answer window fails a healthy device: the property is about the daemon, not the machine).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.loader import load_config
from agent.errors import ConfigError
from tests.broker import Broker, free_port
from tests.daemon import REPO, Daemon, connect_ro
from tests.schema_strategies import SchemaStrategies, config_schema, duration_values

pytestmark = pytest.mark.timeout(900)

STARTS: list[str] = []  # the examples the daemon ran (the property must reach that side, and often)


@pytest.fixture(scope="module")
def simulator() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.modbus_sim", "--port", str(port), "--units", "1:energy-meter"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening" in line, line
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _doc(broker_port: int, sim_port: int) -> st.SearchStrategy[dict[str, Any]]:
    second = duration_values("1s", "1m")  # see the module docstring: no sub-second timeouts here
    s = SchemaStrategies(
        config_schema(),
        overrides={
            "MqttConfig.url": st.just(f"mqtt://127.0.0.1:{broker_port}"),
            "MqttConfig.tls": st.none(),
            "MqttConfig.password_file": st.none(),
            "MqttConfig.username": st.none(),
            "MqttConfig.sparkplug": st.just({}),
            "StorageConfig.path": st.just("BUFFER"),
            "ModbusTcpBusConfig.type": st.just("modbus-tcp"),
            "ModbusTcpBusConfig.host": st.just("127.0.0.1"),
            "ModbusTcpBusConfig.port": st.just(sim_port),
            "ModbusTcpBusConfig.timeout": second,
            "ModbusDeviceConfig.driver": st.just("modbus"),
            "ModbusDeviceConfig.bus": st.just("lan"),
            "ModbusDeviceConfig.unit_id": st.just(1),
            "ModbusDeviceConfig.profile": st.none(),
            "ModbusDeviceConfig.enabled": st.just(True),
            "ModbusDeviceConfig.timeout": st.one_of(st.none(), second),
            "ModbusDeviceConfig.points": st.none(),  # drawn below, one point
            "ModbusDeviceConfig.processing": st.just({}),
            "ModbusDeviceConfig.aggregate": st.none(),  # values would wait for the window's end
            "ModbusDeviceConfig.report": st.none(),
            "ModbusDeviceConfig.deadband": st.none(),
            "ModbusPoint.aggregate": st.none(),
            "ModbusPoint.report": st.none(),
            "ModbusPoint.deadband": st.none(),
            "ModbusPoint.writable": st.just(False),
        },
        # What the daemon's loops run on, drawn every time; one in three at or beyond a bound.
        always={
            "MqttConfig.keepalive",
            "MqttConfig.health_interval",
            "MqttConfig.batch_interval",
            "MqttConfig.batch_max",
            "MqttConfig.max_inflight",
            "MqttConfig.topic_prefix",
            "StorageConfig.commit_interval",
            "StorageConfig.max_size",
            "ModbusDeviceConfig.poll",
            "ModbusPoint.poll",
        },
        durations_rare_in=3,
    )
    gateway = st.fixed_dictionaries({"id": st.just("gw-prop"), "clock": st.just("assume_synced")})
    return st.fixed_dictionaries(
        {
            "gateway": gateway,
            "upstream": st.fixed_dictionaries({"mqtt": s.ref("MqttConfig")}),
            "storage": s.ref("StorageConfig"),
            "buses": st.fixed_dictionaries({"lan": s.ref("ModbusTcpBusConfig")}),
            "devices": st.fixed_dictionaries({"d": s.ref("ModbusDeviceConfig")}),
            "point": s.ref("ModbusPoint"),
        }
    )


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as answer:
        doc: dict[str, Any] = json.loads(answer.read())
    return doc


def _polled(status: dict[str, Any]) -> bool:
    device = status.get("devices", {}).get("d", {})
    return device.get("state") == "ok" and "v" in device.get("readings", {})


def _run(config: Path, api: int, db: Path) -> None:
    daemon = Daemon(config, config.with_name("daemon.log")).start()
    last: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.alive():
            try:
                last = _status(api)
            except OSError:
                last = {}
            if last and _polled(last):
                break
            time.sleep(0.1)
        log = daemon.log_text()
        assert daemon.alive(), f"the daemon died:\n{log[-3000:]}"
        assert _polled(last), f"no reading of d.v within 60 s: {json.dumps(last)[:1500]}\n{log[-3000:]}"
    finally:
        code = daemon.stop(timeout=30)
    assert code == 0, f"exit {code} on SIGTERM:\n{daemon.log_text()[-3000:]}"
    conn = connect_ro(db)
    try:
        (stored,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
    finally:
        conn.close()
    assert stored >= 1  # the value went through the buffer (delivered rows are deleted; their seq stays)


def test_check_ok_means_the_daemon_starts_polls_and_stops(broker: Broker, simulator: int) -> None:
    @settings(
        max_examples=45,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(doc=_doc(broker.port, simulator))
    def prop(doc: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            folder = Path(d)
            api = free_port()
            point = doc.pop("point")
            doc["devices"]["d"]["points"] = {"v": point}
            doc["storage"]["path"] = str(folder / "buffer.db")
            doc["local"] = {"listen": f"127.0.0.1:{api}"}
            config = folder / "fieldgate.yaml"
            config.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
            try:
                load_config(config)  # what `fieldgate check` runs
            except ConfigError as exc:
                assert all(line.startswith(f"{config}:") for line in exc.problems), exc.problems
                return
            STARTS.append(config.read_text())
            _run(config, api, folder / "buffer.db")

    prop()
    # The daemon ran some examples, not only the refusals. How many of the 45 load varies with the test
    # session (5 in a full run, 15-20 alone: hypothesis draws the out-of-bound branches more or less often),
    # so the floor is low; tests/unit/test_config_bounds.py covers the bounds with 250 examples in-process.
    assert len(STARTS) >= 3, len(STARTS)
