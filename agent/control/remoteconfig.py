"""Remote configuration: {p}/config/set -> verify, validate, write, apply, probation, rollback; {p}/config/state.

The platform publishes `{"id", "config": YAML text | JSON object, "gateway", "serial", "signature"}`. The
gateway checks that the push is addressed to it (`gateway`) and newer than the last one it accepted
(`serial`, strictly increasing, persisted in `fieldgate.yaml.serial`), then the signature (Ed25519, when
`remote_config.public_key_file` is set) over the envelope that binds the config's digest to both
(`signed_message`): a push signed for another gateway, an old push replayed under a new id, a downgrade are
refused. The old form, signed over the config bytes alone, only with `remote_config.accept_unbound`. It
validates the text with the same loader as a local file (written to `fieldgate.yaml.new` beside the
current one, so errors carry positions), except that a `profile:` is a name looked up in the profile
directories, never a path; refuses any change to a local-only key (secrets' files, remote_config,
storage.path, gateway.id), writes it atomically, 0600 (the file it replaces is kept as
`fieldgate.yaml.previous`) and applies it without a restart. The new config is then on
probation: if the upstream is not connected with it within `rollback_after`, the previous file comes back
by itself. A marker file (`fieldgate.yaml.probation`, fsynced before the new file takes over) says the
config is on probation: a daemon that dies during the probation (crash, kill, watchdog, OOM, power cut)
finds it at its next start and rolls back to the previous file before it runs anything
(`recover_at_start`), then reports it on `config/state`.

A message on `config/set` is outside input: whatever it holds (any bytes, any JSON depth) is refused with a
reason on `config/state`, never an exception in the MQTT session. Problems published upstream quote only the
pushed config itself; a problem in another file (a profile) is published as its position, never its text.

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

from agent.config import validate
from agent.config.models import FieldgateConfig
from agent.errors import ConfigError, FieldgateError
from agent.pipeline.reading import now_ms
from agent.safefiles import file_hash, fsync_dir, read_regular, write_private

log = logging.getLogger("fieldgate.remoteconfig")

MAX_CONFIG_BYTES = 1_000_000  # a config of a thousand devices is ~200 kB
MAX_JSON_DEPTH = 64  # a config pushed as a JSON object is far shallower; deeper is refused, never recursed
MAX_ID_CHARS = 200
ENVELOPE_TYPE = "fieldgate.config.set/2"
PUBLISH_RETRY = 1.0  # seconds between attempts to publish the state while offline


def canonical_json(obj: Any) -> bytes:
    """The bytes of a config pushed as a JSON object: what is signed, written and hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class PushRefused(FieldgateError):
    """A pushed config or upgrade command (agent/control/upgrade.py) refused before anything changed; the
    message says why."""

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
    gateway: str | None = None
    serial: int | None = None

    @property
    def bound(self) -> bool:
        return self.gateway is not None and self.serial is not None


def signed_message(data: bytes, gateway: str, serial: int) -> bytes:
    """What the platform signs for a push: the config's digest bound to one gateway and one serial."""
    doc = {"config_sha256": file_hash(data), "gateway": gateway, "serial": serial, "type": ENVELOPE_TYPE}
    return canonical_json(doc)


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
    return (
        last.endswith("_file")
        or path.split(".", 1)[0] == "remote_config"
        or path in ("storage.path", "gateway.id")
    )


