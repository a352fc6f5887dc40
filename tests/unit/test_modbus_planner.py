"""Request planning: fewest requests, limits, never splitting a point, learned splits."""

from __future__ import annotations

import pytest

from drivers.modbus.planner import Limits, PlannedPoint, plan, split_in_halves


def pts(table: str, spans: list[tuple[int, int]]) -> list[PlannedPoint]:
    return [PlannedPoint(f"{table}{a}", table, a, n) for a, n in spans]


def test_contiguous_points_make_one_request() -> None:
    requests = plan(pts("holding", [(a, 1) for a in range(20)]), Limits())
    assert [(r.address, r.count, len(r.points)) for r in requests] == [(0, 20, 20)]


def test_holes_up_to_max_gap_are_read_and_larger_ones_split() -> None:
    points = pts("input", [(0, 2), (12, 2), (30, 2)])
    requests = plan(points, Limits(max_gap=10))
    assert [(r.address, r.count) for r in requests] == [(0, 14), (30, 2)]
    assert [(r.address, r.count) for r in plan(points, Limits(max_gap=0))] == [(0, 2), (12, 2), (30, 2)]


def test_tables_are_never_mixed_and_order_is_stable() -> None:
    points = pts("input", [(0, 1)]) + pts("holding", [(0, 1)]) + pts("coil", [(0, 1), (1, 1)])
    requests = plan(points, Limits())
    assert [(r.table, r.address, r.count) for r in requests] == [
        ("coil", 0, 2),
        ("holding", 0, 1),
        ("input", 0, 1),
    ]


def test_register_limit_is_respected_and_points_never_split() -> None:
    points = pts("input", [(a, 2) for a in range(0, 300, 2)])
    requests = plan(points, Limits(max_registers=125))
    assert all(r.count <= 125 for r in requests)
    assert len(requests) == 3  # 150 float32 = 300 registers: 62+62+26 points of 2 registers
    for r in requests:
        for p in r.points:
            assert r.address <= p.address and p.end <= r.end
    assert sum(len(r.points) for r in requests) == 150


def test_device_limit_and_bit_limit() -> None:
    assert len(plan(pts("holding", [(a, 1) for a in range(100)]), Limits(max_registers=10))) == 10
    assert len(plan(pts("coil", [(a, 1) for a in range(4000)]), Limits(max_bits=2000))) == 2


def test_point_larger_than_the_limit_gets_its_own_request() -> None:
    requests = plan(pts("holding", [(0, 1), (1, 20), (21, 1)]), Limits(max_registers=10, max_gap=0))
    assert [(r.address, r.count) for r in requests] == [(0, 1), (1, 20), (21, 1)]


def test_overlapping_points_share_a_request() -> None:
    points = [
        PlannedPoint("status", "holding", 6, 1),
        PlannedPoint("fail", "holding", 6, 1),
        PlannedPoint("energy", "holding", 5, 2),
    ]
    requests = plan(points, Limits())
    assert [(r.address, r.count, len(r.points)) for r in requests] == [(5, 2, 3)]


def test_barriers_prevent_merging_across_a_learned_split() -> None:
    points = pts("holding", [(a, 1) for a in range(10)])
    requests = plan(points, Limits(), {("holding", 5)})
    assert [(r.address, r.count) for r in requests] == [(0, 5), (5, 5)]
    # a barrier of another table changes nothing
    assert len(plan(points, Limits(), {("input", 5)})) == 1


def test_split_in_halves_by_points() -> None:
    (request,) = plan(pts("holding", [(0, 2), (4, 2), (8, 2), (20, 2)]), Limits(max_gap=20))
    halves, barrier = split_in_halves(request)
    assert [(h.address, h.count) for h in halves] == [(0, 6), (8, 14)]
    assert barrier == ("holding", 8)
    (single,) = plan(pts("holding", [(0, 2)]), Limits())
    with pytest.raises(ValueError, match="cannot be split"):
        split_in_halves(single)


def test_split_keeps_overlapping_points_together_and_every_point_in_one_half() -> None:
    # Two `bit` points share register 6 (an overlapping group, not the last), then two lone points.
    points = [
        PlannedPoint("b0", "coil", 6, 1),
        PlannedPoint("b1", "coil", 6, 1),
        PlannedPoint("energy", "coil", 9, 2),
        PlannedPoint("power", "coil", 12, 2),
    ]
    (request,) = plan(points, Limits())
    halves, barrier = split_in_halves(request)
    assert [h.table for h in halves] == ["coil", "coil"]
    assert [[p.name for p in h.points] for h in halves] == [["b0", "b1"], ["energy", "power"]]
    assert [(h.address, h.count) for h in halves] == [(6, 1), (9, 5)]
    assert barrier == ("coil", 9)
    # the halves are requests the driver can plan around: together they hold every point once
    assert sorted(p.name for h in halves for p in h.points) == sorted(p.name for p in points)


def test_split_of_two_touching_points() -> None:
    # Adjacent points (one ends where the next starts) do not overlap: two groups, one per half.
    (request,) = plan(pts("holding", [(0, 2), (2, 2)]), Limits())
    halves, barrier = split_in_halves(request)
    assert [(h.address, h.count, [p.name for p in h.points]) for h in halves] == [
        (0, 2, ["holding0"]),
        (2, 2, ["holding2"]),
    ]
    assert barrier == ("holding", 2)


def test_split_refusal_says_why() -> None:
    (overlapping,) = plan([PlannedPoint("a", "holding", 3, 1), PlannedPoint("b", "holding", 3, 1)], Limits())
    with pytest.raises(
        ValueError, match=r"^a request of one point \(or of overlapping points\) cannot be split$"
    ):
        split_in_halves(overlapping)
