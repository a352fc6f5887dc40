"""`fieldgate run`: the daemon in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import signal
import sys
from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config.validate import Pending
    from agent.runtime import Runtime


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)


def setup_logging(level: str) -> None:
    from agent.logsetup import setup_logging as journald_logging

    journald_logging(level)


async def serve(config_path: str, pending: Pending | None = None) -> int:
    import asyncio
    from pathlib import Path

    # The loop takes the signals over first thing: a stop or a reload asked while the config loads is
    # remembered, not lost, and never kills the process half-way.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    runtime = None

    def reload() -> None:
        if runtime is not None:
            runtime.request_reload()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)

    from agent.config import validate

    if pending is None:
        recover_probation(Path(config_path))
        pending = validate.spawn(Path(config_path), use_snapshot=True)
    # While the child validates the file (agent/config/validate.py), this process imports what it will run.
    from agent.runtime import Runtime

    prefetch(Path(config_path))
    resume_gc()
    config = await pending.result()
    if stop.is_set():
        return 0
    runtime = Runtime(config, Path(config_path))

    async def stop_when_asked() -> None:
        await stop.wait()
        runtime.request_stop()

    watcher = asyncio.create_task(stop_when_asked())
    checker = asyncio.create_task(verify_snapshot(runtime, pending)) if pending.from_cache else None
    try:
        await runtime.run()
    finally:
        watcher.cancel()
        if checker is not None:
            checker.cancel()
            await asyncio.gather(checker, return_exceptions=True)
    return 0


async def verify_snapshot(runtime: Runtime, pending: Pending) -> None:
    """The daemon started from the snapshot of an earlier validation (agent/config/validate.py): once it is up,
    validate the file for real and put right whatever differs."""
    import asyncio
    import logging

    from agent.config.validate import VERIFY_AFTER_S
    from agent.safefiles import read_regular

    log = logging.getLogger("fieldgate.config")
    await runtime.ready.wait()
    await asyncio.sleep(VERIFY_AFTER_S)
    applied_ts = runtime.config_applied_ts
    try:
        data = read_regular(runtime.config_path)
        fresh = await pending.verify()
    except (ConfigError, OSError) as exc:
        settle_after_verify(runtime)
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        runtime.reload_error = "; ".join(problems)
        log.error("%s no longer validates; the daemon keeps its running configuration:", runtime.config_path)
        for line in problems:
            log.error("  %s", line)
        return
    settle_after_verify(runtime)
    if fresh is None:
        log.info("config %s: validated again, same as its snapshot", runtime.config_path)
        return
    if runtime.config_applied_ts != applied_ts:  # a reload or a remote config came meanwhile: it is newer
        log.info("config %s: replaced while it was checked; the check is moot", runtime.config_path)
        return
    if runtime.stopping:  # nothing to restart now; the next start runs on the renewed snapshot
        return
    log.warning(
        "config %s: the snapshot it started from was out of date; applying the file", runtime.config_path
    )
    try:
        changes = await runtime.apply_config(fresh, data, source="file")
    except Exception as exc:  # a secret that cannot be used, as a reload would refuse it: nothing was changed
        runtime.reload_error = f"reload refused: {exc}"
        log.error(
            "config %s not applied, the running configuration is unchanged: %s", runtime.config_path, exc
        )
        return
    log.info("config %s applied: %s", runtime.config_path, "; ".join(changes) or "no change")
    if runtime.config.remote_config.enabled:
        runtime.remote.running_changed()


def settle_after_verify(runtime: Runtime) -> None:
    """The snapshot the daemon started from, and the child's answer compared with it, are let go: give their
    memory back as the first large commit did (agent/pipeline/memory.py), when the store writer found the
    config large enough for that (5.4 MiB at 10,000 points: docs/PERFORMANCE.md)."""
    from agent.pipeline import memory

    if runtime.writer is not None and runtime.writer.settled:
        memory.settle()


def prefetch(config_path: Path) -> None:
    """Import what the daemon will need for this file while its validation runs in the child: the uplink
    (aiomqtt) and the drivers the text names (`driver: NAME`, or a Modbus bus type). A guess, from the text
    without its comments: a driver missed is imported when its device starts, as without this."""
    import contextlib
    import re

    from agent import registry
    from agent.safefiles import read_regular
    from agent.upstream import mqtt as _  # noqa: F401 - imported for its cost, now

    try:
        text = "\n".join(line.split("#", 1)[0] for line in read_regular(config_path).decode().splitlines())
    except (OSError, UnicodeError):
        return
    for name in registry.DRIVERS:
        wanted = rf"\bdriver:\s*['\"]?{re.escape(name)}\b" if name != "modbus" else r"\btype:\s*['\"]?modbus-"
        if re.search(wanted, text):
            with contextlib.suppress(Exception):  # a broken install is reported when the device starts
                registry.driver_class(name)


def recover_probation(config_path: Path) -> None:
    """A remote config still on probation at start means the last daemon died before the upstream confirmed
    it: roll back to the previous file now (agent/control/remoteconfig.py). The usual start pays one stat."""
    import os

    if os.path.lexists(f"{config_path}.probation"):
        from agent.control.remoteconfig import recover_at_start

        recover_at_start(config_path)


# The cyclic garbage collector is paused from the start of `fieldgate run` until its modules are imported
# (`resume_gc`, while a cold start waits for its validating child, which runs without it): imports allocate
# much and free little, and each automatic collection during them scans every object allocated so far for
# nothing (docs/PERFORMANCE.md). Reference counting frees everything else as usual meanwhile. Resumed before
# the runtime starts: kept paused longer, the start's garbage spreads over pages the heap keeps (+0.2 MiB).
# What the imports built (modules, classes, functions: ~28,000 objects) lives as long as the daemon, so it is
# frozen (`gc.freeze()`, moved out of the collector's generations) rather than collected: a collection of it
# cost 22-28 ms of CPU on the start's critical path, more right after the fork of the validating child (each
# object's header written, each page copied), and every later full collection scanned it again (6-10 ms,
# 0.06 ms frozen). The few hundred cyclic leftovers of the imports stay: +0.1 MiB at most (docs/PERFORMANCE.md).


def pause_gc_for_start_up() -> None:
    gc.disable()


def resume_gc() -> None:
    """The start's objects frozen (never scanned again), then the collector on as usual."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _stop_during_startup(signum: int, frame: object) -> None:
    raise SystemExit(0)  # nothing polled or stored yet: a stop now is a clean stop


def take_signals_for_start_up() -> None:
    """Until the event loop takes the signals over: SIGTERM stops cleanly, and a SIGHUP (`systemctl reload`
    during start-up) must not kill the daemon, as its default action would."""
    signal.signal(signal.SIGTERM, _stop_during_startup)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.config import validate

    # agent.cli took the signals over before anything slow (take_signals_for_start_up), and selected the
    # plain model kit before any config model was imported: the daemon never imports pydantic.
    setup_logging(args.log_level)  # 2 ms; what the snapshot lookup says is then logged as the rest
    # The child that validates the file starts first: its work (about 0.3 s, mostly importing pydantic)
    # overlaps this process's own start-up. An unchanged file whose snapshot is kept needs no child now.
    recover_probation(Path(args.config))  # before the file is read: a config still on probation goes back
    # Forked, not started: the child begins with the interpreter and modules this process has loaded.
    pending = validate.spawn(Path(args.config), use_snapshot=True, fork=True)
    try:
        import asyncio

        faulthandler.enable()  # a watchdog kill (SIGABRT) prints every thread's traceback to the journal
        return asyncio.run(serve(str(args.config), pending))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    finally:
        pending.kill()
