"""Config validation in a short-lived child process, so that the daemon never imports pydantic.

`fieldgate run` selects the plain model kit first thing (agent/config/modelkit.py); its config models are
plain records. To load a file (at start, on reload, for a remote config, for a rollback) it runs
`python -m agent.config.validate FILE`: the child loads the file with the full loader (pydantic, profiles, every
error positioned as FILE:LINE:COL), and writes to its stdout either the validated models as a snapshot or
the list of problems. The daemon rebuilds the snapshot on its plain classes. The child lives about 0.3 s.

A process whose models are pydantic's (the tests, the other verbs) validates in-process instead, through the
same `load()`.

The snapshot travels in the `marshal` format (built in: no module to load in the daemon; it carries dicts,
lists, tuples and scalars only, so models and paths are tagged tuples, see `snapshot`), from the daemon's own
child, through a pipe, to the daemon.

A restart with an unchanged config need not wait for the child. When a cache directory is given
($FIELDGATE_CACHE_DIR, or systemd's $CACHE_DIRECTORY from the unit's CacheDirectory=), the daemon keeps the
snapshot of its last successful validation there, keyed on what the result depends on: the fieldgate and
Python versions, $FIELDGATE_PROFILES, and the contents of every file the loader read or looked for (the
config, each profile candidate in search order, found or absent). A start whose key matches runs on that
snapshot at once, then validates the file for real in a background child a few seconds later: a difference
(code changed under an unchanged version, a file changed in between) is applied as a reload would apply it,
and a file that no longer validates is reported and its snapshot dropped. docs/CONFIG_LIFECYCLE.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import marshal
import os
import sys
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.config import modelkit, plainmodel
from agent.errors import ConfigError
from agent.safefiles import file_hash, private_dir, read_regular

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig

log = logging.getLogger("fieldgate.config")

RESULT_OK, RESULT_PROBLEMS = "ok", "problems"
CACHE_FORMAT = 1
VERIFY_AFTER_S = 3.0  # a start from the snapshot validates the file for real this long after it is up


def snapshot(value: Any) -> Any:
    """Validated (pydantic) models in marshal's types, as `plainmodel.rebuild` takes them: a model is
    ("model", "module:QualName", fields), a path ("path", text), a tuple ("tuple", items); no other tuple
    occurs. A value of any other type is refused here, loudly, rather than arriving changed."""
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, dict) and hasattr(value, "model_dump"):
        cls = type(value)
        name = f"{cls.__module__}:{cls.__qualname__}"
        return (plainmodel.MODEL, name, {field: snapshot(getattr(value, field)) for field in fields})
    if isinstance(value, PurePath):
        return (plainmodel.PATH, str(value))
    if type(value) is dict:
        return {k: snapshot(v) for k, v in value.items()}
    if type(value) is list:
        return [snapshot(v) for v in value]
    if type(value) is tuple:
        return (plainmodel.TUPLE, [snapshot(v) for v in value])
    if value is None or type(value) in (str, int, float, bool):
        return value
    raise TypeError(f"a validated config holds a {type(value).__name__}: the snapshot cannot carry it")


class Child(Protocol):
    """What Pending uses of its child: a subprocess.Popen, or the child forked at start (ForkedChild)."""

    returncode: int | None

    def communicate(self) -> tuple[bytes, bytes]: ...

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


def in_child() -> bool:
    """Whether `load()` validates in a child process: in a process running on plain models."""
    return modelkit.selected() == "plain"


class Pending:
    """A validation under way; `result()` gives the config or raises ConfigError.

    `cached` holds the snapshot file of an earlier validation when the cache's key matched (no child runs
    then), as its bytes, until `verify()` has compared it with the file's validation: the decoded snapshot,
    thousands of small objects, is dropped once the config is built from it, as after a child's answer (kept
    until the check, it left the daemon's heap 5 MiB larger at 10,000 points: docs/PERFORMANCE.md)."""

    def __init__(
        self, path: Path, proc: Child | None, cached: tuple[bytes, Any] | None = None, remote: bool = False
    ) -> None:
        self.path = path
        self.remote = remote
        self.proc = proc
        self.cached: bytes | None = cached[0] if cached is not None else None
        self._snapshot: Any = cached[1] if cached is not None else None  # until the config is built from it
        self.from_cache = False  # whether result() gave the snapshot's config

    async def result(self) -> FieldgateConfig:
        config, _ = await self._result()
        return config

    async def _result(self) -> tuple[FieldgateConfig, Any]:
        """The config and the snapshot it was rebuilt from (None when validated in-process)."""
        if self._snapshot is not None:
            snapshot, self._snapshot = self._snapshot, None
            try:
                config = _config_of(self.path, snapshot)
            except Exception as exc:  # classes or fields changed under the same version: validate for real
                log.warning(
                    "the snapshot of an earlier validation is unusable (%s): validating the file", exc
                )
                self.cached = None
                self.proc = _child(self.path)
            else:
                log.info(
                    "config %s: unchanged since its last validation, started from its snapshot "
                    "(validated again in the background in %gs)",
                    self.path,
                    VERIFY_AFTER_S,
                )
                self.from_cache = True
                return config, snapshot
        if self.proc is None:
            from agent.config.loader import load_config  # this process runs on pydantic: validate here

            return load_config(self.path, remote=self.remote), None
        payload = await self._answer()
        return _config_of(self.path, payload), payload

    async def _answer(self) -> Any:
        """The child's snapshot of the file (kept as the cache's), or ConfigError."""
        import asyncio  # here: the daemon starts the child before its own imports, asyncio's included

        assert self.proc is not None
        try:
            # A thread waits for the child (the loop's default executor, which the daemon has anyway).
            out, err = await asyncio.to_thread(self.proc.communicate)
        except asyncio.CancelledError:
            self.kill()
            raise
        # A Popen keeps the chunks communicate() read (the whole answer: 1.7 MiB at 10,000 points) for a
        # communicate() resumed after a timeout; this one is over, and the Pending of the daemon's start lives
        # as long as the daemon: let them go (tests/unit/test_validate_imports.py checks it).
        vars(self.proc).pop("_fileobj2output", None)
        payload, inputs = _decode(self.path, self.proc.returncode, out, err)
        _save(self.path, payload, inputs)
        return payload

    async def verify(self) -> FieldgateConfig | None:
        """After a start from the snapshot: validate the file for real, in a child at low priority. The
        fresh config when it differs from the snapshot's, else None; ConfigError (and the snapshot dropped)
        when the file does not validate any more."""
        fresh = Pending(self.path, _child(self.path, background=True))
        try:
            payload = await fresh._answer()  # renews the snapshot
            # Models are rebuilt only for a config that changed: a second copy of a large config's models,
            # built and dropped at once, left the daemon's heap larger for good (docs/PERFORMANCE.md).
            same = self.cached is not None and payload == _snapshot_in(self.cached)
            return None if same else _config_of(self.path, payload)
        except ConfigError:
            forget(self.path)
            raise
        finally:
            self.cached = None  # the snapshot is not kept in memory beyond this, whatever the outcome

    def kill(self) -> None:
        """Stop the child if it still runs (a stop during start-up, a cancelled reload)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def _child(path: Path, background: bool = False, remote: bool = False) -> Child:
    import subprocess  # the daemon's, for its child; the child itself has no use of it

    flags = [*(["--background"] if background else []), *(["--remote"] if remote else [])]
    return subprocess.Popen(
        [sys.executable, "-m", "agent.config.validate", *flags, str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# Standard modules both the daemon (asyncio, paho, its config models) and its validating child (pydantic, the
# loader) import, loaded before the fork: about 45 ms of CPU paid once instead of twice (what counts under a
# CPU quota). tests/unit/test_validate_imports.py checks that both processes import each of them anyway.
SHARED_MODULES = (
    "base64",
    "calendar",
    "datetime",
    "difflib",
    "email.message",
    "email.utils",
    "platform",
    "random",
    "selectors",
    "socket",
    "tempfile",
    "uuid",
    "zoneinfo",
)


class ForkedChild:
    """The validating child of the daemon's start, forked rather than started (`spawn(fork=True)`): it begins
    with the interpreter and the modules this process has already loaded, where `python -m
    agent.config.validate` would load them again (tens of ms of CPU on the start's critical path:
    docs/PERFORMANCE.md). It runs the same `main()`, answers on the same two pipes, and is waited for the same way.
    Only forked from a process with one thread (a fork copies no other thread, and a lock another held stays
    held in the copy): at the daemon's start, before its event loop; reloads start `_child()`s."""

    def __init__(self, path: Path) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):  # what is buffered here is written once, by this process
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        if pid == 0:  # pragma: no cover - the child (tests/unit/test_validate_imports.py runs it)
            os.close(out_r)
            os.close(err_r)
            _forked_main(path, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self.returncode: int | None = None
        self._fds = (out_r, err_r)

    def communicate(self) -> tuple[bytes, bytes]:
        """Both pipes to their end, then the exit status (as Popen.communicate: blocking, in a thread)."""
        import selectors

        chunks: dict[int, list[bytes]] = {fd: [] for fd in self._fds}
        with selectors.DefaultSelector() as sel:
            for fd in self._fds:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                for key, _ in sel.select():
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)
        self._wait(0)
        out, err = (b"".join(chunks[fd]) for fd in self._fds)
        return out, err

    def poll(self) -> int | None:
        return self._wait(os.WNOHANG)

    def _wait(self, flags: int) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):  # reaped already (never by another waiter here)
                pid, status = os.waitpid(self.pid, flags)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        import signal

        os.kill(self.pid, signal.SIGKILL)


