"""The eviction ledger is exact: every seq a platform never receives is counted in `evicted`, and nothing else.

The interleavings that broke it (eviction while rows are in flight, a PUBACK after an eviction, a connection lost
with messages in flight, several lanes) are forced here deterministically, at the store level, with an uplink
reduced to its calls: fetch or append (rows read), pin (just before the publish), ack (after the PUBACK).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.reading import Reading
from agent.store import Store, StoredRow

T0 = 1_715_000_000_000
BOUND = 256 * 1024  # the smallest bound: ~1,000 of these rows fill it


def readings(n: int, start: int = 0, size: int = 150) -> list[Reading]:
    return [Reading("meter-1", "text", T0 + (start + i) * 1000, "x" * size) for i in range(n)]


def fill_until_evicted(store: Store, more_than: int, start: int = 10_000) -> None:
    k = 0
    while store.stats().evicted <= more_than:
        store.append(readings(100, start=start + k * 100))
        k += 1
        assert k < 1000, "the bound never evicted"


def drain(store: Store, delivered: set[int], lane: str | None = None) -> None:
    """A connection that works: everything left is fetched, pinned, published, acknowledged."""
    while rows := store.fetch(0, None, 500, lane):
        sent = store.pin(rows, lane)
        delivered.update(r.seq for r in sent)
        store.ack([r.seq for r in sent], lane)


def gaps(store: Store, delivered: set[int]) -> list[int]:
    high = store.stats().next_seq - 1
    return [s for s in range(1, high + 1) if s not in delivered]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    return s


def test_rows_in_flight_are_not_evicted(store: Store) -> None:
    in_flight = store.pin(store.append(readings(200)))  # published, no PUBACK yet
    fill_until_evicted(store, 2000)
    on_disk = {r.seq for r in store.fetch(0, None, 100_000)}
    assert {r.seq for r in in_flight} <= on_disk, "a row in flight was evicted"
    assert store.stats().pinned == 200
    # Eviction went past them: the oldest rows that were not in flight are gone.
    assert min(on_disk - {r.seq for r in in_flight}) > 1000
    delivered = {r.seq for r in in_flight}
    store.ack(sorted(delivered))  # the PUBACK arrives after all those evictions
    assert store.stats().pinned == 0
    drain(store, delivered)
    assert len(gaps(store, delivered)) == store.stats().evicted


def test_a_row_evicted_between_its_read_and_its_publish_is_not_sent(store: Store) -> None:
    fetched = store.append(readings(100))  # read by a lane (live: offered; backlog: fetched), not yet sent
    fill_until_evicted(store, 1000)
    assert store.pin(fetched) == []  # gone meanwhile: counted in evicted, so it must not be sent
    delivered: set[int] = set()
    drain(store, delivered)
    assert not delivered & {r.seq for r in fetched}
    assert len(gaps(store, delivered)) == store.stats().evicted


def test_a_lost_puback_keeps_the_rows_until_they_are_sent_again(store: Store) -> None:
    sent = store.pin(store.append(readings(50)))
    delivered = {r.seq for r in sent}  # the broker forwarded them, the PUBACK was lost with the link
    fill_until_evicted(store, 3000)  # a long outage: the rows of that message stay (they may have arrived)
    assert {r.seq for r in sent} <= {r.seq for r in store.fetch(0, None, 100_000)}
    drain(store, delivered)  # the next connection sends them again (duplicates, deduplicated upstream)
    assert len(gaps(store, delivered)) == store.stats().evicted
    assert store.stats().pinned == 0


def test_the_batch_s_own_rows_go_last_even_with_rows_in_flight(store: Store) -> None:
    in_flight = store.pin(store.append(readings(20)))
    rows = store.append(readings(5000, start=20))  # alone larger than the bound
    assert 0 < len(rows) < 5000
    on_disk = {r.seq for r in store.fetch(0, None, 100_000)}
    assert {r.seq for r in in_flight} <= on_disk
    delivered = {r.seq for r in in_flight}
    store.ack(sorted(delivered))
    drain(store, delivered)
    assert len(gaps(store, delivered)) == store.stats().evicted


def test_each_lane_has_an_exact_ledger(store: Store) -> None:
    store.set_lanes(["mqtt", "second"])
    delivered: dict[str, set[int]] = {"mqtt": set(), "second": set()}
    rows = store.append(readings(300))
    # "mqtt" delivers the first 300 at once; "second" has them in flight during the outage that follows.
    store.pin(rows, "mqtt")
    delivered["mqtt"].update(r.seq for r in rows)
    store.ack([r.seq for r in rows], "mqtt")
    in_flight = store.pin(rows[:100], "second")
    fill_until_evicted(store, 2000)
    assert {r.seq for r in in_flight} <= {r.seq for r in store.fetch(0, None, 100_000)}
    delivered["second"].update(r.seq for r in in_flight)
    store.ack([r.seq for r in in_flight], "second")
    for lane in delivered:
        drain(store, delivered[lane], lane)
    stats = store.stats()
    # rows 101..300 were acknowledged by mqtt, then evicted before "second" had them: second's loss only.
    assert len(gaps(store, delivered["mqtt"])) == stats.lane_evicted["mqtt"]
    assert len(gaps(store, delivered["second"])) == stats.lane_evicted["second"]
    assert stats.lane_evicted["second"] - stats.lane_evicted["mqtt"] == 200
    assert stats.evicted == stats.lane_evicted["second"]
    assert stats.pinned == 0


def test_lane_evicted_is_persisted(tmp_path: Path) -> None:
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    s.set_lanes(["mqtt", "second"])
    rows = s.append(readings(300))
    s.ack([r.seq for r in rows], "mqtt")
    fill_until_evicted(s, 1000)
    before = s.stats().lane_evicted
    s.close()
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    s.set_lanes(["mqtt", "second"])
    assert s.stats().lane_evicted == before
    assert before["second"] - before["mqtt"] == 300
    s.close()


def run_uplink_model(store: Store, seed: int, lanes: list[str] | None, steps: int = 400) -> None:
    """Random interleavings of what uplinks do, against the real store; then the ledger of every lane."""
    rng = random.Random(seed)
    names: list[str | None] = list(lanes) if lanes else [None]
    if lanes:
        store.set_lanes(lanes)
    delivered: dict[str | None, set[int]] = {n: set() for n in names}
    queued: dict[str | None, list[list[StoredRow]]] = {n: [] for n in names}  # read, not yet published
    flight: dict[str | None, list[list[StoredRow]]] = {n: [] for n in names}  # published, no PUBACK yet
    cursor: dict[str | None, int] = dict.fromkeys(names, 0)
    k = 0
    for _ in range(steps):
        lane = rng.choice(names)
        op = rng.random()
        if op < 0.35:  # poll tick: stored, and offered to every live lane
            rows = store.append(readings(rng.randint(1, 150), start=k, size=rng.choice((50, 150, 400))))
            k += 150
            for n in names:
                if rows and rng.random() < 0.5:
                    queued[n].append(rows)
        elif op < 0.5:  # backlog lane reads the next batch
            rows = store.fetch(cursor[lane], None, rng.randint(1, 200), lane)
            if rows:
                cursor[lane] = rows[-1].seq
                queued[lane].append(rows)
        elif op < 0.7 and queued[lane]:  # a slot frees: the batch is published
            sent = store.pin(queued[lane].pop(rng.randrange(len(queued[lane]))), lane)
            if sent:
                flight[lane].append(sent)
        elif op < 0.9 and flight[lane]:  # a PUBACK, in any order
            message = flight[lane].pop(rng.randrange(len(flight[lane])))
            delivered[lane].update(r.seq for r in message)
            store.ack([r.seq for r in message], lane)
        elif op >= 0.9:  # the link drops: each message in flight may or may not have reached the platform
            for message in flight[lane]:
                if rng.random() < 0.5:
                    delivered[lane].update(r.seq for r in message)
            flight[lane], queued[lane], cursor[lane] = [], [], 0
    for n in names:
        for message in flight[n]:
            delivered[n].update(r.seq for r in message)
            store.ack([r.seq for r in message], n)
        drain(store, delivered[n], n)
    stats = store.stats()
    assert stats.evicted > 0, "the scenario must overflow the bound"
    for n in names:
        key = n or "mqtt"
        assert len(gaps(store, delivered[n])) == stats.lane_evicted[key], (seed, key)
    if not lanes:
        assert len(gaps(store, delivered[None])) == stats.evicted


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("lanes", [None, ["mqtt", "ngsi", "third"]], ids=["one-lane", "three-lanes"])
def test_ledger_is_exact_in_random_interleavings(tmp_path: Path, seed: int, lanes: list[str] | None) -> None:
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    try:
        run_uplink_model(s, seed, lanes)
    finally:
        s.close()


def test_the_model_catches_an_eviction_of_rows_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is able to fail: with pin() reduced to what the store did before (nothing), the ledger
    goes wrong for some interleaving."""
    monkeypatch.setattr(Store, "pin", lambda self, rows, lane=None: list(rows))
    failures = 0
    for seed in range(12):
        s = Store(tmp_path / f"b{seed}.db", BOUND, "normal")
        s.open()
        try:
            run_uplink_model(s, seed, None)
        except AssertionError:
            failures += 1
        finally:
            s.close()
    assert failures > 0


