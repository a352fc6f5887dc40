"""A new configuration for the running daemon: SIGHUP's re-read of the file, and the record every applied
config leaves (its file's hash, when and how it came: docs/CONFIG_LIFECYCLE.md).

A file that does not validate, or whose secrets cannot be used, changes nothing: the refusal is logged and
kept in `reload_error` (the health document, `fieldgate reload`). A valid one is applied by the runtime
(`Runtime.apply` executes the plan of agent/config/diff.py: only what changed is stopped and started again);
remote configuration and its rollback (agent/control/remoteconfig.py) come through `apply_config` too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.config import validate
from agent.config.diff import describe
from agent.errors import ConfigError
from agent.pipeline.reading import now_ms
from agent.safefiles import file_hash, read_regular

if TYPE_CHECKING:
    from agent.config.models import FieldgateConfig
    from agent.control.remoteconfig import RemoteConfig
    from agent.sdnotify import Notifier

log = logging.getLogger("fieldgate.runtime")


class Reloadable(Protocol):
    """What a reload reads of the running daemon (agent/runtime.py), and the record it keeps there."""

    config: FieldgateConfig
    config_path: Path
    remote: RemoteConfig
    notifier: Notifier
    config_hash: str  # sha256 of the running config's file
    config_applied_ts: int
    config_source: str  # "file", "remote" or "rollback"
    reload_error: str | None  # why the last reload was refused; None once one succeeded
    reloads: int  # finished reload attempts: `fieldgate reload` waits for this to move
    reload_ts: int | None

    async def apply(self, new: FieldgateConfig) -> list[str]:
        """Apply a validated config without a restart; raises, having changed nothing, on an unusable secret."""
        ...

    def summary(self) -> str: ...


async def reload_from_file(rt: Reloadable) -> bool:
    """SIGHUP: read and validate the config file again (in a child, agent/config/validate.py) and apply it;
    False when it was refused. systemd sees RELOADING=1 until the outcome is known."""
    rt.notifier.reloading()
    try:
        ok = await _reload(rt)
    finally:
        # Counted when the outcome is known: `fieldgate reload` reads `reload_error` and the hash as soon as
        # this moves, and the validation (a child process) and the apply both take time.
        rt.reloads += 1
        rt.reload_ts = now_ms()
    rt.notifier.ready(status=rt.summary())
    return ok


async def _reload(rt: Reloadable) -> bool:
    try:
        data = read_regular(rt.config_path)
        new = await validate.load(rt.config_path)
    except (ConfigError, OSError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [f"{rt.config_path}: {exc}"]
        rt.reload_error = "; ".join(problems)
        log.error("reload refused, the running configuration is unchanged:")
        for line in problems:
            log.error("  %s", line)
        return False
    try:
        changes = await apply_config(rt, new, data, source="file")
    except Exception as exc:  # a secret or certificate that cannot be used: nothing was changed
        rt.reload_error = f"reload refused: {exc}"
        log.error("reload refused, the running configuration is unchanged: %s", exc)
        return False
    rt.reload_error = None
    log.info("reloaded %s: %s", rt.config_path, "; ".join(changes) or "no change")
    if rt.config.remote_config.enabled:
        rt.remote.running_changed()
    return True


async def apply_config(rt: Reloadable, new: FieldgateConfig, data: bytes, source: str) -> list[str]:
    """Apply a validated config whose file holds `data` (reload, remote config, rollback), log what it
    changed and record it as the running one; returns the changes in words. Raises, having changed nothing,
    when a secret of the new config cannot be used."""
    old = rt.config
    changes = await rt.apply(new)
    for line in describe(old, rt.config):
        log.info("config change: %s", line)
    rt.config_hash = file_hash(data)
    rt.config_applied_ts = now_ms()
    rt.config_source = source
    return changes
