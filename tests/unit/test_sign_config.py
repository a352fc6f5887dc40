"""scripts/sign-config: the platform's signing tool produces a push this gateway accepts, and only this one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from agent.control.remoteconfig import RemoteConfig
from tests.unit.test_remoteconfig import GW, deliver, keyfile, setup

REPO = Path(__file__).resolve().parents[2]


def sign(tmp: Path, key_file: Path, config: Path, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sign-config"), "--key", str(key_file), *extra, str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


async def test_signed_by_the_tool_is_accepted_once(tmp_path: Path) -> None:
    key, pub = keyfile(tmp_path)
    rc, host, cfg = setup(tmp_path, f", public_key_file: {pub}")
    for label, fmt in (
        ("pkcs8", serialization.PrivateFormat.PKCS8),
        ("openssh", serialization.PrivateFormat.OpenSSH),
    ):
        private = tmp_path / f"platform-{label}.key"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
        new = tmp_path / f"new-{label}.yaml"
        new.write_text(cfg.read_text() + f"# {label}\n")
        message = sign(tmp_path, private, new, "--gateway", GW)  # serial: the time in ms
        state = await deliver(rc, host, message)
        assert state["ok"] is True and cfg.read_text() == new.read_text(), state
        assert message["id"] == str(message["serial"])
    # the same message again under another id: a replay; for another gateway: refused
    state = await deliver(RemoteConfig(host), host, {**message, "id": "again"})
    assert state["ok"] is False and "not newer" in state["error"]
    other = sign(tmp_path, private, new, "--gateway", "gw-other", "--serial", str(message["serial"] + 1))
    state = await deliver(rc, host, other)
    assert state["ok"] is False and "addressed to gateway 'gw-other'" in state["error"]