def _forked_main(path: Path, out_w: int, err_w: int) -> None:  # pragma: no cover - runs in the forked child
    """The forked child: stdin from /dev/null, stdout and stderr on the pipes, the default signal actions
    (the daemon's start-up handlers are its own), pydantic models; `main()`, then exit without the parent's
    atexit handlers."""
    code = 1
    try:
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (null, out_w, err_w):
            os.close(fd)
        modelkit.select_in_forked_child("pydantic")
        code = main([str(path)])
    except BaseException:
        import traceback

        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def spawn(path: Path, use_snapshot: bool = False, remote: bool = False, fork: bool = False) -> Pending:
    """Start validating `path`: in a child when this process runs on plain models, else in-process on
    `result()`. With `use_snapshot` (the daemon's start), an unchanged file's last snapshot is taken instead
    of a child. Synchronous, so that `fieldgate run` starts the child before its own imports. `fork`: the
    child is forked from this process (ForkedChild) if it has one thread only, else started."""
    if not in_child():
        return Pending(path, None, remote=remote)
    if use_snapshot:
        cached = _cached(path)
        if cached is not None:
            return Pending(path, None, cached)
    # Not forked once this process has built config models (a start that rolled a remote config back first,
    # agent/control/remoteconfig.py): the copy would be bound to the daemon's kit, so a child is started.
    if fork and not remote and _one_thread() and not modelkit.models_built():
        for name in SHARED_MODULES:  # loaded once, before the fork, rather than once in each process
            importlib.import_module(name)
        try:
            return Pending(path, ForkedChild(path))
        except OSError as exc:  # no fork now (EAGAIN, ENOMEM): a child started the usual way
            log.warning("config validation: could not fork (%s), starting a validator", exc)
    return Pending(path, _child(path, remote=remote), remote=remote)


