"""Config validation in a short-lived child process, so that the daemon never imports pydantic.

`fieldgate run` calls `agent.plainmodel.use()` first thing; from then on its config models are plain
records (agent.modelkit). To load a file (at start, on reload, for a remote config, for a rollback) it runs
`python -m agent.validate FILE`: the child loads the file with the full loader (pydantic, profiles, every
error positioned as FILE:LINE:COL), and writes to its stdout either the validated models as a snapshot or
the list of problems. The daemon rebuilds the snapshot on its plain classes. The child lives about 0.3 s.

A process whose models are pydantic's (the tests, the other verbs) validates in-process instead, through the
same `load()`.

The snapshot travels in the `marshal` format (built in: no module to load in the daemon; it carries dicts,
lists, tuples and scalars only, so models and paths are tagged tuples, see `snapshot`), from the daemon's own
child, through a pipe, to the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import subprocess
import sys
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from agent import plainmodel
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config import FieldgateConfig

log = logging.getLogger("fieldgate.config")

RESULT_OK, RESULT_PROBLEMS = "ok", "problems"


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


def in_child() -> bool:
    """Whether `load()` validates in a child process: in a process running on plain models."""
    return plainmodel.requested


class Pending:
    """A validation under way; `result()` gives the config or raises ConfigError."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes] | None) -> None:
        self.path = path
        self.proc = proc

    async def result(self) -> FieldgateConfig:
        import asyncio  # here: the daemon starts the child before its own imports, asyncio's included

        if self.proc is None:
            from agent.loader import load_config

            return load_config(self.path)
        try:
            # A thread waits for the child (the loop's default executor, which the daemon has anyway).
            out, err = await asyncio.to_thread(self.proc.communicate)
        except asyncio.CancelledError:
            self.kill()
            raise
        return _decode(self.path, self.proc.returncode, out, err)

    def kill(self) -> None:
        """Stop the child if it still runs (a stop during start-up, a cancelled reload)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def spawn(path: Path) -> Pending:
    """Start validating `path`: in a child when this process runs on plain models, else in-process on
    `result()`. Synchronous, so that `fieldgate run` starts the child before its own imports."""
    if not in_child():
        return Pending(path, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.validate", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return Pending(path, proc)


async def load(path: Path) -> FieldgateConfig:
    """The validated config of `path`; ConfigError with every problem, positioned."""
    return await spawn(path).result()


def _decode(path: Path, returncode: int | None, out: bytes, err: bytes) -> FieldgateConfig:
    from agent.config import FieldgateConfig

    try:
        kind, payload = marshal.loads(out)
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
    config = plainmodel.rebuild(payload)
    if not isinstance(config, FieldgateConfig):
        raise ConfigError([f"{path}: the validator sent {type(config).__name__}, not a configuration"])
    return config


def main(argv: list[str] | None = None) -> int:
    """The child: validate one file, write the result to stdout (marshal), exit 0 (problems are a result)."""
    from agent.loader import load_config

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agent.validate CONFIG", file=sys.stderr)
        return 2
    try:
        result: tuple[str, Any] = (RESULT_OK, snapshot(load_config(Path(args[0]))))
    except ConfigError as exc:
        result = (RESULT_PROBLEMS, list(exc.problems))
    sys.stdout.buffer.write(marshal.dumps(result))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
