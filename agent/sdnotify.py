"""sd_notify(3) from the standard library: READY/STATUS/WATCHDOG/STOPPING to systemd, a no-op outside it."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes | None:
    """`$NOTIFY_SOCKET` as a socket address: a path, or `@name` for the abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other forms are not used on a gateway


class Notifier:
    """Sends notifications to the service manager; every method is silently a no-op without one.

    A failed send is logged once and never raised: losing a notification must not take down
    the daemon (systemd's watchdog will notice on its own if they keep failing).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._env = env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines (`notify(READY=1, STATUS="polling 4 devices")`); True if sent."""
        if self.address is None or not fields:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self._env.get("NOTIFY_SOCKET"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        # STATUS is one line by protocol; a newline would start a new (bogus) field.
        return self.notify(STATUS=" ".join(text.split()))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        return self.notify(RELOADING=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog_interval(self) -> float | None:
        """The watchdog period in seconds systemd expects pings within, or None when none is armed for us.

        `WATCHDOG_PID`, when set, must be our pid: a child that inherited the variables must not ping.
        """
        usec = self._env.get("WATCHDOG_USEC", "")
        pid = self._env.get("WATCHDOG_PID", "")
        if not usec:
            return None
        if pid and pid != str(os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 1_000_000 if value > 0 else None


_default: Notifier | None = None


def default() -> Notifier:
    """The process-wide notifier, built from the environment on first use."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def notify(**fields: str | int) -> bool:
    return default().notify(**fields)


def ready(status: str | None = None) -> bool:
    return default().ready(status)


def status(text: str) -> bool:
    return default().status(text)


def watchdog() -> bool:
    return default().watchdog()


def reloading() -> bool:
    return default().reloading()


def stopping() -> bool:
    return default().stopping()


def watchdog_interval() -> float | None:
    return default().watchdog_interval()
