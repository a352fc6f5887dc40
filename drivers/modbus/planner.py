"""Pure request planning: the due points of a cycle -> the fewest Modbus read requests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BIT_TABLES = ("coil", "discrete")


@dataclass(frozen=True, slots=True)
class PlannedPoint:
    """What the planner needs of a point: where it is and how many registers (or bits) it spans."""

    name: str
    table: str
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(slots=True)
class ReadRequest:
    """One read request: a contiguous block of one table, and the points decoded from it."""

    table: str
    address: int
    count: int
    points: list[PlannedPoint] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class Limits:
    max_registers: int = 125
    max_bits: int = 2000
    max_gap: int = 10

    def for_table(self, table: str) -> int:
        return self.max_bits if table in BIT_TABLES else self.max_registers


# A learned split: (table, address) that no request may straddle (a register below it and one at or above it).
Barrier = tuple[str, int]


def _straddles(table: str, start: int, end: int, barriers: set[Barrier]) -> bool:
    return any(t == table and start < b < end for t, b in barriers)


def plan(
    points: Iterable[PlannedPoint], limits: Limits, barriers: set[Barrier] | None = None
) -> list[ReadRequest]:
    """Group points into requests: per table, by address, merging across holes of at most `max_gap`.

    A request never exceeds the table's limit (registers or bits), never straddles a learned
    barrier, and never splits a point; a point larger than the limit gets a request of its own.
    The result is ordered by table then address, so a cycle reads in a stable order.
    """
    barriers = barriers or set()
    by_table: dict[str, list[PlannedPoint]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    requests: list[ReadRequest] = []
    for table in sorted(by_table):
        limit = limits.for_table(table)
        current: ReadRequest | None = None
        for p in sorted(by_table[table], key=lambda q: (q.address, q.count, q.name)):
            if current is not None:
                new_end = max(current.end, p.end)
                fits = (
                    p.address - current.end <= limits.max_gap
                    and new_end - current.address <= limit
                    and not _straddles(table, current.address, new_end, barriers)
                )
                if fits:
                    current.count = new_end - current.address
                    current.points.append(p)
                    continue
                requests.append(current)
            current = ReadRequest(table, p.address, p.count, [p])
        if current is not None:
            requests.append(current)
    return requests


def split_in_halves(request: ReadRequest) -> tuple[list[ReadRequest], Barrier]:
    """Split a failed request into two by its points (never inside a point); return them and the new barrier.

    Points that overlap (two `bit` points of one register) stay together.
    """
    pts = sorted(request.points, key=lambda q: (q.address, q.count, q.name))
    groups: list[list[PlannedPoint]] = []
    for p in pts:
        if groups and p.address < max(q.end for q in groups[-1]):
            groups[-1].append(p)
        else:
            groups.append([p])
    if len(groups) < 2:
        raise ValueError("a request of one point (or of overlapping points) cannot be split")
    mid = len(groups) // 2
    halves = [[p for g in groups[:mid] for p in g], [p for g in groups[mid:] for p in g]]
    out = [ReadRequest(request.table, h[0].address, max(q.end for q in h) - h[0].address, h) for h in halves]
    return out, (request.table, out[1].address)


def total_registers(requests: Sequence[ReadRequest]) -> int:
    return sum(r.count for r in requests)
