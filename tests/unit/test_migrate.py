"""Config format versions: future files refused, old ones migrated visibly (agent/config/migrate.py, `fieldgate migrate`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.cli import main as cli
from agent.config import migrate
from agent.config.loader import load_config
from agent.errors import ConfigError

V1 = """gateway: {id: gw-1}
upstream:
  mqtt: {url: "mqtt://127.0.0.1:1883"}
"""

# The synthetic pre-release layout: MQTT settings at the top level, comments the technician wrote.
V0 = """# street lamps, district 4
version: 0   # pre-release format
gateway: {id: gw-1}
mqtt:
  url: "mqtt://127.0.0.1:1883"   # the platform's broker
  # username comes later
  keepalive: 10s
devices: {}
"""


def test_current_version_and_absent_version_load(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(V1)
    assert load_config(path).version == migrate.CURRENT_VERSION == 1
    path.write_text("version: 1\n" + V1)
    assert load_config(path).version == 1


def test_future_version_refused_with_upgrade_advice(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("version: 7\n" + V1 + "newfangled: {x: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    # one message, not a list of "unknown key" errors about a format this fieldgate cannot know
    assert err.value.problems == [
        f"{path}:1:1: (top): this config is for fieldgate config version 7; "
        "this fieldgate reads up to 1: upgrade fieldgate"
    ]


def test_old_version_is_never_reinterpreted(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(V0)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.problems) == 1
    assert "version 0" in err.value.problems[0] and "fieldgate migrate" in err.value.problems[0]


def test_v0_to_v1_moves_mqtt_and_keeps_comments(tmp_path: Path) -> None:
    result = migrate.migrate_text(V0)
    assert (result.old_version, result.new_version, result.steps) == (0, 1, [0])
    assert "# street lamps, district 4" in result.text
    assert "version: 1   # pre-release format" in result.text
    assert '    url: "mqtt://127.0.0.1:1883"   # the platform\'s broker' in result.text
    assert "    # username comes later" in result.text
    data = yaml.safe_load(result.text)
    assert data["upstream"]["mqtt"] == {"url": "mqtt://127.0.0.1:1883", "keepalive": "10s"}
    assert "mqtt" not in data and data["devices"] == {}
    path = tmp_path / "f.yaml"
    path.write_text(result.text)
    assert load_config(path).upstream.mqtt.keepalive == 10.0


def test_flow_style_and_version_added_when_absent() -> None:
    text = "gateway: {id: gw-1}\nmqtt: {url: 'mqtt://h'}\n"
    out = migrate.migrate_text("version: 0\n" + text).text
    assert yaml.safe_load(out) == {
        "version": 1,
        "gateway": {"id": "gw-1"},
        "upstream": {"mqtt": {"url": "mqtt://h"}},
    }
    assert migrate._set_version("# c\n\ngateway: {}\n", 1) == "# c\n\nversion: 1\ngateway: {}\n"


def test_current_file_unchanged_and_future_refused() -> None:
    assert migrate.migrate_text(V1).text == V1 and migrate.migrate_text(V1).steps == []
    with pytest.raises(migrate.MigrationError, match="upgrade fieldgate"):
        migrate.migrate_text("version: 3\n" + V1)
    with pytest.raises(migrate.MigrationError, match="not a config format version"):
        migrate.migrate_text("version: one\n" + V1)


def test_additive_step_reads_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # A future format that only grew (step None): older files load as they are, no migration asked.
    monkeypatch.setattr(migrate, "CURRENT_VERSION", 2)
    monkeypatch.setitem(migrate.MIGRATIONS, 1, None)
    assert migrate.version_problem(1) is None
    assert "fieldgate migrate" in (migrate.version_problem(0) or "")
    assert migrate.migrate_text("version: 0\n" + "gateway: {id: g}\nmqtt: {url: 'mqtt://h'}\n").steps == [
        0,
        1,
    ]


def test_verb_prints_diff_then_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(V0)
    assert cli(["migrate", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "-mqtt:" in out and "+upstream:" in out and "+  mqtt:" in out
    assert path.read_text() == V0  # nothing written without --write
    assert cli(["migrate", "-c", str(path), "--write"]) == 0
    capsys.readouterr()
    assert load_config(path).version == 1
    assert (tmp_path / "fieldgate.yaml.v0").read_text() == V0
    assert cli(["migrate", "-c", str(path)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out


def test_verb_refuses_a_result_that_does_not_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(V0.replace("keepalive: 10s", "keepalive: often"))
    assert cli(["migrate", "-c", str(path), "--write"]) == 1
    assert "upstream.mqtt.keepalive" in capsys.readouterr().out
    assert path.read_text().startswith("# street lamps")
    assert "version: 0" in path.read_text()
