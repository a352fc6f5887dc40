"""Config format versions: which versions this fieldgate reads, and the migrations N -> N+1 (text-level).

A migration is a pure function from the text of a version-N file to the text of a version-N+1 file. It
works on lines, not on a re-dumped YAML tree, so the technician's comments, ordering and quoting survive
(PyYAML cannot round-trip comments). A step registered as `None` means the format only grew: a version-N
file reads unchanged as N+1. A step with a function means the meaning changed: the loader refuses the old
file and `fieldgate migrate` converts it, printing the diff. Never a silent reinterpretation.

Version 0 is synthetic: an imagined pre-release layout where the MQTT settings sat at the top level
(`mqtt:` instead of `upstream: {mqtt: ...}`). It exists so the mechanism has a real case and a test.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import FieldgateError

CURRENT_VERSION = 1

Migration = Callable[[str], str]


def _v0_to_v1(text: str) -> str:
    """Version 0 -> 1: the top-level `mqtt:` block moves under `upstream:` (indented by two spaces)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    inside = False
    for line in lines:
        top_level = bool(line.strip()) and not line[0].isspace() and not line.lstrip().startswith("#")
        if top_level:
            inside = False
        if top_level and re.match(r"mqtt\s*:", line):
            out.append("upstream:\n")
            out.append("  " + line)
            inside = True
            continue
        if inside and line.strip():
            out.append("  " + line)
        else:
            out.append(line)
    return _set_version("".join(out), 1)


# version N -> the step to N + 1
MIGRATIONS: dict[int, Migration | None] = {
    0: _v0_to_v1,
}


def version_problem(version: int) -> str | None:
    """Why a file of this format version cannot be read as it is; None when it can."""
    if version > CURRENT_VERSION:
        return (
            f"this config is for fieldgate config version {version}; this fieldgate reads up to "
            f"{CURRENT_VERSION}: upgrade fieldgate"
        )
    if version < min(MIGRATIONS, default=CURRENT_VERSION):
        return f"config version {version} is older than any this fieldgate knows (oldest: {min(MIGRATIONS)})"
    if any(MIGRATIONS.get(v) is not None for v in range(version, CURRENT_VERSION)):
        return (
            f"this config is for fieldgate config version {version}; this fieldgate reads version "
            f"{CURRENT_VERSION}: convert it with `fieldgate migrate -c FILE` (it prints every change; "
            "--write saves it)"
        )
    return None


class MigrationError(FieldgateError):
    """The file cannot be migrated (unreadable version, a future version); the message says why."""


@dataclass(frozen=True, slots=True)
class Migrated:
    old_version: int
    new_version: int
    text: str
    steps: list[int]  # the versions migrated from, in order


def file_version(text: str) -> int:
    """The `version:` of a config text (1 when absent, as the loader reads it)."""
    import yaml  # here: the daemon imports this module (CURRENT_VERSION) but never parses YAML

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MigrationError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MigrationError("the config file must be a mapping (gateway, upstream, ...)")
    version = data.get("version", CURRENT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise MigrationError(f"version: {version!r} is not a config format version (0, 1, ...)")
    return version


def migrate_text(text: str) -> Migrated:
    """Bring a config text to CURRENT_VERSION; the text is unchanged when it already is."""
    version = file_version(text)
    if version > CURRENT_VERSION:
        problem = version_problem(version)
        raise MigrationError(problem or f"version {version} is not readable")
    if version < CURRENT_VERSION and version not in MIGRATIONS:
        raise MigrationError(f"no migration from config version {version}")
    steps: list[int] = []
    for v in range(version, CURRENT_VERSION):
        step = MIGRATIONS.get(v)
        text = step(text) if step is not None else _set_version(text, v + 1)
        steps.append(v)
    return Migrated(version, CURRENT_VERSION, text, steps)


def _set_version(text: str, version: int) -> str:
    """Rewrite the top-level `version:` line, or add one after the leading comments."""
    pattern = re.compile(r"^version\s*:\s*[^#\n]*?(\s*#.*)?$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda m: f"version: {version}{m.group(1) or ''}", text, count=1)
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        i += 1
    return "".join([*lines[:i], f"version: {version}\n", *lines[i:]])


def unified_diff(old: str, new: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            f"{name} (before)",
            f"{name} (after)",
        )
    )
