"""`fieldgate diff`: what a new config changes, in words (agent/config/diff.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.config.diff import describe
from agent.config.loader import load_config

BASE = """gateway: {id: gw-1}
upstream:
  mqtt: {url: "mqtt://a"}
buses:
  rs485-1: {type: modbus-tcp, host: 127.0.0.1, port: 5020}
devices:
  meter-1:
    bus: rs485-1
    unit_id: 1
    poll: 10s
    points:
      voltage: {table: input, address: 0, unit: V}
      current: {table: input, address: 6, type: float32, unit: A}
"""

LAMP = """  lamp-7:
    bus: rs485-1
    unit_id: 7
    points:
      on: {table: coil, address: 0, writable: true}
      dim: {address: 0, writable: true}
      p1: {address: 1}
      p2: {address: 2}
      p3: {address: 3}
      p4: {address: 4}
"""


def _load(tmp: Path, name: str, text: str) -> object:
    path = tmp / name
    path.write_text(text)
    return load_config(path)


def _describe(tmp: Path, old: str, new: str) -> list[str]:
    return describe(_load(tmp, "old.yaml", old), _load(tmp, "new.yaml", new))  # type: ignore[arg-type]


def test_same_meaning_is_no_change(tmp_path: Path) -> None:
    # 10s and 10000ms are the same poll interval: not a change
    assert _describe(tmp_path, BASE, BASE.replace("poll: 10s", "poll: 10000ms") + "\n# comment\n") == []


def test_device_added_with_a_summary(tmp_path: Path) -> None:
    lines = _describe(tmp_path, BASE, BASE + LAMP)
    assert lines == ["device lamp-7 added (modbus on bus rs485-1, unit 7, 6 points)"]


def test_device_removed(tmp_path: Path) -> None:
    assert _describe(tmp_path, BASE + LAMP, BASE) == ["device lamp-7 removed"]


def test_poll_scale_and_url_changes(tmp_path: Path) -> None:
    new = (
        BASE.replace("poll: 10s", "poll: 5s")
        .replace("address: 0, unit: V}", "address: 0, unit: V, scale: 0.1}")
        .replace("mqtt://a", "mqtts://b")
    )
    assert _describe(tmp_path, BASE, new) == [
        "upstream: url mqtt://a -> mqtts://b",
        "device meter-1: poll 10s -> 5s",
        "device meter-1: point voltage: scale 1 -> 0.1",
    ]


def test_points_added_removed_and_device_disabled(tmp_path: Path) -> None:
    new = BASE.replace(
        "      current: {table: input, address: 6, type: float32, unit: A}\n",
        "      power: {table: input, address: 8, type: float32, unit: W}\n",
    ).replace("    poll: 10s\n", "    poll: 10s\n    enabled: false\n")
    assert _describe(tmp_path, BASE, new) == [
        "device meter-1 disabled",
        "device meter-1: point power added",
        "device meter-1: point current removed",
    ]


def test_bus_change_and_other_sections(tmp_path: Path) -> None:
    new = BASE.replace("port: 5020", "port: 502") + 'local: {listen: ""}\n'
    assert _describe(tmp_path, BASE, new) == [
        "bus rs485-1: port 5020 -> 502",
        "local: listen 127.0.0.1:8470 -> ",
    ]


def test_verb_prints_changes_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text(BASE + LAMP)
    assert cli(["diff", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 0
    assert "device lamp-7 added" in capsys.readouterr().out
    assert cli(["diff", str(tmp_path / "a.yaml"), str(tmp_path / "a.yaml")]) == 0
    assert capsys.readouterr().out.strip() == "no change"


def test_verb_refuses_an_invalid_file_with_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text(BASE.replace("poll: 10s", "poll: soon"))
    assert cli(["diff", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'b.yaml'}:10:11: devices.meter-1.poll:" in out
