"""`fieldgate buffer stats|export|purge` on real buffer files, and beside a running daemon (WAL readers)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.pipeline.reading import Reading
from agent.pipeline.store import Store
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.broker import free_port
from tests.daemon import Daemon, fieldgate_cli, write_config

pytestmark = pytest.mark.timeout(90)

HOUR = 3_600_000
T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def fill(db: Path) -> None:
    """Two devices, readings one hour apart from T0: meter 0..5 h (6 rows), lamp 0..2 h (3 rows)."""
    store = Store(db, 16 * 1024 * 1024)
    store.open()
    try:
        store.append([Reading("meter", "voltage", T0 + i * HOUR, 230.0 + i, "V") for i in range(6)])
        store.append([Reading("lamp", "on", T0 + i * HOUR, i % 2 == 0, None) for i in range(3)])
        store.append([Reading("lamp", "label", T0, 'a,b "c"', None, "uncertain")])
    finally:
        store.close()


def config(tmp: Path, db: Path, sim_port: int = 1) -> Path:
    return write_config(
        tmp / "fieldgate.yaml",
        gateway="gw-buf",
        broker_port=free_port(),  # nobody listens: everything stays in the buffer
        db=db,
        buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {sim_port}, timeout: 300ms}}",
        devices="""  regs:
    bus: lan
    unit_id: 1
    poll: 200ms
    points:
      r0: {table: holding, address: 0, unit: V}
