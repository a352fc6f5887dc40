"""GET /metrics of the real daemon, read by the real tools: prometheus_client's parser, `promtool check
metrics`, and a Prometheus server scraping the daemon every second, its values compared with /api/status.
The sample Grafana dashboard's queries are run on that server and every metric they name must exist."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.parse
import urllib.request
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker, free_port
from tests.daemon import Daemon, write_config
from tests.integration.test_status_daemon import TOKEN, http, wait_status

parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client (dev extra) is not installed"
)

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


async def get_raw(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float | None:
    """The value of the one sample of `family` (sample `name`, default the family's) with these labels."""
    name = name or family
    found = [
        s.value
        for s in fams[family].samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, (family, labels, found)
    return found[0] if found else None


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit(), 2: SimUnit(dead=True)})
    await s.start_tcp("127.0.0.1", 0)
    s.units[1].set("holding", 0, [2301, 40])
    try:
        yield s
    finally:
        await s.aclose()


def quiet_config(tmp: Path, broker: Broker, sim: ModbusSim, port: int) -> Path:
    """Polls every hour: after the first cycle (and the ghost's first failure, backed off for an hour)
    nothing moves, so the figures of /metrics, /api/status and Prometheus can be compared exactly."""
    token = tmp / "local.token"
    token.write_text(TOKEN + "\n")
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-metrics",
        broker_port=broker.port,
        db=tmp / "buffer.db",
        local=f"127.0.0.1:{port}, token_file: {token}",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}, timeout: 300ms}}",
        devices="""  meter:
    bus: lan
    unit_id: 1
    poll: 1h
    points:
      voltage: {table: holding, address: 0, scale: 0.1, unit: V}
      dim: {table: holding, address: 1, writable: true, min: 0, max: 100, unit: "%"}
  ghost:
    bus: lan
    unit_id: 2
    poll: 1h
    points:
      r0: {table: holding, address: 0}
""",
    )


def settled(d: dict[str, Any]) -> bool:
    return (
        d["upstream"]["connected"]
        and d["devices"]["meter"]["state"] == "ok"
        and d["devices"]["ghost"]["state"] == "failing"
        and d["buffer"]["pending"] == 0
        and d["upstream"]["sent"] == 4  # voltage, dim, the ghost's _state and _error
    )


