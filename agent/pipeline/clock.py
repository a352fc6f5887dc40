"""Whether the system clock can be trusted: kernel NTP status (adjtimex), systemd-timesyncd, or config."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger("fieldgate.clock")

ClockMode = Literal["detect", "assume_synced"]

STA_UNSYNC = 0x0040  # kernel status bit: the clock is not synchronised
TIME_ERROR = 5  # ntp_adjtime's return value while the clock is unsynchronised
MAXERROR_LIMIT_US = 16_000_000  # NTP's limit: a maximum error past 16 s means "not synchronised"
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # touched by systemd-timesyncd at each sync
RECHECK_S = 10.0  # the kernel is asked at most this often while the clock is not yet synchronised


class ClockState(Protocol):
    """What the processing asks: may timestamps taken now be trusted?"""

    def synced(self) -> bool: ...


class FixedClock:
    """A clock state set by hand (tests, the bandwidth bench)."""

    def __init__(self, synced: bool = True) -> None:
        self.is_synced = synced

    def synced(self) -> bool:
        return self.is_synced


@functools.cache
def _timex() -> Any:
    """struct timex of <sys/timex.h> (Linux), built on first use: a gateway with `clock: assume_synced` never
    loads ctypes. Natural alignment gives the kernel's layout."""
    import ctypes

    class Timex(ctypes.Structure):
        _fields_ = [
            ("modes", ctypes.c_uint),
            ("offset", ctypes.c_long),
            ("freq", ctypes.c_long),
            ("maxerror", ctypes.c_long),
            ("esterror", ctypes.c_long),
            ("status", ctypes.c_int),
            ("constant", ctypes.c_long),
            ("precision", ctypes.c_long),
            ("tolerance", ctypes.c_long),
            ("time_sec", ctypes.c_long),
            ("time_usec", ctypes.c_long),
            ("tick", ctypes.c_long),
            ("ppsfreq", ctypes.c_long),
            ("jitter", ctypes.c_long),
            ("shift", ctypes.c_int),
            ("stabil", ctypes.c_long),
            ("jitcnt", ctypes.c_long),
            ("calcnt", ctypes.c_long),
            ("errcnt", ctypes.c_long),
            ("stbcnt", ctypes.c_long),
            ("tai", ctypes.c_int),
            ("_reserved", ctypes.c_int * 11),  # padding the kernel declares; also a margin for larger layouts
        ]

    return Timex


def libc_adjtime() -> Callable[[Any], int] | None:
    """libc's ntp_adjtime (or adjtimex), taking a pointer to a struct timex; None when unavailable."""
    import ctypes

    try:
        # The process's own symbols (libc among them): ctypes.util.find_library would run ldconfig.
        libc = ctypes.CDLL(None, use_errno=True)
        call: Callable[[Any], int] = getattr(libc, "ntp_adjtime", None) or libc.adjtimex
    except (OSError, AttributeError):
        return None
    return call


def kernel_synced(call: Callable[[Any], int] | None = None) -> bool | None:
    """The kernel's view (read-only ntp_adjtime, modes = 0: no privilege needed); None when unavailable.

    `call` stands in for ntp_adjtime (tests): it gets a ctypes pointer to a zeroed struct timex, fills it
    and returns the clock state (TIME_OK = 0 ... TIME_ERROR = 5, or -1 on failure)."""
    import ctypes

    call = call or libc_adjtime()
    if call is None:
        return None
    tx = _timex()()
    state = call(ctypes.pointer(tx))
    if state < 0:
        return None
    return bool(state != TIME_ERROR and not (tx.status & STA_UNSYNC) and tx.maxerror < MAXERROR_LIMIT_US)


def timesyncd_synced(flag: Path | None = None) -> bool:
    return (flag or TIMESYNCD_FLAG).exists()


def detect_synced(
    kernel: Callable[[], bool | None] | None = None, timesyncd: Callable[[], bool] | None = None
) -> bool:
    """Synchronised when the kernel says so or timesyncd left its flag; unknown systems count as synced.

    `kernel` and `timesyncd` replace the two sources (tests); by default the module's `kernel_synced` and
    `timesyncd_synced` are looked up at each call, so a test harness can replace them in a daemon."""
    answer = (kernel or kernel_synced)()
    if answer:
        return True
    if (timesyncd or timesyncd_synced)():
        return True
    return answer is None  # no way to tell (not Linux): do not mark every reading uncertain forever


class SystemClock:
    """The gateway's clock state, detected or assumed (gateway.clock); once synchronised, it stays trusted.

    Staying trusted is deliberate: a clock that was set once drifts by seconds per day at worst, while
    the case this guards against is a Pi booting at 1970 or at its last shutdown time.
    """

    def __init__(
        self,
        mode: ClockMode = "detect",
        probe: Callable[[], bool] = detect_synced,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self._probe = probe
        self._monotonic = monotonic
        self._synced = mode == "assume_synced"
        self._checked: float | None = None
        self._warned = False

    def synced(self) -> bool:
        if self._synced:
            return True
        now = self._monotonic()
        if self._checked is not None and now - self._checked < RECHECK_S:
            return False
        self._checked = now
        if self._probe():
            self._synced = True
            log.info("system clock synchronised: readings are no longer marked uncertain")
        elif not self._warned:
            self._warned = True
            log.warning("system clock not synchronised yet: readings are marked uncertain until it is")
        return self._synced


_SHARED: dict[str, SystemClock] = {}


def shared_clock(mode: ClockMode) -> SystemClock:
    """One clock state per mode for the whole process (every device asks the same one)."""
    clock = _SHARED.get(mode)
    if clock is None:
        clock = _SHARED[mode] = SystemClock(mode)
    return clock