def test_rows_in_flight_at_a_stop_stay_pinned_in_the_next_run(tmp_path: Path) -> None:
    """A stop with messages in flight (no PUBACK before the link closed): they may have arrived, so the next
    run must not evict them before they are sent again. Close records them; open pins them again."""
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    sent = s.pin(s.append(readings(100)))
    s.close()
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    assert s.stats().pinned == 100
    fill_until_evicted(s, 2000)  # an outage right after the restart
    assert {r.seq for r in sent} <= {r.seq for r in s.fetch(0, None, 100_000)}
    delivered = {r.seq for r in sent}  # they had reached the platform
    drain(s, delivered)
    assert len(gaps(s, delivered)) == s.stats().evicted
    assert s.stats().pinned == 0
    s.close()
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    assert s.stats().pinned == 0  # acknowledged since: not held any more
    s.close()


def test_a_lane_that_acked_its_part_no_longer_holds_the_row_after_a_restart(tmp_path: Path) -> None:
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    s.set_lanes(["mqtt", "second"])
    rows = s.append(readings(10))
    s.pin(rows, "mqtt")
    s.pin(rows[:5], "second")
    s.ack([r.seq for r in rows[:5]], "second")  # second's PUBACK came: only mqtt still has them in flight
    s.close()
    s = Store(tmp_path / "buffer.db", BOUND, "normal")
    s.open()
    s.set_lanes(["mqtt", "second"])
    assert s.stats().pinned == 10
    s.ack([r.seq for r in rows], "mqtt")
    assert s.stats().pinned == 0
    assert s.stats().pending == 5  # rows 6..10: acked by mqtt only
    assert s.stats().lanes == {"mqtt": 0, "second": 5}
    s.close()
