"""Remote configuration without a daemon: the bound envelope, the persisted serial, the opt-in old form, the
rollback at start, what may be published, and a hypothesis fuzz of everything that arrives on config/set.

The daemon-level behaviour (kill -9, the MQTT session, file modes) is in tests/integration/test_remote_config.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.loader import load_config
from agent.config.models import FieldgateConfig
from agent.control.remoteconfig import RemoteConfig, parse_request, public_problem, recover_at_start

GW = "gw-u"


def base_text(tmp: Path, remote: str = "") -> str:
    return (
        f"gateway: {{id: {GW}}}\n"
        'upstream: {mqtt: {url: "mqtt://127.0.0.1:1"}}\n'
        f"storage: {{path: {tmp / 'buffer.db'}}}\n"
        'local: {listen: ""}\n'
        f"remote_config: {{enabled: true{remote}}}\n"
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def envelope(data: bytes, gateway: str, serial: int) -> bytes:
    """The signed message of docs/CONFIG_LIFECYCLE.md, built independently of agent/control/remoteconfig.py."""
    doc = {"config_sha256": sha(data), "gateway": gateway, "serial": serial, "type": "fieldgate.config.set/2"}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class FakeHost:
    """The runtime's side of remote configuration, in memory (no uplink: 'connected' at once)."""

    def __init__(self, path: Path) -> None:
        self.config_path = path
        self.config: FieldgateConfig = load_config(path)
        self.config_hash = sha(path.read_bytes())
        self.config_applied_ts = 1
        self.applied: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def apply_config(self, new: FieldgateConfig, data: bytes, source: str) -> list[str]:
        self.config, self.config_hash = new, sha(data)
        self.applied.append(source)
        return []

    def upstream_connected(self) -> bool:
        return True

    def upstream_error(self) -> str | None:
        return None

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool:
        return True

    def spawn(self, coro: Any, name: str) -> None:
        self.tasks.append(asyncio.ensure_future(coro))


async def deliver(rc: RemoteConfig, host: FakeHost, message: dict[str, Any] | bytes) -> dict[str, Any]:
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    await rc.handle(raw)
    while host.tasks:
        await host.tasks.pop()
    assert rc.state is not None
    return rc.state


def setup(tmp: Path, remote: str = "") -> tuple[RemoteConfig, FakeHost, Path]:
    cfg = tmp / "fieldgate.yaml"
    cfg.write_text(base_text(tmp, remote))
    host = FakeHost(cfg)
    return RemoteConfig(host), host, cfg


def keyfile(tmp: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pub = tmp / "platform.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


def signed(key: Ed25519PrivateKey, rid: str, text: str, serial: int, gateway: str = GW) -> dict[str, Any]:
    sig = base64.b64encode(key.sign(envelope(text.encode(), gateway, serial))).decode()
    return {"id": rid, "config": text, "gateway": gateway, "serial": serial, "signature": sig}


async def test_bound_envelope_and_persisted_serial(tmp_path: Path) -> None:
    key, pub = keyfile(tmp_path)
    rc, host, cfg = setup(tmp_path, f", public_key_file: {pub}")
    v2 = cfg.read_text() + "# v2\n"
    state = await deliver(rc, host, signed(key, "a", v2, serial=7))
    assert state["ok"] is True and state["hash"] == sha(v2.encode()), state
    assert json.loads((tmp_path / "fieldgate.yaml.serial").read_text())["serial"] == 7
    # a QoS 1 redelivery of the same push: nothing changes, nothing new is said
    assert await deliver(rc, host, signed(key, "a", v2, serial=7)) is state
    # replay under another id, downgrade, other gateway
    state = await deliver(rc, host, {**signed(key, "a", v2, serial=7), "id": "b"})
    assert state["ok"] is False and "not newer than the last accepted (7)" in state["error"]
    v3 = v2 + "# v3\n"
    state = await deliver(rc, host, signed(key, "c", v3, serial=6))
    assert state["ok"] is False and "downgrade" in state["error"]
    state = await deliver(rc, host, signed(key, "d", v3, serial=8, gateway="gw-x"))
    assert state["ok"] is False and "addressed to gateway 'gw-x'" in state["error"]
    # a new RemoteConfig (a restart) knows serial 7
    rc2 = RemoteConfig(host)
    state = await deliver(rc2, host, {**signed(key, "a", v2, serial=7), "id": "e"})
    assert state["ok"] is False and "not newer" in state["error"]
    state = await deliver(rc2, host, signed(key, "f", v3, serial=8))
    assert state["ok"] is True and cfg.read_text() == v3
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600


async def test_a_damaged_serial_file_refuses_rather_than_forgets(tmp_path: Path) -> None:
    key, pub = keyfile(tmp_path)
    rc, host, cfg = setup(tmp_path, f", public_key_file: {pub}")
    (tmp_path / "fieldgate.yaml.serial").write_text("{not json")
    state = await deliver(rc, host, signed(key, "a", cfg.read_text() + "# v2\n", serial=1))
    assert state["ok"] is False and "last accepted serial is unknown" in state["error"], state


async def test_the_old_unbound_form_only_when_opted_in(tmp_path: Path) -> None:
    key, pub = keyfile(tmp_path)
    rc, host, cfg = setup(tmp_path, f", public_key_file: {pub}")
    v2 = cfg.read_text() + "# v2\n"
    legacy = {"id": "l", "config": v2, "signature": base64.b64encode(key.sign(v2.encode())).decode()}
    state = await deliver(rc, host, legacy)
    assert state["ok"] is False and "unbound push refused" in state["error"]

    rc, host, cfg = setup(tmp_path, f", public_key_file: {pub}, accept_unbound: true")
    v2 = cfg.read_text() + "# v2\n"
    legacy = {"id": "l", "config": v2, "signature": base64.b64encode(key.sign(v2.encode())).decode()}
    state = await deliver(rc, host, legacy)
    assert state["ok"] is True, state
    # even then, a config written for another gateway does not rename this one
    other = v2.replace(f"id: {GW}", "id: gw-x") + "# x\n"
    legacy = {"id": "m", "config": other, "signature": base64.b64encode(key.sign(other.encode())).decode()}
    state = await deliver(rc, host, legacy)
    assert state["ok"] is False and "gateway.id" in state["error"], state


def test_recover_at_start(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text("new\n")
    (tmp_path / "fieldgate.yaml.previous").write_text("old\n")
    marker = tmp_path / "fieldgate.yaml.probation"
    marker.write_text(json.dumps({"id": "p-1", "hash": sha(b"new\n")}))
    assert recover_at_start(cfg) is True
    assert cfg.read_text() == "old\n" and not marker.exists()
    note = json.loads((tmp_path / "fieldgate.yaml.rolledback").read_text())
    assert note["id"] == "p-1" and "stopped during the probation" in note["error"]
    # a marker for another file (the technician replaced it since): dropped, nothing rolled back
    marker.write_text(json.dumps({"id": "p-2", "hash": sha(b"something else")}))
    assert recover_at_start(cfg) is False
    assert cfg.read_text() == "old\n" and not marker.exists()


def test_published_problems_quote_only_the_pushed_config(tmp_path: Path) -> None:
    staged = tmp_path / "fieldgate.yaml.new"
    assert (
        public_problem(f"{staged}:3:5: devices.x.pol: unknown key", staged)
        == "config:3:5: devices.x.pol: unknown key"
    )
    line = public_problem("/etc/fieldgate/profiles/p.yaml:2:1: root:$6$hash unknown profile key", staged)
    assert (
        line.startswith("/etc/fieldgate/profiles/p.yaml:2:1: ") and "root" not in line and "hash" not in line
    )
    line = public_problem(
        "x: the config could not be validated (validator exited 1: KeyError: 'secret')", staged
    )
    assert "secret" not in line


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"id": 1, "config": ' + b"[" * 100_000,
        b'{"id": 1, "config": ' + b'{"a":' * 200 + b"1" + b"}" * 201,
    ],
)
def test_deep_json_is_refused_by_the_parser(raw: bytes) -> None:
    with pytest.raises(Exception) as info:
        parse_request(raw)
    assert type(info.value).__name__ == "PushRefused" and "nested deeper" in str(info.value)


