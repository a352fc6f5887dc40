"""Reading files that a configuration names, and writing the daemon's own files with private modes.

Reading (`read_regular`): every file the loader reads — the config, its profiles — and every secret file is a
*regular* file of at most `MAX_FILE_BYTES`, opened without blocking (`O_NONBLOCK`: a FIFO nobody writes to
does not stall the open) and checked with `fstat` on the descriptor it reads (no race with a rename): a FIFO,
a device (`/dev/zero`), a socket or a directory is refused at once, and a read never goes past the bound.
Errors are `OSError`s whose `strerror` says why, never what the file holds.

Writing (`write_private`, `create_private`, `private_dir`): files the daemon creates that may hold a secret or
its data (the buffer and its `-wal`/`-shm`, `commands.db`, the pid file, a config written by a remote push and
its `.previous`, the snapshot cache) are 0600 and its directories 0700, whatever the umask
(docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from agent.errors import FieldgateError

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a config of a thousand devices is about 200 kB
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
SECRET_KEYS = ("password_file", "token_file", "key_file", "bindkey_file")

log = logging.getLogger("fieldgate.files")


def pid_file(buffer: Path) -> Path:
    """Where the daemon keeps its pid while it runs (`fieldgate reload`, `fieldgate buffer purge`): beside its
    buffer, so each config's daemon has its own."""
    return buffer.with_name("fieldgate.pid")


def file_hash(data: bytes) -> str:
    """The digest of a file's bytes, as the running config's hash and the snapshot's key record it."""
    return hashlib.sha256(data).hexdigest()


class NotRegularFile(FieldgateError, OSError):
    """The path exists but is not a regular file (FIFO, device, socket, directory), or is too large."""


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _too_large(limit: int) -> str:
    return (
        f"larger than {limit // 1024} KiB: refused"
        if limit % (1 << 20)
        else f"larger than {limit >> 20} MiB: refused"
    )


def read_regular(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError (`strerror` says why) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(
                errno.EINVAL, f"{kind_of(st.st_mode)}, not a regular file: refused", os.fspath(path)
            )
        if st.st_size > limit:
            raise NotRegularFile(errno.EFBIG, _too_large(limit), os.fspath(path))
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # the file grew since fstat
                raise NotRegularFile(errno.EFBIG, _too_large(limit), os.fspath(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def present(path: str | os.PathLike[str]) -> bool:
    """Whether `path` exists (for a profile lookup): anything that exists counts, so that a FIFO or a device
    named as a profile is refused by `read_regular` with its reason rather than reported as absent."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


# --- writing --------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_private(path: Path, data: bytes, mode: int = PRIVATE_FILE, *, sync: bool = True) -> None:
    """Replace `path` with `data` atomically (fsync, rename, fsync of the directory), with `mode` whatever
    the umask: a power cut leaves the old file or the new one, never half of one. `sync=False` for a file
    that need not survive a power cut (the pid file): no fsync."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def create_private(path: Path, mode: int = PRIVATE_FILE) -> None:
    """Make `path` (created empty if absent) and its SQLite `-wal`/`-shm` companions `mode` (0600): SQLite
    gives the companions the mode of the database file, so the database must be private before it opens.
    Never raises: a file that cannot be made private is left to the open that follows, which says why."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    except OSError as exc:
        log.debug("%s not made private: %s", path, exc)
        return
    try:
        os.fchmod(fd, mode)
    except OSError as exc:  # not ours (a root-owned file opened by a verb): its mode is its owner's
        log.debug("%s not made private: %s", path, exc)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(f"{path}{suffix}", mode)


def private_dir(path: Path) -> None:
    """Create `path` (and its parents) with the last one 0700; an existing directory is left as it is."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)


def _secret_paths(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{prefix}.{key}" if prefix else str(key)
            if key in SECRET_KEYS and isinstance(value, str):
                out.append((where, value))
            else:
                out.extend(_secret_paths(value, where))
    return out


def warn_loose_secrets(config_tree: Any) -> list[str]:
    """Log a WARNING for every token, password or key file readable by group or others; the warnings."""
    from agent.upstream.tls import (
        credential_path,  # the %credentials% form resolves as the daemon resolves it
    )

    warnings = []
    for where, text in _secret_paths(config_tree):
        try:
            mode = os.stat(credential_path(text)).st_mode
        except Exception:  # absent or unresolvable: the runtime reports it when it reads it
            continue
        if mode & 0o044:
            message = (
                f"{where}: {text} is readable by {'group and others' if mode & 0o004 else 'its group'} "
                f"(mode {stat.S_IMODE(mode):04o}): make it 0600 (chmod 600) or use LoadCredential="
            )
            log.warning("%s", message)
            warnings.append(message)
    return warnings
