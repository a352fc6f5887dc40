"""The running upstreams (agent/upstream/build.py `Upstreams`) as the rest of the daemon sees them: the main
link's state and control messages before any upstream runs, and the secrets a reload compares (a rotated
password reconnects even when the config text is the same). The uplinks themselves are tested against a
real broker in tests/integration/test_upstreams.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config.loader import load_config
from agent.config.models import FieldgateConfig
from agent.pipeline.store import AsyncStore
from agent.upstream import build
from agent.watchdog import ProgressWatchdog
from tests.broker import free_port

TEXT = """\
gateway: {{id: gw-b}}
upstream: {{mqtt: {{url: "mqtt://127.0.0.1:{port}", username: gw, password_file: {secret}}}}}
storage: {{path: {db}}}
local: {{listen: ""}}
"""


@pytest.fixture
def config(tmp_path: Path) -> FieldgateConfig:
    secret = tmp_path / "mqtt.password"
    secret.write_text("first\n")
    secret.chmod(0o600)
    path = tmp_path / "fieldgate.yaml"
    path.write_text(TEXT.format(port=free_port(), secret=secret, db=tmp_path / "buffer.db"))
    return load_config(path)


async def test_before_any_upstream_runs(async_store: AsyncStore, config: FieldgateConfig) -> None:
    ups = build.Upstreams(async_store, ProgressWatchdog())
    assert ups.connected() is False
    assert ups.last_error() == "upstream not started"
    assert await ups.publish("gw/config/state", {"state": "idle"}, retain=True) is False
    assert await ups.publish_result({"id": "sched-1", "ok": True}) is False
    assert ups.secrets_changed(config)  # nothing read yet
    ups.offer([])  # nobody to offer to: nothing happens


async def test_a_rotated_secret_is_a_change(
    tmp_path: Path, async_store: AsyncStore, config: FieldgateConfig
) -> None:
    watchdog = ProgressWatchdog()
    ups = build.Upstreams(async_store, watchdog)
    wiring = build.Wiring(async_store, dict, None, dict, dict)
    secrets = build.mqtt_secrets(config.upstream.mqtt)
    async with asyncio.TaskGroup() as tg:
        ups.start(tg, config, wiring, 1, secrets, [])
        assert ups.main is not None and "uplink" in watchdog.names()
        assert not ups.secrets_changed(config)
        (tmp_path / "mqtt.password").write_text("second\n")
        assert ups.secrets_changed(config)
        assert ups.connected() is False  # nobody listens on its port
        assert await ups.stop() == 1
    assert ups.main is None