# --- fuzz: whatever arrives on config/set, a refusal (or an outcome) on config/state, never an exception ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=10), st.integers(), json_values),
        "config": st.one_of(st.text(max_size=200), json_values, st.just("gateway: {id: gw-u}\n")),
        "gateway": st.one_of(st.just(GW), st.text(max_size=8), json_values),
        "serial": st.one_of(st.integers(), json_values),
        "signature": st.one_of(
            st.text(max_size=90), st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
        ),
        "extra": json_values,
    },
)
messages = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b'{"id": "d", "config": ' + b"[" * n + b"]" * n + b"}"),
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=messages)
def test_fuzz_config_set_with_a_key(tmp_path: Path, raw: bytes) -> None:
    """With a public key set (the recommended setting): every random message is refused, in words."""
    key_dir = tmp_path / "k"
    key_dir.mkdir(exist_ok=True)
    _, pub = keyfile(key_dir)
    rc, host, cfg = setup(tmp_path, f", public_key_file: {pub}")
    before = cfg.read_bytes()
    state = asyncio.run(deliver(rc, host, raw))
    assert state["ok"] is False and isinstance(state["error"], str) and state["error"], state
    assert cfg.read_bytes() == before and host.applied == []


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=messages)
def test_fuzz_config_set_without_a_key(tmp_path: Path, raw: bytes) -> None:
    """Without a key the loader sees the random config texts too: an outcome on config/state, never an
    exception, and the file is either unchanged or exactly what was pushed."""
    rc, host, cfg = setup(tmp_path)
    before = cfg.read_bytes()
    state = asyncio.run(deliver(rc, host, raw))
    assert isinstance(state["ok"], bool)
    if state["ok"] is False:
        assert isinstance(state["error"], str) and state["error"]
        assert cfg.read_bytes() == before
    json.dumps(state)  # publishable
    for leftover in ("new", "probation"):
        assert not os.path.exists(f"{cfg}.{leftover}")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"id": "s", "config": "\\ud800"}', "not valid Unicode"),  # decodes from JSON, is not UTF-8
        (b"\xff\xfe not even text", "not JSON"),
        (b'{"id": {"nested": [1, 2]}, "config": "x"}', "'id' is required"),
        (b'{"id": "x", "config": "y", "serial": true}', "'serial' must be a positive integer"),
    ],
)
def test_malformed_requests_are_refused_in_words(raw: bytes, reason: str) -> None:
    with pytest.raises(Exception) as info:
        parse_request(raw)
    assert type(info.value).__name__ == "PushRefused" and reason in str(info.value)
