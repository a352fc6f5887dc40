"""A restart with an unchanged config starts from the snapshot of its last validation (agent/validate.py),
checks it in the background, and never runs on a snapshot whose inputs changed."""

from __future__ import annotations

import asyncio
import marshal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import plainmodel
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import Broker
from tests.daemon import Daemon, write_config

pytestmark = pytest.mark.timeout(120)

FROM_SNAPSHOT = "started from its snapshot"
CHECKED = "validated again, same as its snapshot"


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit()})
    s.units[1].set("holding", 0, [230, 5])
    await s.start_tcp()
    try:
        yield s
    finally:
        await s.aclose()


def setup(tmp: Path, broker: Broker, sim: ModbusSim, scale: str = "0.1") -> tuple[Path, dict[str, str]]:
    (tmp / "profiles").mkdir(exist_ok=True)
    (tmp / "profiles" / "meter.yaml").write_text(
        f"points:\n  voltage: {{table: holding, address: 0, scale: {scale}, unit: V}}\n"
    )
    cfg = write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-snap",
        broker_port=broker.port,
        db=tmp / "buffer.db",
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim.port}}}",
        devices="  m1: {bus: lan, unit_id: 1, poll: 1s, profile: meter}",
    )
    (tmp / "site").mkdir(exist_ok=True)  # searched first for profiles, empty: `meter` is found after it
    return cfg, {"FIELDGATE_CACHE_DIR": str(tmp / "cache"), "FIELDGATE_PROFILES": str(tmp / "site")}


async def run_until(daemon: Daemon, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while text not in daemon.log_text():
        assert daemon.alive(), daemon.log_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{daemon.log_text()[-3000:]}"
        await asyncio.sleep(0.05)
    return daemon.log_text()


async def first_start(cfg: Path, tmp: Path, env: dict[str, str]) -> Daemon:
    """A start that validates the file (no snapshot yet) and keeps its snapshot; stopped cleanly."""
    first = Daemon(cfg, tmp / "first.log", env).start()
    try:
        await run_until(first, "connected to")
    finally:
        assert first.stop() == 0
    return first


def snapshot_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "cache").glob("config-*.snapshot"))


