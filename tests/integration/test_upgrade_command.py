"""The remote upgrade command's envelope and download, without a daemon (agent/control/upgrade.py)."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.control.remoteconfig import PushRefused, canonical_json
from agent.control.upgrade import download, launch, parse_command, switch

KEY = Ed25519PrivateKey.generate()


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    path = tmp_path / "platform.pub"
    path.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def signed(key: Ed25519PrivateKey = KEY, **over: Any) -> bytes:
    doc: dict[str, Any] = {
        "id": "u1",
        "gateway": "gw-1",
        "version": 5,
        "release": "0.2.0",
        "url": "https://platform.example/fieldgate-0.2.0-py3-none-any.whl",
        "sha256": "a" * 64,
    }
    doc.update(over)
    doc["signature"] = base64.b64encode(key.sign(canonical_json(doc))).decode()
    return json.dumps(doc).encode()


def test_a_good_command_passes(pub: Path) -> None:
    assert parse_command(signed(), "gw-1", 4, pub)["release"] == "0.2.0"


@pytest.mark.parametrize(
    ("raw", "last", "error"),
    [
        (signed(version=4), 4, "not above the last accepted"),
        (signed(version=3), 4, "not above the last accepted"),
        (signed(gateway="gw-2"), 0, "for gateway 'gw-2'"),
        (signed(Ed25519PrivateKey.generate()), 0, "bad signature"),
        (signed(url="https://platform.example/fieldgate_0.2.0_arm64.deb"), 0, "needs root"),
        (signed(url="file:///tmp/x.whl"), 0, "http(s) URL"),
        (signed(sha256="A" * 64), 0, "64 lowercase hex"),
        (signed(version="5"), 0, "'version' is required"),
        (signed(extra=1), 0, "unknown keys extra"),
        (b"[]", 0, "JSON object"),
    ],
)
def test_refused(pub: Path, raw: bytes, last: int, error: str) -> None:
    with pytest.raises(PushRefused, match=None) as info:
        parse_command(raw, "gw-1", last, pub)
    assert error in str(info.value)


def test_tampered_after_signing_is_refused(pub: Path) -> None:
    doc = json.loads(signed())
    doc["url"] = "https://evil.example/fieldgate-0.2.0-py3-none-any.whl"
    with pytest.raises(PushRefused, match="bad signature"):
        parse_command(json.dumps(doc).encode(), "gw-1", 0, pub)


def test_unsigned_or_without_a_key_is_refused(pub: Path) -> None:
    doc = json.loads(signed())
    del doc["signature"]
    with pytest.raises(PushRefused, match="unsigned"):
        parse_command(json.dumps(doc).encode(), "gw-1", 0, pub)
    with pytest.raises(PushRefused, match="public_key_file"):
        parse_command(signed(), "gw-1", 0, None)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "pkg.whl").write_bytes(b"x" * 100_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined, assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/pkg.whl"
    finally:
        server.shutdown()
        server.server_close()


def test_download_checks_hash_and_size(tmp_path: Path, served: str) -> None:
    good = hashlib.sha256(b"x" * 100_000).hexdigest()
    dest = tmp_path / "got.whl"
    download(served, good, dest)
    assert dest.read_bytes() == b"x" * 100_000
    dest.unlink()
    with pytest.raises(PushRefused, match="sha256 mismatch"):
        download(served, "0" * 64, dest)
    with pytest.raises(PushRefused, match="larger than 50000 bytes"):
        download(served, good, dest, max_bytes=50_000)
    with pytest.raises(PushRefused, match="download failed"):
        download(served.replace("pkg.whl", "missing.whl"), good, dest)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_launcher_drops_a_marker_written_before_a_switch_that_never_happened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "releases" / "1.0").mkdir(parents=True)
    switch(tmp_path, "1.0")
    marker = {"id": "u9", "release": "2.0", "previous": "1.0", "deadline_ts": 2**50, "starts": 0}
    (tmp_path / "probation.json").write_text(json.dumps(marker))
    execs: list[Any] = []
    monkeypatch.setattr("os.execve", lambda *a: execs.append(a))
    launch(tmp_path, ["run"])
    assert not (tmp_path / "probation.json").exists()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["id"] == "u9" and state["phase"] == "refused" and state["release"] == "1.0"
    assert execs[0][0] == tmp_path / "current" / "bin" / "fieldgate"


def test_launcher_rolls_back_a_probation_whose_deadline_passed_across_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut during probation: at the next start the deadline has passed, so the previous release
    runs, whatever the new one would have done."""
    for release in ("1.0", "2.0"):
        (tmp_path / "releases" / release).mkdir(parents=True)
    switch(tmp_path, "2.0")
    marker = {"id": "u7", "release": "2.0", "previous": "1.0", "deadline_ts": 1, "starts": 1}
    (tmp_path / "probation.json").write_text(json.dumps(marker))
    monkeypatch.setattr("os.execve", lambda *a: None)
    launch(tmp_path, ["run"])
    assert os.readlink(tmp_path / "current") == "releases/1.0"
    assert not (tmp_path / "probation.json").exists()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["phase"] == "rolled_back" and state["rejected"] == "2.0" and state["release"] == "1.0"
    assert "probation ended" in state["error"]


def test_launcher_counts_starts_then_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "releases" / "2.0").mkdir(parents=True)
    switch(tmp_path, "2.0")
    marker = {"id": "u8", "release": "2.0", "previous": None, "deadline_ts": 2**50, "starts": 0}
    (tmp_path / "probation.json").write_text(json.dumps(marker))
    execs: list[Any] = []
    monkeypatch.setattr("os.execve", lambda *a: execs.append(a[0]))
    for n in range(1, 4):
        launch(tmp_path, ["run"])
        assert json.loads((tmp_path / "probation.json").read_text())["starts"] == n
    launch(tmp_path, ["run"])  # the fourth start: back to the base install (no previous release)
    assert not (tmp_path / "current").exists() and not (tmp_path / "probation.json").exists()
    assert execs[:3] == [tmp_path / "current" / "bin" / "fieldgate"] * 3
    assert execs[3] != tmp_path / "current" / "bin" / "fieldgate"
    assert json.loads((tmp_path / "state.json").read_text())["rolled_back"] is True