def forbidden_changes(old: FieldgateConfig, new: FieldgateConfig) -> list[str]:
    """Keys a remote config changed but may not: secrets' files, remote_config itself, storage.path, and the
    gateway's id (a config written for another gateway never renames this one)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return sorted(p for p in set(a) | set(b) if _protected(p) and a.get(p) != b.get(p))


# --- signature ------------------------------------------------------------------------------------------


def verify_signature(public_key_file: Path, data: bytes, signature: str | None) -> None:
    """Raise PushRefused unless `signature` (base64) is the Ed25519 signature of `data` by the key in the file."""
    if not signature:
        raise PushRefused(
            f"unsigned config refused: remote_config.public_key_file ({public_key_file}) is set"
        )
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise PushRefused("signature is not valid base64") from None
    try:
        # Imported only here: `cryptography` is needed only by gateways that check signatures.
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key
    except ImportError:
        raise PushRefused(
            "cannot check signatures: install fieldgate[remote] (the cryptography package)"
        ) from None
    try:
        raw = read_regular(public_key_file, 64 << 10)
    except OSError as exc:
        raise PushRefused(f"public_key_file {public_key_file}: cannot read: {exc.strerror or exc}") from None
    try:
        key: Any = load_ssh_public_key(raw) if raw.startswith(b"ssh-ed25519") else load_pem_public_key(raw)
    except ValueError:
        raise PushRefused(f"public_key_file {public_key_file}: not a PEM or OpenSSH public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PushRefused(f"public_key_file {public_key_file}: not an Ed25519 key")
    try:
        key.verify(sig, data)
    except InvalidSignature:
        raise PushRefused(
            f"bad signature: the config was not signed by the key in {public_key_file}"
        ) from None


# --- files ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600 whatever the umask): a power cut leaves the old file or the
    new one, never half of one."""
    write_private(path, data)


def _beside(config_path: Path, suffix: str) -> Path:
    return config_path.with_name(f"{config_path.name}.{suffix}")


def recover_at_start(config_path: Path) -> bool:
    """At daemon start, before the config is read: a probation marker whose config is the file means the
    last daemon died during the probation (crash, kill -9, watchdog, OOM, power cut): put the previous file
    back. What happened is left in `fieldgate.yaml.rolledback` for `RemoteConfig.start` to publish.
    True when it rolled back."""
    marker_path = _beside(config_path, "probation")
    try:
        marker = json.loads(read_regular(marker_path, 64 << 10))
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("probation marker %s unreadable, ignored: %s", marker_path, exc)
        _unlink(marker_path)
        return False
    try:
        current = read_regular(config_path)
    except OSError:
        return False  # the start reports the file
    if marker.get("hash") != file_hash(current):
        _unlink(marker_path)  # the file was replaced locally since: a technician's config is not ours
        return False
    request_id = marker.get("id")
    reason = (
        f"the daemon stopped during the probation of remote config {request_id} (crash, kill, watchdog or "
        "reboot before the upstream confirmed it); rolled back at the next start"
    )
    try:
        previous = read_regular(_beside(config_path, "previous"))
        note = {"id": request_id, "error": reason, "ts": now_ms()}
        write_private(_beside(config_path, "rolledback"), json.dumps(note).encode())
        write_private(_beside(config_path, "rejected"), current)
        write_private(config_path, previous)
    except OSError as exc:
        log.error("remote config %s: ROLLBACK AT START FAILED, starting on it: %s", request_id, exc)
        return False
    _unlink(marker_path)
    log.error("%s", reason)
    return True


def _public_error(exc: BaseException) -> str:
    """An exception as it may go upstream: a config's problems quote files, so they stay in the journal."""
    if isinstance(exc, ConfigError):
        return f"the configuration does not validate ({len(exc.problems)} problems; see the gateway's log)"
    return str(exc)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests at most `limit` deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return True


def public_problem(line: str, staged: Path) -> str:
    """A validation problem as it may be published: a line of the pushed config itself (positioned as
    `config:LINE:COL`) is the platform's own text; a line about any other file (a profile) is reduced to its
    position, so that nothing a gateway's file holds goes upstream."""
    prefix = f"{staged}:"
    if line.startswith(prefix):
        return "config:" + line[len(prefix) :]
    parts = line.split(":", 3)
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return (
            f"{parts[0]}:{parts[1]}:{parts[2]}: a problem in this file (its details are in the gateway's log)"
        )
    return "the config could not be validated (details in the gateway's log)"


