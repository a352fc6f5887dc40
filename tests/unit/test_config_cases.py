"""Config error golden cases: tests/cases/config/<case>/{fieldgate.yaml, expected.txt} (FILE:LINE:COL lines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.config.loader import load_config
from agent.errors import ConfigError

CASES = Path(__file__).resolve().parents[1] / "cases" / "config"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_config_error_case(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = CASES / case
    monkeypatch.chdir(folder)
    expected = (folder / "expected.txt").read_text().splitlines()
    with pytest.raises(ConfigError) as err:
        load_config(Path("fieldgate.yaml"))
    assert err.value.problems == expected


def test_check_verb_exit_codes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / "unknown-key")
    assert cli(["check", "-c", "fieldgate.yaml"]) == 1
    out = capsys.readouterr().out
    assert "fieldgate.yaml:3:3: gateway.nmae: unknown key; did you mean 'name'?" in out
    assert cli(["check", "-c", str(REPO / "config" / "fieldgate.example.yaml")]) == 0
    assert cli(["check", "--no-such-flag"]) == 2


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p.relative_to(REPO)) for p in [*REPO.glob("config/*.yaml"), *REPO.glob("config/examples/*.yaml")]
    ),
)
def test_every_example_config_is_valid(path: str) -> None:
    load_config(REPO / path)


def test_profile_points_merge_and_device_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        """gateway: {id: gw-1}
upstream: {mqtt: {url: "mqtt://127.0.0.1:1883"}}
buses: {rs485: {type: modbus-rtu, port: /dev/ttyUSB0}}
devices:
  meter:
    bus: rs485
    profile: eastron-sdm120
    points:
      voltage: {table: input, address: 0, type: float32, unit: mV, scale: 1000}
"""
    )
    config = load_config(cfg)
    points = config.devices["meter"].points
    assert points["voltage"].unit == "mV"  # the device's own definition wins
    assert len(points) > 5  # the profile's other points are there


def test_profile_errors_point_into_the_profile_file(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.yaml").write_text("model: X\npoints:\n  v: {table: input, adress: 0}\n")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        """gateway: {id: gw-1}
upstream: {mqtt: {url: "mqtt://127.0.0.1:1883"}}
buses: {lan: {type: modbus-tcp, host: 127.0.0.1}}
devices:
  d: {bus: lan, profile: mine}
"""
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    profile = tmp_path / "profiles" / "mine.yaml"
    assert (
        f"{profile}:3:21: devices.d.points.v.adress: unknown key; did you mean 'address'?"
        in err.value.problems
    )


def test_schema_verb_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert cli(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert "gateway" in schema["properties"] and "devices" in schema["properties"]
