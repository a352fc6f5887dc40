"""Remote upgrade: {p}/upgrade/set -> verify, download, install beside, switch, restart, probation, rollback.

Layout (a *releases root*, `/var/lib/fieldgate/upgrade` under systemd; docs/OPERATIONS.md):

    <root>/releases/<release>/   one virtualenv per release installed remotely
    <root>/current               symlink to releases/<release>; absent: the base install runs
    <root>/probation.json        the release on probation (written before the switch)
    <root>/state.json            the last state, published retained on {p}/upgrade/state at every start
    <root>/accepted.json         the version of the last accepted command (strictly increasing)

A release venv holds only the fieldgate wheel; its dependencies come from the *base* install (the .deb's
venv, where the launcher runs) through a .pth file, so a release is a few hundred kB and installs offline.
The launcher (`python -m agent.control.upgrade launch ROOT -- run ...`, the unit's ExecStart=) runs from the base:
it counts the starts of a release on probation and switches back to the previous one when the release
cannot even start (MAX_STARTS) or its probation deadline passed, then execs `<root>/current/bin/fieldgate`
(or the base's own when there is no current release). Inside the daemon, a release on probation is kept
once the upstream is connected and a device polled (or none is configured); otherwise, at the deadline,
it switches back itself and exits so the supervisor (systemd's Restart=) starts the previous release.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import sysconfig
import time
import urllib.parse
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.config.models import FieldgateConfig
from agent.control.remoteconfig import PushRefused, canonical_json, verify_signature, write_atomic

log = logging.getLogger("fieldgate.upgrade")

ROOT_ENV = "FIELDGATE_RELEASES"  # set by the launcher: the releases root; unset: remote upgrade is off
BASE_ENV = "FIELDGATE_BASE_SITE"  # set by the launcher: the base install's site-packages
MAX_PACKAGE_BYTES = 50_000_000  # a fieldgate wheel is ~300 kB
MAX_MESSAGE_BYTES = 16_384
MAX_STARTS = 3  # starts of a release on probation before the launcher gives up on it
RESTART_SLACK_MS = 30_000  # the probation deadline counts from the switch: room for the restart itself
DOWNLOAD_TIMEOUT = 60.0
PUBLISH_RETRY = 1.0
_RELEASE = re.compile(r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = {"id", "gateway", "version", "release", "url", "sha256", "signature"}


class UpgradeHost(Protocol):
    config: FieldgateConfig

    def upstream_connected(self) -> bool: ...

    def polled_since(self, ts_ms: int) -> bool: ...

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...

    def request_stop(self) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the releases root ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable, ignored: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, sort_keys=True).encode())


def current_release(root: Path) -> str | None:
    """The release `current` points at, or None: the base install runs."""
    try:
        return os.readlink(root / "current").rsplit("/", 1)[-1]
    except OSError:
        return None


def switch(root: Path, release: str | None) -> None:
    """Point `current` at releases/<release> (None: back to the base) in one rename."""
    link = root / "current"
    if release is None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    else:
        tmp = root / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"releases/{release}", tmp)
        os.replace(tmp, link)
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _state_doc(
    request_id: Any, ok: bool, phase: str, error: str | None = None, **extra: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": request_id, "ok": ok, "phase": phase}
    if error is not None:
        doc["error"] = error
    doc.update(extra)
    doc.setdefault("release", __version__)
    doc["ts"] = now_ms()
    return doc


def rollback(root: Path, marker: dict[str, Any], reason: str) -> dict[str, Any]:
    """Switch back to the release before the one on probation; record why (state.json). Sync: the launcher
    runs it too."""
    previous = marker.get("previous")
    switch(root, previous if isinstance(previous, str) else None)
    doc = _state_doc(
        marker.get("id"),
        False,
        "rolled_back",
        f"release {marker.get('release')} rolled back: {reason}",
        rolled_back=True,
        release=previous or "base",
        rejected=marker.get("release"),
    )
    _write_json(root / "state.json", doc)
    with contextlib.suppress(FileNotFoundError):
        (root / "probation.json").unlink()
    return doc


# --- the launcher ---------------------------------------------------------------------------------------


def launch(root: Path, argv: Sequence[str]) -> int:
    """ExecStart= of a gateway upgradable remotely: roll back a release that cannot start, then exec."""
    root.mkdir(parents=True, exist_ok=True)
    marker = _read_json(root / "probation.json")
    if marker is not None and marker.get("release") != current_release(root):
        # Stopped between the marker and the switch: the new release never ran; nothing to roll back.
        (root / "probation.json").unlink()
        doc = _state_doc(marker.get("id"), False, "refused", "stopped before the switch: not installed")
        _write_json(root / "state.json", dict(doc, release=current_release(root) or "base"))
    elif marker is not None:
        starts = int(marker.get("starts", 0))
        if starts >= MAX_STARTS:
            print(
                f"fieldgate launcher: release {marker.get('release')} did not stay up: rolling back",
                file=sys.stderr,
            )
            rollback(root, marker, f"it stopped {starts} times during its probation")
        elif now_ms() > int(marker.get("deadline_ts", 0)):
            rollback(root, marker, "its probation ended without the upstream reached")
        else:
            marker["starts"] = starts + 1
            _write_json(root / "probation.json", marker)
    release = current_release(root)
    binary = root / "current" / "bin" / "fieldgate" if release else Path(sys.prefix) / "bin" / "fieldgate"
    env = dict(os.environ)
    env[ROOT_ENV] = str(root)
    env[BASE_ENV] = sysconfig.get_paths()["purelib"]
    os.execve(binary, [str(binary), *argv], env)
    return 127  # not reached


# --- the command ----------------------------------------------------------------------------------------


def parse_command(raw: bytes, gateway_id: str, last_version: int, key_file: Path | None) -> dict[str, Any]:
    """Check the envelope: JSON shape, signature, gateway binding, strictly increasing version."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise PushRefused(f"message of {len(raw)} bytes refused (at most {MAX_MESSAGE_BYTES})")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise PushRefused(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PushRefused("expected a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise PushRefused(f"unknown keys {', '.join(unknown)} (expected {', '.join(sorted(_KEYS))})")
    request_id = doc.get("id")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool) or request_id == "":
        raise PushRefused("'id' is required (a string or an integer)")
    if key_file is None:
        raise PushRefused(
            "remote upgrade needs remote_config.public_key_file: unsigned code is never installed"
        )
    signature = doc.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise PushRefused("'signature' must be a base64 string")
    # The signed bytes: the canonical JSON of every other key (gateway and version included).
    verify_signature(key_file, canonical_json({k: v for k, v in doc.items() if k != "signature"}), signature)
    if doc.get("gateway") != gateway_id:
        raise PushRefused(f"command for gateway {doc.get('gateway')!r}, this is {gateway_id!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PushRefused(
            "'version' is required: an integer, strictly increasing from one command to the next"
        )
    if version <= last_version:
        raise PushRefused(
            f"version {version} refused: not above the last accepted ({last_version}); a replay?"
        )
    release = doc.get("release")
    if not isinstance(release, str) or not _RELEASE.match(release):
        raise PushRefused("'release' is required: the version of the package, e.g. \"0.2.0\"")
    url = doc.get("url")
    parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PushRefused("'url' is required: an http(s) URL of the release's wheel")
    if not parsed.path.endswith(".whl"):
        raise PushRefused(
            "'url' must name a wheel (.whl): a .deb needs root to install, which the daemon does not have "
            "(upgrade a .deb with apt)"
        )
    sha = doc.get("sha256")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise PushRefused("'sha256' is required: 64 lowercase hex digits")
    return doc


