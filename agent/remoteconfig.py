"""Remote configuration: {p}/config/set -> verify, validate, write, apply, probation, rollback; {p}/config/state.

The platform publishes `{"id", "config": YAML text | JSON object, "signature"?}`. The gateway checks the
signature (Ed25519, when `remote_config.public_key_file` is set), validates the text with the same loader
as a local file (written to `fieldgate.yaml.new` beside the current one, so errors carry positions and
profiles resolve the same way), refuses any change to a local secret, writes it atomically (the file it
replaces is kept as `fieldgate.yaml.previous`) and applies it without a restart. The new config is then on
probation: if the upstream is not connected with it within `rollback_after`, the previous file comes back
by itself. A marker file (`fieldgate.yaml.probation`) carries the probation across a restart, so a crash
during probation cannot leave a gateway stuck on a config that never reached the platform.

Every outcome goes to `{p}/config/state`, retained: `{"id", "ok", "error"?, "hash", "version",
"applied_ts", "rolled_back"?}` where hash/version/applied_ts are those of the config running afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import validate
from agent.config import FieldgateConfig
from agent.errors import ConfigError
from agent.reading import now_ms
from agent.validate import file_hash

log = logging.getLogger("fieldgate.remoteconfig")

MAX_CONFIG_BYTES = 1_000_000  # a config of a thousand devices is ~200 kB
PUBLISH_RETRY = 1.0  # seconds between attempts to publish the state while offline


def canonical_json(obj: Any) -> bytes:
    """The bytes of a config pushed as a JSON object: what is signed, written and hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Refused(Exception):
    """A pushed config refused before anything changed; the message says why."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class ConfigHost(Protocol):
    """What the runtime gives remote configuration."""

    config: FieldgateConfig
    config_path: Path
    config_hash: str
    config_applied_ts: int

    async def apply_config(self, new: FieldgateConfig, data: bytes, source: str) -> list[str]:
        """Apply a validated config whose file holds `data`; records hash/version; raises on failure."""
        ...

    def upstream_connected(self) -> bool: ...

    def upstream_error(self) -> str | None: ...

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    data: bytes
    signature: str | None


# --- what a remote config may not change ----------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, path) if isinstance(value, dict) and value else {path: value})
    return out


def _protected(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last.endswith("_file") or path.split(".", 1)[0] == "remote_config" or path == "storage.path"


def forbidden_changes(old: FieldgateConfig, new: FieldgateConfig) -> list[str]:
    """Keys a remote config changed but may not: secrets' files, remote_config itself, storage.path."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return sorted(p for p in set(a) | set(b) if _protected(p) and a.get(p) != b.get(p))


# --- signature ------------------------------------------------------------------------------------------


