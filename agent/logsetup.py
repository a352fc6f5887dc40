"""Logging for journald and terminals, and the reporter that keeps a dead device from flooding the log.

Under systemd (`$JOURNAL_STREAM` names our stderr), each line is `<N>LEVEL logger: message`: journald
adds the timestamp, and the `<N>` syslog-priority prefix lets it keep the level (`journalctl -p warning`).
Elsewhere each line starts with an ISO 8601 UTC timestamp. One event is one line; a traceback's
continuation lines are indented and carry the same priority so they stay with their event.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

# Libraries whose own messages repeat what our errors already say (every timeout, every reconnect);
# they are held at WARNING unless the operator asks for DEBUG.
LIBRARY_LOGGERS = ("pymodbus", "bleak", "aiomqtt", "paho", "asyncio")
# pymodbus logs every timeout as ERROR with a frame dump; the bus reports the same failure in words.
QUIET_LEVEL = {"pymodbus": logging.CRITICAL}

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0 emerg .. 7 debug) of a logging level, rounding custom levels down."""
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _SYSLOG_PRIORITY[threshold]
    return 7


def journal_attached(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `stream` is the journal: `$JOURNAL_STREAM` holds `DEV:INODE` of that very file."""
    value = environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # Cannot compare (pytest's capture, an odd stream): trust the variable, as most daemons do.
        return True
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """`<N>LEVEL logger: message`, no timestamp; every line of the event carries `<N>`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        lines = f"{record.levelname} {record.name}: {_body(self, record)}".split("\n")
        return "\n".join([prefix + lines[0], *(f"{prefix}  {line}" for line in lines[1:])])


class TerminalFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.123Z LEVEL logger: message`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        lines = f"{record.levelname} {record.name}: {_body(self, record)}".split("\n")
        return "\n".join([f"{stamp}.{millis:03d}Z {lines[0]}", *(f"  {line}" for line in lines[1:])])


def _body(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text = f"{text}\n{formatter.formatException(record.exc_info)}"
    if record.stack_info:
        text = f"{text}\n{formatter.formatStack(record.stack_info)}"
    return text.rstrip("\n")


def setup_logging(
    level: str = "INFO",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger once for the process (calling again replaces our handler: reload-safe).

    `level` is a name (DEBUG, INFO, WARNING, ERROR, CRITICAL; any case). Returns the handler installed.
    """
    name = level.strip().upper()
    levelno = logging.getLevelNamesMapping().get(name)
    if levelno is None or name in ("NOTSET", "WARN", "FATAL"):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(out)
    handler.setFormatter(JournalFormatter() if journal_attached(out, env) else TerminalFormatter())
    handler.set_name("fieldgate")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "fieldgate":
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for lib in LIBRARY_LOGGERS:
        logging.getLogger(lib).setLevel(
            logging.DEBUG if levelno <= logging.DEBUG else QUIET_LEVEL.get(lib, logging.WARNING)
        )
    return handler


def format_duration(seconds: float) -> str:
    """A duration for people: `45 s`, `5 min`, `2 h 5 min`, `3 d 4 h`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    minutes = s // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@dataclass(slots=True)
class _Outage:
    since: float
    errors: int
    last_error: str
    window_start: float
    window_errors: int


class ErrorReporter:
    """Turns a stream of per-device failures into few log lines.

    The first failure is logged as it is; while the device keeps failing, one summary per
    `summary_interval` ("meter-1: still failing, 42 errors in 5 min: <last error>"); and one line
    when it recovers ("meter-1: recovered after 5 min, 60 errors"). Keys are free strings: devices,
    and "uplink" or a bus name work the same.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        summary_interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger or logging.getLogger("fieldgate.devices")
        self._interval = summary_interval
        self._clock = clock
        self._outages: dict[str, _Outage] = {}

    def failing(self) -> list[str]:
        return sorted(self._outages)

    def failure(self, device: str, message: str) -> None:
        now = self._clock()
        outage = self._outages.get(device)
        if outage is None:
            self._outages[device] = _Outage(now, 1, message, now, 0)
            self._log.warning("%s: %s", device, message)
            return
        outage.errors += 1
        outage.window_errors += 1
        outage.last_error = message
        if now - outage.window_start < self._interval:
            return
        self._log.warning(
            "%s: still failing, %d errors in %s: %s",
            device,
            outage.window_errors,
            format_duration(now - outage.window_start),
            message,
        )
        outage.window_start = now
        outage.window_errors = 0

    def success(self, device: str) -> None:
        outage = self._outages.pop(device, None)
        if outage is None:
            return
        self._log.info(
            "%s: recovered after %s, %d error%s",
            device,
            format_duration(self._clock() - outage.since),
            outage.errors,
            "s" if outage.errors != 1 else "",
        )

    def forget(self, device: str) -> None:
        """Drop a device's state without a log line (removed from the config on reload)."""
        self._outages.pop(device, None)
