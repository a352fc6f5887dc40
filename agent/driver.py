"""The driver contract: what every protocol package implements, and what it may ask of the agent.

A driver instance serves one configured device. The scheduler calls, for a
polled device: `open()` once (and again after a failure), `read()` once per
cycle, `close()` at the end. A push device (BLE advertisements, a meter that
talks on its own like the Linky TIC) instead implements `stream()`, an async
iterator of reading batches; the scheduler then never calls `read()`.

Failures are raised as `agent.errors.DeviceError` subclasses: the scheduler
counts them in the device's health, backs the device off and calls `open()`
again later. A point that fails on its own (an exception code for one
register) goes into `point_errors` while the other points are returned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from agent.errors import WriteRefused
from agent.pipeline.reading import Reading, Value

C = TypeVar("C")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class PointSpec:
    """What the agent needs to know of a point to validate a write or a command."""

    name: str
    type: str  # "bool", "int16", ..., "float32", "string"
    unit: str | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    scaled: bool = False  # an integer register with scale/offset: its values are engineering floats


class SharedResources:
    """Resources shared by several drivers (a Modbus bus, the BLE scanner), created once, closed at the end.

    A driver asks `get(key, factory)`; the first caller creates the resource.
    Resources with an async `aclose()` are closed when the runtime stops.
    """

    def __init__(self) -> None:
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, factory: Callable[[], R]) -> R:
        if key not in self._items:
            self._items[key] = factory()
        item: R = self._items[key]
        return item

    async def discard(self, key: Any) -> None:
        """Close and forget one resource (a bus whose settings changed on reload)."""
        item = self._items.pop(key, None)
        close: Callable[[], Awaitable[None]] | None = getattr(item, "aclose", None)
        if close is not None:
            await close()

    async def aclose(self) -> None:
        items, self._items = list(self._items.values()), {}
        for item in reversed(items):
            close: Callable[[], Awaitable[None]] | None = getattr(item, "aclose", None)
            if close is not None:
                await close()


@dataclass(slots=True)
class DriverContext:
    """What the runtime hands every driver."""

    shared: SharedResources
    buses: dict[str, Any]  # bus name -> bus config model (Modbus)
    config_dir: Path


class Driver(ABC, Generic[C]):
    """One device. Subclasses set `name` to their registry name."""

    name: ClassVar[str]

    def __init__(self, device: str, config: C, context: DriverContext) -> None:
        self.device = device
        self.config = config
        self.context = context
        self.point_errors: dict[str, str] = {}

    async def open(self) -> None:
        """Acquire what the device needs (connection, port). Raise DeviceError on failure."""

    @abstractmethod
    async def read(self) -> list[Reading]:
        """One poll cycle: every point due now. Raise DeviceError when the device failed as a whole."""

    async def close(self) -> None:
        """Release what `open()` acquired. Must not raise."""

    def stream(self) -> AsyncIterator[list[Reading]] | None:
        """Push devices return an async iterator of reading batches; polled devices return None."""
        return None

    def cycle_interval(self) -> float:
        """How often the scheduler calls `read()`; a driver with per-point `poll` returns the shortest."""
        poll: float = getattr(self.config, "poll", 10.0)
        return poll

    def points(self) -> dict[str, PointSpec]:
        """The device's points, for reads, writes and commands."""
        return {}

    async def write(self, point: str, value: Value) -> Value:
        """Write `value` to `point` and return the value read back. Raise WriteRefused or DeviceError."""
        raise WriteRefused(f"{self.device}: this driver does not support writes")

    async def read_points(self, names: list[str]) -> list[Reading]:
        """One-shot read of some points (the `read` verb); by default a whole cycle, filtered."""
        readings = await self.read()
        return [r for r in readings if not names or r.point in names]