""",
    )


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    db = tmp_path / "buffer.db"
    fill(db)
    return config(tmp_path, db)


async def stats(cfg: Path) -> dict[str, object]:
    res = await fieldgate_cli("buffer", "stats", "-c", str(cfg), "--json")
    assert res.code == 0, res.err
    doc: dict[str, object] = json.loads(res.out)
    return doc


async def test_stats(filled: Path) -> None:
    doc = await stats(filled)
    assert doc["pending"] == 10
    assert doc["devices"] == {"lamp": 4, "meter": 6}
    assert doc["oldest"] == "2024-05-01T12:00:00.000Z" and doc["oldest_ts"] == T0
    assert doc["newest"] == "2024-05-01T17:00:00.000Z"
    assert isinstance(doc["oldest_age_s"], float) and doc["oldest_age_s"] > 0
    assert doc["evicted"] == 0 and doc["recovered"] == 0 and doc["daemon_running"] is False
    assert isinstance(doc["bytes"], int) and doc["bytes"] > 0
    text = await fieldgate_cli("buffer", "stats", "-c", str(filled))
    assert text.code == 0
    assert "pending   10 readings" in text.out and "2024-05-01T12:00:00.000Z" in text.out
    assert "meter  6" in text.out


async def test_stats_without_a_buffer_says_so(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "nothing-here.db")
    res = await fieldgate_cli("buffer", "stats", "-c", str(cfg))
    assert res.code == 1 and "no buffer at" in res.err
    assert not (tmp_path / "nothing-here.db").exists()  # a reader never creates the file


async def test_export_csv_with_filters(filled: Path) -> None:
    res = await fieldgate_cli(
        "buffer", "export", "-c", str(filled), "--device", "meter",
        "--since", "2024-05-01T13:00:00Z", "--until", "2024-05-01T16:00:00",
    )  # fmt: skip
    assert res.code == 0, res.err
    rows = list(csv.DictReader(io.StringIO(res.out)))
    assert [r["value"] for r in rows] == ["231.0", "232.0", "233.0"]  # 13:00, 14:00, 15:00; 16:00 excluded
    assert rows[0]["unit"] == "V" and rows[0]["time"] == "2024-05-01T13:00:00.000Z"
    assert rows[0]["ts"] == str(T0 + HOUR) and rows[0]["device"] == "meter" and rows[0]["point"] == "voltage"
    seqs = [int(r["seq"]) for r in rows]
    assert seqs == sorted(seqs)

    lamp = await fieldgate_cli("buffer", "export", "-c", str(filled), "--device", "lamp", "--format", "csv")
    lamp_rows = list(csv.DictReader(io.StringIO(lamp.out)))
    assert [r["value"] for r in lamp_rows] == ["true", "false", "true", 'a,b "c"']  # quoted, round-trips
    assert lamp_rows[3]["quality"] == "uncertain"


async def test_export_jsonl_to_a_file(filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    res = await fieldgate_cli("buffer", "export", "-c", str(filled), "--format", "jsonl", "-o", str(out))
    assert res.code == 0 and "10 readings written" in res.err
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) == 10
    assert docs[0] == {"seq": 1, "device": "meter", "point": "voltage", "ts": T0, "value": 230.0, "unit": "V"}
    assert [d["seq"] for d in docs] == list(range(1, 11))

    recent = await fieldgate_cli("buffer", "export", "-c", str(filled), "--format", "jsonl", "--since", "1h")
    assert recent.code == 0 and recent.out == ""  # everything is older than an hour ago

    bad = await fieldgate_cli("buffer", "export", "-c", str(filled), "--since", "yesterday")
    assert bad.code == 1 and "neither a time" in bad.err


async def test_purge_needs_yes_and_counts_as_evicted(filled: Path) -> None:
    nothing = await fieldgate_cli("buffer", "purge", "-c", str(filled))
    assert nothing.code == 2 and "--all" in nothing.err
    dry = await fieldgate_cli("buffer", "purge", "-c", str(filled), "--device", "lamp")
    assert dry.code == 1 and "would delete 4 " in dry.err and "--yes" in dry.err
    assert (await stats(filled))["pending"] == 10

    res = await fieldgate_cli("buffer", "purge", "-c", str(filled), "--device", "meter", "--before",
                              "2024-05-01T14:00:00Z", "--yes")  # fmt: skip
    assert res.code == 0, res.err
    assert "purged 2 " in res.out
    doc = await stats(filled)
    assert doc["pending"] == 8 and doc["evicted"] == 2 and doc["devices"] == {"lamp": 4, "meter": 4}

    res = await fieldgate_cli("buffer", "purge", "-c", str(filled), "--all", "--yes")
    assert res.code == 0 and "purged 8 " in res.out
    doc = await stats(filled)
    assert doc["pending"] == 0 and doc["evicted"] == 10 and doc["devices"] == {}


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSim]:
    s = ModbusSim({1: SimUnit()})
    await s.start_tcp("127.0.0.1", 0)
    s.units[1].set("holding", 0, [231])
    try:
        yield s
    finally:
        await s.aclose()


async def test_beside_a_running_daemon(tmp_path: Path, sim: ModbusSim) -> None:
    db = tmp_path / "buffer.db"
    cfg = config(tmp_path, db, sim.port)
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        # The upstream is down: readings pile up, and a read-only reader sees them while the daemon writes.
        for _ in range(300):
            if db.exists() and (tmp_path / "fieldgate.pid").exists():
                doc = await stats(cfg)
                if isinstance(doc["pending"], int) and doc["pending"] >= 3:
                    break
            assert daemon.alive(), daemon.log_text()[-2000:]
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"no readings buffered: {daemon.log_text()[-2000:]}")
        assert doc["daemon_running"] is True and doc["devices"] == {"regs": doc["pending"]}

        exported = await fieldgate_cli("buffer", "export", "-c", str(cfg), "--format", "jsonl")
        assert exported.code == 0
        first = json.loads(exported.out.splitlines()[0])
        assert first["device"] == "regs" and first["value"] == 231 and first["unit"] == "V"

        refused = await fieldgate_cli("buffer", "purge", "-c", str(cfg), "--all", "--yes")
        assert refused.code == 1
        assert f"pid {daemon.pid}" in refused.err and "stop it first" in refused.err
        assert (await stats(cfg))["evicted"] == 0
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]

    pending = (await stats(cfg))["pending"]
    assert isinstance(pending, int) and pending >= 3
    res = await fieldgate_cli("buffer", "purge", "-c", str(cfg), "--all", "--yes")
    assert res.code == 0, res.err
    doc = await stats(cfg)
    assert doc["pending"] == 0 and doc["evicted"] == pending and doc["daemon_running"] is False