def _one_thread() -> bool:
    import threading

    return hasattr(os, "fork") and threading.active_count() == 1


async def load(path: Path, remote: bool = False) -> FieldgateConfig:
    """The validated config of `path`; ConfigError with every problem, positioned. `remote`: a config that
    came over the network (its profiles are names only, looked up in the profile directories)."""
    return await spawn(path, remote=remote).result()


def _decode(path: Path, returncode: int | None, out: bytes, err: bytes) -> tuple[Any, Any]:
    """The child's answer: (the config's snapshot, the inputs it depends on), or ConfigError."""
    try:
        kind, payload, inputs = marshal.loads(out)
    except Exception:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            [f"{path}: the config could not be validated (validator exited {returncode}: {last[0]})"]
        ) from None
    for line in err.decode("utf-8", "replace").splitlines():  # what the loader said besides its result
        if line.strip():
            log.warning("config validation: %s", line)
    if kind == RESULT_PROBLEMS:
        raise ConfigError([str(p) for p in payload])
    return payload, inputs


def _config_of(path: Path, payload: Any) -> FieldgateConfig:
    from agent.config.models import FieldgateConfig

    config = plainmodel.rebuild(payload)
    if not isinstance(config, FieldgateConfig):
        raise ConfigError([f"{path}: the validator sent {type(config).__name__}, not a configuration"])
    return config