async def test_a_restart_starts_from_the_snapshot_then_checks_it(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    cfg, env = setup(tmp_path, broker, sim)
    first = await first_start(cfg, tmp_path, env)
    assert FROM_SNAPSHOT not in first.log_text()  # no snapshot yet: the child validated the file
    [file] = snapshot_files(tmp_path)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600  # it may hold the broker's password

    second = Daemon(cfg, tmp_path / "second.log", env).start()
    try:
        await run_until(second, FROM_SNAPSHOT)
        await run_until(second, CHECKED)  # the background check agrees
        assert not second.loads_pydantic()  # the check ran in a child, as every validation does
        assert second.alive()
    finally:
        assert second.stop() == 0


@pytest.mark.parametrize("change", ["profile edited", "profile shadowed", "config edited", "profiles env"])
async def test_a_changed_input_is_validated_again(
    tmp_path: Path, broker: Broker, sim: ModbusSim, change: str
) -> None:
    cfg, env = setup(tmp_path, broker, sim)
    await first_start(cfg, tmp_path, env)
    if change == "profile edited":
        setup(tmp_path, broker, sim, scale="0.01")
    elif change == "profile shadowed":  # a file appears where the search looked first and found nothing
        (tmp_path / "site" / "meter.yaml").write_text((tmp_path / "profiles" / "meter.yaml").read_text())
    elif change == "config edited":
        cfg.write_text(cfg.read_text().replace("poll: 1s", "poll: 2s"))
    else:
        env["FIELDGATE_PROFILES"] = str(tmp_path / "elsewhere")
    second = Daemon(cfg, tmp_path / "second.log", env).start()
    try:
        await run_until(second, "connected to")
        assert FROM_SNAPSHOT not in second.log_text()
    finally:
        second.stop()


async def test_an_out_of_date_snapshot_is_put_right(tmp_path: Path, broker: Broker, sim: ModbusSim) -> None:
    """What code changed under an unchanged version would do: the snapshot says poll 7s where the file, as
    validated now, says 1s. The daemon starts on it, then the check applies the file."""
    cfg, env = setup(tmp_path, broker, sim)
    await first_start(cfg, tmp_path, env)
    [file] = snapshot_files(tmp_path)
    entry = marshal.loads(file.read_bytes())
    device = entry["snapshot"][2]["devices"]["m1"]
    assert device[0] == plainmodel.MODEL and device[2]["poll"] == 1.0
    device[2]["poll"] = 7.0
    file.write_bytes(marshal.dumps(entry))

    second = Daemon(cfg, tmp_path / "second.log", env).start()
    try:
        await run_until(second, FROM_SNAPSHOT)
        log = await run_until(second, "was out of date; applying the file")
        log = await run_until(second, "applied:")
        assert "m1" in log.split("was out of date", 1)[1]  # the device whose poll changed was restarted
    finally:
        second.stop()
    entry = marshal.loads(file.read_bytes())
    assert entry["snapshot"][2]["devices"]["m1"][2]["poll"] == 1.0  # renewed


async def test_a_file_broken_during_the_restart_is_reported(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    """The file is edited (and broken) just after the daemon read its snapshot: it keeps running, says why,
    and drops the snapshot; the next start validates and refuses the file."""
    cfg, env = setup(tmp_path, broker, sim)
    await first_start(cfg, tmp_path, env)
    second = Daemon(cfg, tmp_path / "second.log", env).start()
    try:
        await run_until(second, FROM_SNAPSHOT)
        cfg.write_text(cfg.read_text().replace("poll: 1s", "poll: often"))
        log = await run_until(second, "no longer validates")
        assert "devices.m1.poll" in log.split("no longer validates", 1)[1]
        assert second.alive()
    finally:
        second.stop()
    assert snapshot_files(tmp_path) == []
    third = Daemon(cfg, tmp_path / "third.log", env).start()
    assert third.proc is not None
    assert third.proc.wait(30) == 1
    assert "devices.m1.poll" in third.log_text()


def test_the_cache_directory_defaults_to_systemds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import validate

    monkeypatch.delenv("FIELDGATE_CACHE_DIR", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    assert validate.cache_file(tmp_path / "f.yaml") is None  # no directory: no snapshot
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    file = validate.cache_file(tmp_path / "f.yaml")
    assert file is not None and file.parent == tmp_path / "a"
    monkeypatch.setenv("FIELDGATE_CACHE_DIR", str(tmp_path / "c"))
    file = validate.cache_file(tmp_path / "f.yaml")
    assert file is not None and file.parent == tmp_path / "c"


async def test_an_unusable_cache_directory_costs_only_the_head_start(
    tmp_path: Path, broker: Broker, sim: ModbusSim
) -> None:
    """A cache directory that cannot be written (a file in its place) and a damaged snapshot: the daemon
    says so and starts as without a cache."""
    cfg, env = setup(tmp_path, broker, sim)
    (tmp_path / "blocked").write_text("not a directory")
    blocked = dict(env, FIELDGATE_CACHE_DIR=str(tmp_path / "blocked"))
    daemon = Daemon(cfg, tmp_path / "blocked.log", blocked).start()
    try:
        log = await run_until(daemon, "connected to")
        assert "config snapshot not kept" in log
    finally:
        assert daemon.stop() == 0

    await first_start(cfg, tmp_path, env)
    [file] = snapshot_files(tmp_path)
    file.write_bytes(b"\x00garbage")
    damaged = Daemon(cfg, tmp_path / "damaged.log", env).start()
    try:
        log = await run_until(damaged, "connected to")
        assert "unreadable, ignored" in log and FROM_SNAPSHOT not in log
    finally:
        assert damaged.stop() == 0
    assert marshal.loads(file.read_bytes())["key"]["inputs"][0][0] == str(cfg)  # renewed by that start