class RemoteConfig:
    """Handles {p}/config/set for one runtime; publishes {p}/config/state."""

    def __init__(self, host: ConfigHost) -> None:
        self.host = host
        self.state: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._note_doc: dict[str, Any] | None = None  # a rollback at start, until it is published

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

    @property
    def serial_path(self) -> Path:
        return self._path("serial")

    def last_accepted(self) -> tuple[int, str | None, Any]:
        """(serial, config digest, id) of the last bound push accepted; (0, None, None) before the first."""
        try:
            doc = json.loads(read_regular(self.serial_path, 64 << 10))
            serial = doc["serial"]
            if not isinstance(serial, int) or isinstance(serial, bool):
                raise ValueError("serial is not an integer")
            return serial, doc.get("sha256"), doc.get("id")
        except FileNotFoundError:
            return 0, None, None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            # Never silently back to 0 (that would reopen every old push): refuse until it is repaired.
            raise PushRefused(
                f"{self.serial_path} unreadable ({exc}): the last accepted serial is unknown, pushes are "
                'refused until it is repaired (it holds {"serial": N})'
            ) from None

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
                    if doc is self._note_doc:  # the rollback at start is reported: the note has served
                        _unlink(self._path("rolledback"))
                        self._note_doc = None
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUBLISH_RETRY):
                        await self._dirty.wait()
                if self._dirty.is_set():
                    self._dirty.clear()
                    doc = self.state

    def start(self) -> None:
        """At daemon start: publish the running config's state, or the rollback `recover_at_start` did."""
        try:
            note = json.loads(read_regular(self._path("rolledback"), 64 << 10))
            if not isinstance(note, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            self.set_state(self._doc(None, True, source="start"))
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("rollback note unreadable, ignored: %s", exc)
            _unlink(self._path("rolledback"))
            self.set_state(self._doc(None, True, source="start"))
        else:
            self._note_doc = self._doc(note.get("id"), False, str(note.get("error")), rolled_back=True)
            self.set_state(self._note_doc)
        # A marker left here means this runtime was started without `recover_at_start` (not by `fieldgate
        # run`): its probation starts again.
        try:
            marker = json.loads(read_regular(self.probation_path, 64 << 10))
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
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
        uplink whose task runs this handler). The state is published by publish_loop. Never raises: a
        hostile message is refused, the MQTT session it came on stays up."""
        try:
            request = parse_request(raw)
        except PushRefused as exc:
            log.error("remote config refused: %s", exc)
            self.set_state(self._doc(_id_of(raw), False, str(exc)))
            return None
        except Exception as exc:  # a parser bug must not end the session: refuse, say it
            log.error("remote config refused (unexpected %s)", type(exc).__name__, exc_info=exc)
            self.set_state(self._doc(None, False, f"message not understood ({type(exc).__name__})"))
            return None
        self.host.spawn(self._process(request), name=f"remote-config:{request.id}")
        return None

    async def _process(self, request: Request) -> None:
        async with self._lock:
            try:
                if self._is_redelivery(request):
                    log.info(
                        "remote config %s (serial %s) delivered again: ignored", request.id, request.serial
                    )
                    return
                new = await self._validate(request)
            except PushRefused as exc:
                log.error("remote config %s refused, nothing changed: %s", request.id, exc)
                for line in exc.problems:
                    log.error("  %s", line)
                extra = {"problems": exc.problems} if exc.problems else {}
                self.set_state(self._doc(request.id, False, str(exc), **extra))
                return
            if file_hash(request.data) == self.host.config_hash:
                log.info("remote config %s is the running config: nothing to do", request.id)
                self._accept_serial(request)
                self.set_state(self._doc(request.id, True))
                return
            await self._install(request, new)

    def _is_redelivery(self, request: Request) -> bool:
        """The accepted push itself again (same serial, config and id: a QoS 1 redelivery): nothing to do,
        nothing new to say. The same push under another id is a replay, refused by `_check_binding`."""
        if request.serial is None:
            return False
        serial, digest, request_id = self.last_accepted()
        return (request.serial, file_hash(request.data), request.id) == (serial, digest, request_id)

    def _check_binding(self, request: Request) -> None:
        """Refuse a push addressed to another gateway, or not newer than the last accepted one; when a key is
        set, refuse a signature that does not bind the config to this gateway and that serial."""
        settings = self.host.config.remote_config
        gateway_id = self.host.config.gateway.id
        if request.gateway is not None and request.gateway != gateway_id:
            raise PushRefused(f"addressed to gateway '{request.gateway}', this is '{gateway_id}': refused")
        if request.serial is not None:
            last, _, _ = self.last_accepted()
            if request.serial <= last:
                raise PushRefused(
                    f"serial {request.serial} is not newer than the last accepted ({last}): a replay or a "
                    "downgrade, refused (each push needs a higher serial)"
                )
        if settings.public_key_file is None:
            if request.signature:
                log.warning(
                    "remote config %s: signature not checked (no remote_config.public_key_file)", request.id
                )
            return
        if not request.signature:
            raise PushRefused(
                f"unsigned config refused: remote_config.public_key_file ({settings.public_key_file}) is set"
            )
        if request.gateway is not None and request.serial is not None:
            message = signed_message(request.data, request.gateway, request.serial)
            verify_signature(settings.public_key_file, message, request.signature)
            return
        if not settings.accept_unbound:
            raise PushRefused(
                "unbound push refused: a signed push carries 'gateway' and 'serial' and its signature covers "
                "them (docs/CONFIG_LIFECYCLE.md); remote_config.accept_unbound: true accepts the old form"
            )
        verify_signature(settings.public_key_file, request.data, request.signature)
        log.warning(
            "remote config %s: accepted in the old unbound form (remote_config.accept_unbound): it could be "
            "replayed",
            request.id,
        )

    def _accept_serial(self, request: Request) -> None:
        """Persist the serial of an accepted push before anything else changes (a refusal to write it
        refuses the push: a serial that could be forgotten would reopen replays)."""
        if request.serial is None:
            return
        doc = {"serial": request.serial, "sha256": file_hash(request.data), "id": request.id, "ts": now_ms()}
        try:
            write_private(self.serial_path, json.dumps(doc).encode())
        except OSError as exc:
            raise PushRefused(f"cannot write {self.serial_path}: {exc.strerror or exc}") from None

    async def _validate(self, request: Request) -> FieldgateConfig:
        self._check_binding(request)
        staged = self._path("new")
        try:
            write_atomic(staged, request.data)
        except OSError as exc:
            raise PushRefused(
                f"cannot write {staged}: {exc.strerror or exc} (the config directory must be writable by "
                "the daemon for remote configuration)"
            ) from None
        try:
            new = await validate.load(staged, remote=True)
        except ConfigError as exc:
            for line in exc.problems:  # in full here; upstream, nothing of a file but the pushed config
                log.error("remote config %s: %s", request.id, line)
            problems = [public_problem(line, staged) for line in exc.problems]
            with contextlib.suppress(OSError):
                staged.unlink()
            raise PushRefused(f"invalid configuration ({len(problems)} problems)", problems) from None
        forbidden = forbidden_changes(self.host.config, new)
        if forbidden:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise PushRefused(
                "a remote config may not change " + ", ".join(forbidden) + ": secrets, their files, "
                "remote_config and storage.path stay local (change them on the gateway)"
            )
        return new

    async def _install(self, request: Request, new: FieldgateConfig) -> None:
        path, staged = self.host.config_path, self._path("new")
        try:
            self._accept_serial(request)
        except PushRefused as exc:
            self.set_state(self._doc(request.id, False, str(exc)))
            log.error("remote config %s not written: %s", request.id, exc)
            return
        try:
            write_atomic(self.previous_path, read_regular(path))
            # The marker is on disk (fsynced, renamed) before the new file takes over: a daemon that dies
            # from here on finds it at its next start and rolls back (recover_at_start).
            marker = {"id": request.id, "hash": file_hash(request.data), "ts": now_ms()}
            write_atomic(self.probation_path, json.dumps(marker).encode())
            os.replace(staged, path)
            fsync_dir(path.parent)
        except OSError as exc:
            self._clear_probation()
            self.set_state(self._doc(request.id, False, f"not written: {exc.strerror or exc}"))
            log.error("remote config %s not written: %s", request.id, exc)
            return
        try:
            changes = await self.host.apply_config(new, request.data, source="remote")
        except Exception as exc:  # the new config could not start: back at once
            log.error("remote config %s failed to apply: %s", request.id, exc)
            await self._rollback(request.id, f"failed to apply: {_public_error(exc)}")
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
            previous = read_regular(self.previous_path)
            with contextlib.suppress(OSError):
                write_atomic(self._path("rejected"), read_regular(path))
            write_atomic(path, previous)
            old = await validate.load(path)
            await self.host.apply_config(old, previous, source="rollback")
        except Exception as exc:  # OSError, ConfigError, a failing apply: say it, keep what runs
            log.error("remote config %s: ROLLBACK FAILED, the new config keeps running: %s", request_id, exc)
            self.set_state(self._doc(request_id, False, f"{reason}; rollback failed: {_public_error(exc)}"))
            return
        finally:
            self._clear_probation()
        log.error("remote config %s rolled back to the previous configuration: %s", request_id, reason)
        self.set_state(self._doc(request_id, False, f"{reason}; rolled back", rolled_back=True))

    def _clear_probation(self) -> None:
        with contextlib.suppress(OSError):
            self.probation_path.unlink()


def _id_of(raw: bytes) -> Any:
    """The request's id for the state of a refused message, when one can be found (a short string or an
    integer; nothing else of a refused message is repeated)."""
    with contextlib.suppress(ValueError, AttributeError, RecursionError, TypeError):
        request_id = json.loads(raw).get("id")
        if _valid_id(request_id):
            return request_id
    return None


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return False
    return value != "" and len(str(value)) <= MAX_ID_CHARS


def parse_request(raw: bytes) -> Request:
    """A `config/set` message as a Request; PushRefused (with a reason that quotes nothing of it) otherwise."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise PushRefused(f"message of {len(raw)} bytes refused (at most {MAX_CONFIG_BYTES})")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise PushRefused(
            f"not JSON this gateway takes: nested deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError included; the messages give a position, not the text
        raise PushRefused(
            f"not JSON: {type(exc).__name__} at position {getattr(exc, 'pos', getattr(exc, 'start', 0))}"
        ) from None
    if not _depth_ok(doc):
        raise PushRefused(f"not JSON this gateway takes: nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(doc, dict):
        raise PushRefused('expected a JSON object {"id", "config", "gateway", "serial", "signature"}')
    unknown = sorted(set(doc) - {"id", "config", "signature", "gateway", "serial"})
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise PushRefused(f"unknown keys {shown} (expected id, config, gateway, serial, signature)")
    request_id = doc.get("id")
    if not _valid_id(request_id):
        raise PushRefused(f"'id' is required (a string of 1 to {MAX_ID_CHARS} characters or an integer)")
    config = doc.get("config")
    try:
        if isinstance(config, str):
            data = config.encode()
        elif isinstance(config, dict):
            data = canonical_json(config)
        else:
            raise PushRefused("'config' is required: the YAML text of the config file, or a JSON object")
    except UnicodeEncodeError:  # a lone surrogate (\ud800) decodes from JSON but is not UTF-8
        raise PushRefused("'config' is not valid Unicode text") from None
    signature = doc.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise PushRefused("'signature' must be a base64 string")
    gateway = doc.get("gateway")
    if gateway is not None and (not isinstance(gateway, str) or not gateway):
        raise PushRefused("'gateway' must be the id of the gateway the push is for (a string)")
    serial = doc.get("serial")
    if serial is not None and (
        isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 2**63
    ):
        raise PushRefused("'serial' must be a positive integer, higher at each push")
    return Request(request_id, data, signature, gateway, serial)