# --- the snapshot of the last validation ----------------------------------------------------------------


def cache_file(path: Path) -> Path | None:
    """Where the snapshot of `path`'s last validation is kept; None (no snapshot) without a cache directory."""
    base = os.environ.get("FIELDGATE_CACHE_DIR") or os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if not base:
        return None
    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    return Path(base) / f"config-{name}.snapshot"


def _digest(path: str) -> str | None:
    """A file's content digest, as the loader records it; None for a file that does not exist."""
    try:
        return file_hash(read_regular(path))
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable now: never equal to what was read then
        return f"unreadable: {exc.errno}"


def _key(inputs: list[tuple[str, str | None]]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "fieldgate": __version__,
        "python": sys.version,
        "profiles_env": os.environ.get("FIELDGATE_PROFILES", ""),
        "inputs": inputs,
    }


def _snapshot_in(data: bytes) -> Any:
    return marshal.loads(data)["snapshot"]


def _cached(path: Path) -> tuple[bytes, Any] | None:
    """The snapshot file of `path`'s last validation (its bytes, and the snapshot decoded) if nothing it
    depends on has changed since, else None."""
    file = cache_file(path)
    if file is None:
        return None
    try:
        data = file.read_bytes()
        entry = marshal.loads(data)
        inputs = [(name, _digest(name)) for name, _ in entry["key"]["inputs"]]
        if entry["key"] != _key(inputs):
            return None
        return data, entry["snapshot"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged file is a cache miss, never a failed start
        log.warning("config snapshot %s unreadable, ignored: %s", file, exc)
        return None


def _save(path: Path, payload: Any, inputs: Any) -> None:
    """Keep the snapshot of a successful validation (written whole, readable by the daemon's user only)."""
    file = cache_file(path)
    if file is None or not inputs:
        return
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        private_dir(file.parent)  # 0700: the snapshots may hold a password
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the config may hold a password
        with os.fdopen(fd, "wb") as f:
            f.write(marshal.dumps({"key": _key([tuple(i) for i in inputs]), "snapshot": payload}))
        os.replace(tmp, file)
    except OSError as exc:  # a read-only or full cache directory costs the next start its head start, no more
        log.warning("config snapshot not kept in %s: %s", file.parent, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def forget(path: Path) -> None:
    file = cache_file(path)
    if file is not None:
        with contextlib.suppress(OSError):
            file.unlink()


def main(argv: list[str] | None = None) -> int:
    """The child: validate one file, write the result to stdout (marshal), exit 0 (problems are a result)."""
    import gc

    gc.disable()  # a short life spent importing and building models: no collection (the input is <= 1 MiB)
    # pydantic looks for plugins (every installed distribution's entry points) when it builds its first
    # validator: about 10 ms of the child's CPU, for plugins that have no business seeing a config.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    modelkit.select("pydantic")  # the child validates: the full models, whatever imported this module
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--background"]:  # a check of a running config: leave the CPU to the daemon's work
        args = args[1:]
        with contextlib.suppress(OSError):
            os.nice(10)
    remote = args[:1] == ["--remote"]  # a config that came over the network
    if remote:
        args = args[1:]
    if len(args) != 1:
        print("usage: python -m agent.config.validate [--background] [--remote] CONFIG", file=sys.stderr)
        return 2
    from agent.config import loader

    try:
        loaded = loader.load(Path(args[0]), remote=remote, only_named_drivers=True)
        config = snapshot(loaded.config)
        inputs = loaded.consulted
        result: tuple[str, Any, Any] = (RESULT_OK, config, inputs)
    except ConfigError as exc:
        result = (RESULT_PROBLEMS, list(exc.problems), None)
    sys.stdout.buffer.write(marshal.dumps(result))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
