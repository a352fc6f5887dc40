"""Giving the start-up's memory back: one `gc.collect()` and `malloc_trim(0)` once a large config runs steadily.

Start-up allocates much that it drops at once (the validated config's snapshot and its decoding, the imports'
temporaries); CPython returns freed memory to malloc, which keeps most of it in its heap for later. Trimming once
the first large tick is stored gives those pages back to the system: 1.7 MiB with 10,000 points (the heap left by
decoding the config's snapshot), but only 0.1 MiB on the reference workload (200 points), less than the 0.26 MiB
that importing ctypes costs: so the store writer asks for it only after a commit of SETTLE_MIN_READINGS readings
(a poll tick of a config that large; docs/PERFORMANCE.md). The allocator's steady behaviour (arenas,
thresholds) is set by the environment (systemd/fieldgate.service).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

log = logging.getLogger("fieldgate.runtime")

SETTLE_AFTER = (
    5.0  # seconds after the first large commit: the first ticks' transient objects are gone by then
)
SETTLE_MIN_READINGS = 1000  # a commit this large means a config large enough to be worth a trim


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library, or no ctypes)."""
    try:
        import ctypes  # only here: about 0.3 MiB, and only the trim needs it
    except ImportError:
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def settle() -> bool:
    """Collect cycles, then give the heap's free pages back to the system. True if malloc released memory."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    released = bool(trim(0))
    log.debug("start-up memory given back: %s", "yes" if released else "nothing to give")
    return released