async def test_metrics_parse_and_match_the_status(tmp_path: Path, sim: ModbusSim, broker: Broker) -> None:
    port = free_port()
    cfg = quiet_config(tmp_path, broker, sim, port)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        await wait_status(port, settled, "the first cycles sent")
        # one executed and one refused command, through the local API's test write
        code, doc = await http(port, "POST", "/api/devices/meter/write", {"point": "dim", "value": 55}, TOKEN)
        assert code == 200 and doc["ok"] is True, doc
        code, doc = await http(
            port, "POST", "/api/devices/meter/write", {"point": "dim", "value": 555}, TOKEN
        )
        assert code == 200 and doc["ok"] is False, doc

        code, headers, body = await get_raw(port, "/metrics")
        assert code == 200, body
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = body.decode()
        code, status = await http(port, "GET", "/api/status")
        assert code == 200
        fams = families(text)

        assert sample(fams, "fieldgate_build_info", gateway="gw-metrics") == 1
        assert sample(fams, "fieldgate_readings_polled", "fieldgate_readings_polled_total",
                      device="meter", kind="value") == 2  # fmt: skip
        assert sample(fams, "fieldgate_readings_stored", "fieldgate_readings_stored_total",
                      device="meter", kind="value") == 2  # fmt: skip
        assert sample(fams, "fieldgate_readings_stored", "fieldgate_readings_stored_total",
                      device="ghost", kind="event") == 2  # fmt: skip
        sent = [s for s in fams["fieldgate_readings_sent"].samples if s.name.endswith("_total")]
        assert sum(s.value for s in sent) == status["upstream"]["sent"] == 4
        assert {(s.labels["upstream"], s.labels["device"], s.labels["kind"]) for s in sent} == {
            ("mqtt", "meter", "value"),
            ("mqtt", "ghost", "event"),
        }
        assert (
            sample(fams, "fieldgate_device_poll_errors", "fieldgate_device_poll_errors_total", device="ghost")
            == status["devices"]["ghost"]["errors"]
            == 1
        )
        assert sample(fams, "fieldgate_device_failing", device="ghost") == 1
        assert sample(fams, "fieldgate_device_failing", device="meter") == 0
        # both devices' cycles on bus "lan"; the meter's write does not count as a poll
        count = sample(
            fams, "fieldgate_poll_duration_seconds", "fieldgate_poll_duration_seconds_count", bus="lan"
        )
        inf = sample(fams, "fieldgate_poll_duration_seconds", "fieldgate_poll_duration_seconds_bucket",
                     bus="lan", le="+Inf")  # fmt: skip
        assert count == inf == 2
        assert sample(fams, "fieldgate_buffer_pending_readings") == status["buffer"]["pending"] == 0
        assert (
            sample(fams, "fieldgate_buffer_evicted_readings", "fieldgate_buffer_evicted_readings_total") == 0
        )
        assert sample(fams, "fieldgate_buffer_bytes") == status["buffer"]["bytes"] > 0
        assert sample(fams, "fieldgate_buffer_oldest_timestamp_seconds") is None  # empty buffer
        recoveries = sample(fams, "fieldgate_buffer_recoveries", "fieldgate_buffer_recoveries_total")
        assert recoveries == status["buffer"]["recovered"] == 0
        # the deprecated name serves the same counter
        assert (
            sample(fams, "fieldgate_buffer_recovered_readings", "fieldgate_buffer_recovered_readings_total")
            == 0
        )
        assert sample(fams, "fieldgate_upstream_connected", upstream="mqtt") == 1
        assert sample(fams, "fieldgate_upstream_reconnects", "fieldgate_upstream_reconnects_total") == 0
        assert sample(fams, "fieldgate_upstream_inflight_messages", upstream="mqtt") == 0
        latency_count = sample(fams, "fieldgate_upstream_publish_latency_seconds",
                               "fieldgate_upstream_publish_latency_seconds_count", upstream="mqtt")  # fmt: skip
        assert latency_count is not None and latency_count >= 1
        assert sample(fams, "fieldgate_commands", "fieldgate_commands_total", outcome="executed") == 1
        assert sample(fams, "fieldgate_commands", "fieldgate_commands_total", outcome="refused") == 1
        assert sample(fams, "fieldgate_processing_dropped", "fieldgate_processing_dropped_total",
                      device="meter", reason="suppressed") == 0  # fmt: skip

        # HEAD like GET; no write method
        code, headers, body = await get_raw(port, "/metrics")
        code, doc = await http(port, "POST", "/metrics")
        assert code == 405 and "not allowed" in doc["error"]

        # docs/OPERATIONS.md lists exactly what is served, with its type
        documented = dict(
            re.findall(
                r"^\| `(fieldgate_[a-z_]+)` \| (counter|gauge|histogram) \|", OPERATIONS.read_text(), re.M
            )
        )
        served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        assert documented == served

        if PROMTOOL is None:
            pytest.skip("promtool is not installed (apt-get install prometheus)")
        check = await asyncio.create_subprocess_exec(
            PROMTOOL, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(check.communicate(text.encode()), 60)
        assert check.returncode == 0 and not out.strip() and not err.strip(), (out + err).decode()
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


def served_names(text: str) -> set[str]:
    """Every sample name the exposition declares (a histogram's _bucket, _sum and _count)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def prom_query(port: int, query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as answer:
        doc: dict[str, Any] = json.loads(answer.read())
    assert doc["status"] == "success", doc
    return doc


def prom_value(port: int, query: str) -> float | None:
    result = prom_query(port, query)["data"]["result"]
    assert len(result) <= 1, (query, result)
    return float(result[0]["value"][1]) if result else None


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(check):
                return
        except OSError:
            pass  # not listening yet
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus is not installed (apt-get install prometheus)"
)
async def test_prometheus_scrapes_the_daemon(tmp_path: Path, sim: ModbusSim, broker: Broker) -> None:
    port = free_port()
    cfg = quiet_config(tmp_path, broker, sim, port)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: fieldgate
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""
    )
    assert PROMETHEUS is not None
    prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - owned by the process
    prom = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        stdout=prom_log,
        stderr=prom_log,
    )
    prom_log.close()
    try:
        status = await wait_status(port, settled, "the first cycles sent")
        started = time.time()
        # a scrape after everything settled: its values are final

        def scraped() -> bool:
            # timestamp(): when the last scrape happened (an instant query's own time is the query's)
            at = prom_value(prom_port, 'timestamp(up{job="fieldgate"})')
            return at is not None and at > started and prom_value(prom_port, 'up{job="fieldgate"}') == 1

        await wait_for(scraped, "Prometheus scraping the daemon", timeout=90)
        assert prom_value(prom_port, "sum(fieldgate_readings_sent_total)") == status["upstream"]["sent"]
        assert (
            prom_value(prom_port, 'fieldgate_device_poll_errors_total{device="ghost"}')
            == (status["devices"]["ghost"]["errors"])
        )
        assert prom_value(prom_port, "fieldgate_buffer_pending_readings") == status["buffer"]["pending"]
        assert (prom_value(prom_port, "fieldgate_buffer_bytes") or 0) > 0  # the WAL's size moves on its own
        assert prom_value(prom_port, 'fieldgate_upstream_connected{upstream="mqtt"}') == 1
        assert prom_value(prom_port, 'sum(fieldgate_readings_stored_total{device="meter"})') == 2
        assert prom_value(prom_port, 'fieldgate_poll_duration_seconds_count{bus="lan"}') == 2
        # Prometheus read the gateway label with its quote
        info = prom_query(prom_port, "fieldgate_build_info")["data"]["result"]
        assert info[0]["metric"]["gateway"] == "gw-metrics"

        # The sample Grafana dashboard: every metric it names is in the daemon's output, every query runs.
        _, _, body = await get_raw(port, "/metrics")
        metric_names = served_names(body.decode())
        exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
        assert len(exprs) >= 15
        for expr in exprs:
            named = set(re.findall(r"\bfieldgate_[a-z_]+", expr))
            assert named, expr
            missing = named - metric_names
            assert not missing, f"{expr}: {missing} not served by the daemon"
            concrete = (
                expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")
            )
            prom_query(prom_port, concrete)  # asserts status success: the PromQL is valid
        # and so are the alerts docs/OPERATIONS.md suggests
        alerts_line = re.search(r"^Useful alerts:(.*?)\n\n", OPERATIONS.read_text(), re.M | re.S)
        assert alerts_line is not None
        alerts = re.findall(r"`([^`]+)`", alerts_line.group(1))
        assert len(alerts) == 4
        for expr in alerts:
            assert set(re.findall(r"\bfieldgate_[a-z_]+", expr)) <= metric_names, expr
            prom_query(prom_port, expr)
    finally:
        prom.terminate()  # by its PID, the process we started
        try:
            await asyncio.wait_for(prom.wait(), 30)
        except TimeoutError:
            prom.kill()
            await prom.wait()
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