def download(url: str, sha256: str, dest: Path, max_bytes: int = MAX_PACKAGE_BYTES) -> None:
    """Fetch `url` into `dest`: at most `max_bytes`, its SHA-256 checked before it is kept."""
    import urllib.request  # here, not at the top: http.client and email cost the polling daemon ~1 MiB (issue 24)

    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as out:
            while chunk := response.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise PushRefused(f"download larger than {max_bytes} bytes: stopped")
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PushRefused(f"download failed: {exc}") from None
    except PushRefused:
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise PushRefused(f"sha256 mismatch: got {digest.hexdigest()}")
    os.replace(tmp, dest)


def install_release(root: Path, release: str, wheel: Path, base_site: str) -> None:
    """releases/<release>: a venv holding the wheel, on top of the base install's dependencies."""
    import shutil  # here, not at the top: it brings bz2 and lzma, which the polling daemon never uses

    target = root / "releases" / release
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)

    def run(*cmd: str | Path) -> None:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise PushRefused(f"install failed: {' '.join(map(str, cmd[:3]))}: {done.stderr.strip()[-500:]}")

    try:
        run(base, "-m", "venv", "--without-pip", target)
        purelib = subprocess.run(
            [
                str(target / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        Path(purelib, "fieldgate-base.pth").write_text(base_site + "\n")
        run(
            target / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--no-compile",
            wheel,
        )
        done = subprocess.run(
            [str(target / "bin" / "fieldgate"), "--version"], capture_output=True, text=True, timeout=60
        )
        if done.stdout.strip() != f"fieldgate {release}":
            raise PushRefused(
                f"the package says {done.stdout.strip() or done.stderr.strip()!r}, not release {release}"
            )
    except (PushRefused, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise PushRefused(str(exc)) from None


def prune(root: Path, keep: set[str | None]) -> None:
    """Remove releases other than `keep` (the running one and the one to fall back on)."""
    import shutil  # see install_release

    with contextlib.suppress(FileNotFoundError):
        for entry in (root / "releases").iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)


# --- in the daemon --------------------------------------------------------------------------------------


class Upgrader:
    """Handles {p}/upgrade/set; publishes {p}/upgrade/state; runs a release's probation."""

    def __init__(self, host: UpgradeHost) -> None:
        self.host = host
        env = os.environ.get(ROOT_ENV)
        self.root = Path(env) if env else None
        self.base_site = os.environ.get(BASE_ENV, "")
        self.state: dict[str, Any] | None = None
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.root is not None and self.host.config.remote_config.enabled

    def topic(self, leaf: str) -> str:
        cfg = self.host.config
        return f"{cfg.upstream.mqtt.topic_prefix}/{cfg.gateway.id}/upgrade/{leaf}"

    def set_state(self, doc: dict[str, Any]) -> None:
        self.state = doc
        if self.root is not None:
            try:
                _write_json(self.root / "state.json", doc)
            except OSError as exc:
                log.error("cannot write %s: %s", self.root / "state.json", exc)
        self._dirty.set()

    async def publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            doc = self.state
            while doc is not None:
                if await self.host.publish(self.topic("state"), doc, retain=True):
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUBLISH_RETRY):
                        await self._dirty.wait()
                if self._dirty.is_set():
                    self._dirty.clear()
                    doc = self.state

    def start(self) -> None:
        """At daemon start: republish the last state (a rollback by the launcher says why); resume a
        probation if this release is on one."""
        assert self.root is not None
        last = _read_json(self.root / "state.json")
        marker = _read_json(self.root / "probation.json")
        if marker is not None and marker.get("release") == __version__:
            self.set_state(_state_doc(marker.get("id"), True, "probation", previous=marker.get("previous")))
            self.host.spawn(self._probation(marker), name="upgrade-probation")
        elif last is not None:
            self.set_state(dict(last, release=__version__))  # what runs is this process's to say
        else:
            self.set_state(_state_doc(None, True, "running"))

    async def _probation(self, marker: dict[str, Any]) -> None:
        assert self.root is not None
        started = now_ms()
        deadline = int(marker.get("deadline_ts", 0))
        while not (self.host.upstream_connected() and self.host.polled_since(started)):
            if now_ms() >= deadline:
                doc = await asyncio.to_thread(
                    rollback,
                    self.root,
                    marker,
                    "upstream not reached or no device polled within the probation",
                )
                log.error("%s; restarting into the previous release", doc["error"])
                self.set_state(doc)
                await self._flush_state()
                self.host.request_stop()
                return
            await asyncio.sleep(0.2)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "probation.json").unlink()
        previous = marker.get("previous")
        await asyncio.to_thread(prune, self.root, {__version__, previous})
        log.info("release %s confirmed: the upstream is reached and devices poll", __version__)
        self.set_state(_state_doc(marker.get("id"), True, "confirmed", previous=previous))

    async def _flush_state(self) -> None:
        """Publish the state now (before a restart), for at most a few seconds."""
        doc = self.state
        if doc is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.host.publish(self.topic("state"), doc, retain=True)

    async def handle(self, raw: bytes) -> dict[str, Any] | None:
        """Subscription handler: the work runs in the runtime's task group."""
        self.host.spawn(self._process(raw), name="upgrade")
        return None

    async def _process(self, raw: bytes) -> None:
        async with self._lock:
            request_id: Any = None
            with contextlib.suppress(ValueError, AttributeError):
                request_id = json.loads(raw).get("id")
            try:
                await self._upgrade(raw)
            except PushRefused as exc:
                log.error("upgrade %s refused: %s", request_id, exc)
                self.set_state(_state_doc(request_id, False, "refused", str(exc)))
            except OSError as exc:  # the releases root: full disk, permissions
                log.error("upgrade %s failed, the running release stays: %s", request_id, exc)
                self.set_state(
                    _state_doc(request_id, False, "refused", f"{exc.strerror or exc}: {exc.filename}")
                )

    async def _upgrade(self, raw: bytes) -> None:
        if self.root is None:
            raise PushRefused(
                "remote upgrade is off: the daemon was not started by the launcher (docs/OPERATIONS.md)"
            )
        root = self.root
        accepted = _read_json(root / "accepted.json") or {}
        settings = self.host.config.remote_config
        doc = parse_command(
            raw, self.host.config.gateway.id, int(accepted.get("version", 0)), settings.public_key_file
        )
        try:
            _write_json(root / "accepted.json", {"version": doc["version"], "id": doc["id"]})
        except OSError as exc:
            raise PushRefused(f"cannot write {root / 'accepted.json'}: {exc}") from None
        release: str = doc["release"]
        if release == __version__:
            self.set_state(_state_doc(doc["id"], True, "running"))
            return
        if (root / "probation.json").exists():
            raise PushRefused("another release is on probation")
        self.set_state(_state_doc(doc["id"], True, "downloading", target=release))
        (root / "downloads").mkdir(parents=True, exist_ok=True)
        name = urllib.parse.urlsplit(doc["url"]).path.rsplit("/", 1)[-1]
        wheel = root / "downloads" / name
        try:
            await asyncio.to_thread(download, doc["url"], doc["sha256"], wheel)
            self.set_state(_state_doc(doc["id"], True, "installing", target=release))
            await asyncio.to_thread(install_release, root, release, wheel, self.base_site)
        finally:
            wheel.unlink(missing_ok=True)
        previous = current_release(root)
        marker = {
            "id": doc["id"],
            "release": release,
            "previous": previous,
            "deadline_ts": now_ms() + int(settings.rollback_after * 1000) + RESTART_SLACK_MS,
            "starts": 0,
        }
        # The marker first: a crash from here on rolls back at the next start.
        _write_json(root / "probation.json", marker)
        switch(root, release)
        log.warning("upgrade %s: switched to release %s, restarting", doc["id"], release)
        self.set_state(_state_doc(doc["id"], True, "restarting", target=release))
        await self._flush_state()
        self.host.request_stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "launch":
        rest = args[2:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return launch(Path(args[1]), rest)
    print("usage: python -m agent.control.upgrade launch ROOT -- run -c CONFIG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
