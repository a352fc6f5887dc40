"""Per-device line counters (frames ok, bad checksums, garbage) and their rate-limited log summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass


@dataclass(slots=True)
class ScanStats:
    """What a codec's frame scanner threw away while looking for a frame (pure, shared by the codecs)."""

    garbage_bytes: int = 0
    bad_checksum: int = 0
    last_problem: str | None = None


class LineCounters:
    """Counts what a serial line delivered; logs a summary of the bad news at most once per `log_every`.

    A noisy line can produce hundreds of bad frames a minute: one log line per
    frame would drown the journal, so problems are summed and reported as a
    delta once per period. `as_dict()` is what the driver exposes as `counters`.
    """

    def __init__(
        self,
        device: str,
        names: tuple[str, ...],
        logger: logging.Logger,
        log_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.values: dict[str, int] = dict.fromkeys(names, 0)
        self._logger = logger
        self._log_every = log_every
        self._clock = clock
        self._logged: dict[str, int] = dict.fromkeys(names, 0)
        self._last_log = clock()
        self.last_problem: str | None = None

    def add(self, name: str, n: int = 1, problem: str | None = None) -> None:
        """Count `n` events; `problem` (words) is kept as the latest for the health summary."""
        if n <= 0:
            return
        self.values[name] = self.values.get(name, 0) + n
        if problem is not None:
            self.last_problem = problem
        self.maybe_log()

    def problems_since_log(self) -> dict[str, int]:
        return {
            k: v - self._logged.get(k, 0)
            for k, v in self.values.items()
            if k not in ("frames_ok", "readings") and v - self._logged.get(k, 0) > 0
        }

    def maybe_log(self) -> None:
        """Log one summary line if a period has passed and something went wrong during it."""
        now = self._clock()
        if now - self._last_log < self._log_every:
            return
        delta = self.problems_since_log()
        self._last_log = now
        if not delta:
            return
        self._logged = dict(self.values)
        parts = ", ".join(f"{k}={v}" for k, v in sorted(delta.items()))
        self._logger.warning(
            "%s: serial line problems in the last %.0fs: %s (last: %s)",
            self.device,
            self._log_every,
            parts,
            self.last_problem,
        )

    def summary(self) -> str | None:
        """A one-line summary for `point_errors`, or None when the line is clean."""
        bad = {k: v for k, v in self.values.items() if k not in ("frames_ok", "readings") and v}
        if not bad:
            return None
        parts = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        return f"{parts} (last: {self.last_problem})" if self.last_problem else parts


def align(buf: bytearray, head: int, second: Container[int], stats: ScanStats) -> bool:
    """Drop (and count as garbage) bytes until `buf` starts with `head` followed by an accepted second byte.

    True when it does; False when more bytes are needed. Shared by the fixed-frame sensors (SDS011, MH-Z19,
    PMS5003): resynchronising byte by byte on noise is the same for all, only their two header bytes differ.
    """
    marker = bytes([head])
    while True:
        start = buf.find(marker)
        if start < 0:
            stats.garbage_bytes += len(buf)
            buf.clear()
            return False
        if start:
            stats.garbage_bytes += start
            del buf[:start]
        if len(buf) < 2:
            return False
        if buf[1] in second:
            return True
        stats.garbage_bytes += 1
        del buf[:1]
