"""SIGHUP's reload without a daemon (agent/control/reload.py): a file that does not validate, cannot be read or
whose apply fails changes nothing and says why; a good one is applied and recorded (hash, time, source); each
attempt is counted when its outcome is known, between systemd's RELOADING=1 and READY=1.

The daemon-level behaviour (signals, `fieldgate reload`, what restarts) is in tests/integration/test_reload.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.config.loader import load_config
from agent.config.models import FieldgateConfig
from agent.control import reload

TEXT = """\
gateway: {{id: gw-r}}
upstream: {{mqtt: {{url: "mqtt://127.0.0.1:1"}}}}
storage: {{path: {db}}}
local: {{listen: ""}}
remote_config: {{enabled: {remote}}}
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Notifier:
    def __init__(self) -> None:
        self.said: list[str] = []

    def reloading(self) -> bool:
        self.said.append("RELOADING=1")
        return True

    def ready(self, status: str | None = None) -> bool:
        self.said.append(f"READY=1 {status}")
        return True


class Remote:
    def __init__(self) -> None:
        self.told = 0

    def running_changed(self) -> None:
        self.told += 1


class FakeRuntime:
    """The runtime's side of a reload, in memory: `apply` records what it was given."""

    def __init__(self, path: Path, fail: Exception | None = None) -> None:
        self.config_path = path
        self.config: FieldgateConfig = load_config(path)
        self.remote = Remote()
        self.notifier = Notifier()
        self.config_hash = sha(path.read_bytes())
        self.config_applied_ts = 0
        self.config_source = "file"
        self.reload_error: str | None = "an earlier refusal"
        self.reloads = 0
        self.reload_ts: int | None = None
        self.applied: list[FieldgateConfig] = []
        self.fail = fail

    async def apply(self, new: FieldgateConfig) -> list[str]:
        if self.fail is not None:
            raise self.fail
        self.applied.append(new)
        self.config = new
        return ["upstream reconnected"]

    def summary(self) -> str:
        return "0 devices"


def config_file(tmp_path: Path, remote: bool = False) -> Path:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(TEXT.format(db=tmp_path / "buffer.db", remote=str(remote).lower()))
    return path


async def test_a_good_file_is_applied_and_recorded(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    rt = FakeRuntime(path)
    path.write_text(path.read_text().replace("gw-r", "gw-s"))
    assert await reload.reload_from_file(rt) is True
    assert [c.gateway.id for c in rt.applied] == ["gw-s"]
    assert rt.config_hash == sha(path.read_bytes())
    assert rt.config_applied_ts > 0 and rt.config_source == "file"
    assert rt.reload_error is None
    assert rt.reloads == 1 and rt.reload_ts is not None
    assert rt.notifier.said == ["RELOADING=1", "READY=1 0 devices"]
    assert rt.remote.told == 0  # remote configuration is off


async def test_remote_configuration_hears_of_the_new_running_config(tmp_path: Path) -> None:
    rt = FakeRuntime(config_file(tmp_path, remote=True))
    assert await reload.reload_from_file(rt) is True
    assert rt.remote.told == 1


async def test_a_file_that_does_not_validate_changes_nothing(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    rt = FakeRuntime(path)
    before = rt.config_hash
    path.write_text(path.read_text().replace("gw-r", "gw r!"))
    assert await reload.reload_from_file(rt) is False
    assert rt.applied == [] and rt.config.gateway.id == "gw-r" and rt.config_hash == before
    assert rt.reload_error is not None and "gateway.id" in rt.reload_error
    assert rt.reloads == 1
    assert rt.notifier.said[-1].startswith("READY=1")


async def test_a_file_that_cannot_be_read_changes_nothing(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    rt = FakeRuntime(path)
    path.unlink()
    assert await reload.reload_from_file(rt) is False
    assert rt.applied == []
    assert rt.reload_error is not None and str(path) in rt.reload_error
    assert rt.reloads == 1


async def test_an_apply_that_fails_changes_nothing(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    rt = FakeRuntime(path, fail=ValueError("no such certificate"))
    before = rt.config_hash
    path.write_text(path.read_text().replace("gw-r", "gw-s"))
    assert await reload.reload_from_file(rt) is False
    assert rt.reload_error == "reload refused: no such certificate"
    assert rt.config_hash == before and rt.config_applied_ts == 0
    assert rt.reloads == 1


async def test_apply_config_records_its_source(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    rt = FakeRuntime(path)
    new = load_config(path)
    changes = await reload.apply_config(rt, new, b"pushed bytes", source="remote")
    assert changes == ["upstream reconnected"]
    assert (rt.config_hash, rt.config_source) == (sha(b"pushed bytes"), "remote")
    assert rt.reloads == 0  # not a reload: `fieldgate reload` does not wait for it