def verify_signature(public_key_file: Path, data: bytes, signature: str | None) -> None:
    """Raise Refused unless `signature` (base64) is the Ed25519 signature of `data` by the key in the file."""
    if not signature:
        raise Refused(f"unsigned config refused: remote_config.public_key_file ({public_key_file}) is set")
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("signature is not valid base64") from None
    try:
        # Imported only here: `cryptography` is needed only by gateways that check signatures.
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key
    except ImportError:
        raise Refused(
            "cannot check signatures: install fieldgate[remote] (the cryptography package)"
        ) from None
    try:
        raw = public_key_file.read_bytes()
    except OSError as exc:
        raise Refused(f"public_key_file {public_key_file}: cannot read: {exc.strerror or exc}") from None
    try:
        key: Any = load_ssh_public_key(raw) if raw.startswith(b"ssh-ed25519") else load_pem_public_key(raw)
    except ValueError:
        raise Refused(f"public_key_file {public_key_file}: not a PEM or OpenSSH public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise Refused(f"public_key_file {public_key_file}: not an Ed25519 key")
    try:
        key.verify(sig, data)
    except InvalidSignature:
        raise Refused(f"bad signature: the config was not signed by the key in {public_key_file}") from None


# --- files ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a power cut leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class RemoteConfig:
    """Handles {p}/config/set for one runtime; publishes {p}/config/state."""

    def __init__(self, host: ConfigHost) -> None:
        self.host = host
        self.state: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()

    # paths beside the config file
    def _path(self, suffix: str) -> Path:
        p = self.host.config_path
        return p.with_name(f"{p.name}.{suffix}")

    @property
    def previous_path(self) -> Path:
        return self._path("previous")

    @property
    def probation_path(self) -> Path:
        return self._path("probation")

    def topic(self, leaf: str) -> str:
        cfg = self.host.config
        return f"{cfg.upstream.mqtt.topic_prefix}/{cfg.gateway.id}/config/{leaf}"

    # -- state -------------------------------------------------------------------------------------------

    def _doc(self, request_id: Any, ok: bool, error: str | None = None, **extra: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": request_id, "ok": ok}
        if error is not None:
            doc["error"] = error
        doc.update(
            hash=self.host.config_hash,
            version=self.host.config.version,
            applied_ts=self.host.config_applied_ts,
        )
        doc.update(extra)
        return doc

    def set_state(self, doc: dict[str, Any]) -> None:
        self.state = doc
        self.last_error = doc.get("error")
        self._dirty.set()

    def running_changed(self) -> None:
        """The running config changed by another path (a local reload): say so on config/state."""
        self.set_state(self._doc(None, True, source="file"))

    async def publish_loop(self) -> None:
        """Publish the latest state (retained) as soon as the upstream takes it; newer states replace older."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            doc = self.state
            while doc is not None and self.host.config.remote_config.enabled:
                if await self.host.publish(self.topic("state"), doc, retain=True):
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUBLISH_RETRY):
                        await self._dirty.wait()
                if self._dirty.is_set():
                    self._dirty.clear()
                    doc = self.state

    def start(self) -> None:
        """At daemon start: publish the running config's state; resume a probation a restart interrupted."""
        self.set_state(self._doc(None, True, source="start"))
        try:
            marker = json.loads(self.probation_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("probation marker %s unreadable, ignored: %s", self.probation_path, exc)
            return
        if marker.get("hash") != self.host.config_hash:
            self._clear_probation()  # the file was replaced locally since: a technician's config is not ours
            return
        log.warning(
            "remote config %s was on probation at the last stop: probation starts again", marker.get("id")
        )
        self._start_probation(marker.get("id"))

    # -- the subscription --------------------------------------------------------------------------------

    async def handle(self, raw: bytes) -> dict[str, Any] | None:
        """Subscription handler: parse, then process in the runtime's task group (an apply may restart the
        uplink whose task runs this handler). The state is published by publish_loop."""
        try:
            request = parse_request(raw)
        except Refused as exc:
            log.error("remote config refused: %s", exc)
            self.set_state(self._doc(_id_of(raw), False, str(exc)))
            return None
        self.host.spawn(self._process(request), name=f"remote-config:{request.id}")
        return None

    async def _process(self, request: Request) -> None:
        async with self._lock:
            try:
                new = await self._validate(request)
            except Refused as exc:
                log.error("remote config %s refused, nothing changed: %s", request.id, exc)
                for line in exc.problems:
                    log.error("  %s", line)
                extra = {"problems": exc.problems} if exc.problems else {}
                self.set_state(self._doc(request.id, False, str(exc), **extra))
                return
            if file_hash(request.data) == self.host.config_hash:
                log.info("remote config %s is the running config: nothing to do", request.id)
                self.set_state(self._doc(request.id, True))
                return
            await self._install(request, new)

    async def _validate(self, request: Request) -> FieldgateConfig:
        settings = self.host.config.remote_config
        if settings.public_key_file is not None:
            verify_signature(settings.public_key_file, request.data, request.signature)
        elif request.signature:
            log.warning(
                "remote config %s: signature not checked (no remote_config.public_key_file)", request.id
            )
        staged = self._path("new")
        try:
            write_atomic(staged, request.data)
        except OSError as exc:
            raise Refused(
                f"cannot write {staged}: {exc.strerror or exc} (the config directory must be writable by "
                "the daemon for remote configuration)"
            ) from None
        try:
            new = await validate.load(staged)
        except ConfigError as exc:
            problems = [line.replace(str(staged), "config", 1) for line in exc.problems]
            with contextlib.suppress(OSError):
                staged.unlink()
            raise Refused(f"invalid configuration ({len(problems)} problems)", problems) from None
        forbidden = forbidden_changes(self.host.config, new)
        if forbidden:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise Refused(
                "a remote config may not change " + ", ".join(forbidden) + ": secrets, their files, "
                "remote_config and storage.path stay local (change them on the gateway)"
            )
        return new

    async def _install(self, request: Request, new: FieldgateConfig) -> None:
        path, staged = self.host.config_path, self._path("new")
        try:
            write_atomic(self.previous_path, path.read_bytes())
            marker = {"id": request.id, "hash": file_hash(request.data), "ts": now_ms()}
            write_atomic(self.probation_path, json.dumps(marker).encode())
            os.replace(staged, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            self._clear_probation()
            self.set_state(self._doc(request.id, False, f"not written: {exc.strerror or exc}"))
            log.error("remote config %s not written: %s", request.id, exc)
            return
        try:
            changes = await self.host.apply_config(new, request.data, source="remote")
        except Exception as exc:  # the new config could not start: back at once
            log.error("remote config %s failed to apply: %s", request.id, exc)
            await self._rollback(request.id, f"failed to apply: {exc}")
            return
        log.info("remote config %s applied: %s", request.id, "; ".join(changes) or "no change")
        await self._probation_run(request.id)  # under the lock: the next push waits for the verdict

    # -- probation and rollback --------------------------------------------------------------------------

    def _start_probation(self, request_id: Any) -> None:
        async def resume() -> None:
            async with self._lock:
                await self._probation_run(request_id)

        self.host.spawn(resume(), name="remote-config-probation")

    async def _probation_run(self, request_id: Any) -> None:
        deadline = time.monotonic() + self.host.config.remote_config.rollback_after
        while not self.host.upstream_connected():
            if time.monotonic() >= deadline:
                why = self.host.upstream_error() or "not connected"
                after = self.host.config.remote_config.rollback_after
                await self._rollback(
                    request_id, f"upstream not reached within {after:g}s with the new config ({why})"
                )
                return
            await asyncio.sleep(0.2)
        self._clear_probation()
        log.info("remote config %s confirmed: upstream connected", request_id)
        self.set_state(self._doc(request_id, True))

    async def _rollback(self, request_id: Any, reason: str) -> None:
        path = self.host.config_path
        try:
            previous = self.previous_path.read_bytes()
            with contextlib.suppress(OSError):
                write_atomic(self._path("rejected"), path.read_bytes())
            write_atomic(path, previous)
            old = await validate.load(path)
            await self.host.apply_config(old, previous, source="rollback")
        except Exception as exc:  # OSError, ConfigError, a failing apply: say it, keep what runs
            log.error("remote config %s: ROLLBACK FAILED, the new config keeps running: %s", request_id, exc)
            self.set_state(self._doc(request_id, False, f"{reason}; rollback failed: {exc}"))
            return
        finally:
            self._clear_probation()
        log.error("remote config %s rolled back to the previous configuration: %s", request_id, reason)
        self.set_state(self._doc(request_id, False, f"{reason}; rolled back", rolled_back=True))

    def _clear_probation(self) -> None:
        with contextlib.suppress(OSError):
            self.probation_path.unlink()


def _id_of(raw: bytes) -> Any:
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(raw).get("id")
    return None


def parse_request(raw: bytes) -> Request:
    if len(raw) > MAX_CONFIG_BYTES:
        raise Refused(f"message of {len(raw)} bytes refused (at most {MAX_CONFIG_BYTES})")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise Refused(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Refused('expected a JSON object {"id": ..., "config": ..., "signature": ...}')
    unknown = sorted(set(doc) - {"id", "config", "signature"})
    if unknown:
        raise Refused(f"unknown keys {', '.join(unknown)} (expected id, config, signature)")
    request_id = doc.get("id")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool) or request_id == "":
        raise Refused("'id' is required (a string or an integer)")
    config = doc.get("config")
    if isinstance(config, str):
        data = config.encode()
    elif isinstance(config, dict):
        data = canonical_json(config)
    else:
        raise Refused("'config' is required: the YAML text of the config file, or a JSON object")
    signature = doc.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise Refused("'signature' must be a base64 string")
    return Request(request_id, data, signature)
