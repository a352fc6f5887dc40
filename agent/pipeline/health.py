"""Health figures: per-device state as the scheduler sees it, and the health/status documents built from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent.pipeline.reading import Reading


@dataclass(slots=True)
class DeviceHealth:
    """What the gateway knows of one device's recent behaviour (SPEC §3 health, plus the status page's extras)."""

    driver: str
    state: str = "unknown"  # "ok" | "failing" | "unknown"
    errors: int = 0
    consecutive_errors: int = 0
    last_ok_ts: int | None = None
    last_error: str | None = None
    last_error_ts: int | None = None
    point_errors: dict[str, str] = field(default_factory=dict)
    last_readings: dict[str, Reading] = field(default_factory=dict)
    cycles: int = 0
    next_attempt_ts: int | None = None  # when a failing device is tried again
    last_progress: float = field(default_factory=time.monotonic)  # monotonic; the watchdog reads it
    counters: dict[str, int] = field(
        default_factory=dict
    )  # driver-specific (frames_ok, bad_checksum, restarts...)

    def spec(self) -> dict[str, Any]:
        """The SPEC §3 per-device health object."""
        return {
            "state": self.state,
            "errors": self.errors,
            "last_ok_ts": self.last_ok_ts,
            "last_error": self.last_error,
        }

    def status(self) -> dict[str, Any]:
        """The richer object of /api/status: the SPEC fields plus last readings and point errors."""
        doc = self.spec()
        doc.update(
            driver=self.driver,
            point_errors=dict(self.point_errors),
            next_attempt_ts=self.next_attempt_ts,
            counters=dict(self.counters),
            readings={
                r.point: {
                    "value": r.value,
                    "unit": r.unit,
                    "ts": r.ts,
                    **({"quality": r.quality} if r.quality else {}),
                }
                for r in self.last_readings.values()
            },
        )
        return doc
