"""The buffer's lanes (one per upstream): a row leaves only when every upstream acknowledged it."""

from __future__ import annotations

from pathlib import Path

from agent.pipeline.reading import Reading
from agent.pipeline.store import Store


def readings(n: int, start: int = 0) -> list[Reading]:
    return [Reading("m", "p", 1_700_000_000_000 + start + i, float(i)) for i in range(n)]


def test_one_lane_acks_delete_as_before(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", 16 * 1024 * 1024)
    store.open()
    store.set_lanes(["mqtt"])
    rows = store.append(readings(5))
    assert store.ack([r.seq for r in rows[:3]], "mqtt") == 3
    assert store.stats().pending == 2 and store.stats().lanes == {"mqtt": 2}
    store.close()


def test_rows_stay_until_every_lane_acked_and_lanes_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = Store(path, 16 * 1024 * 1024)
    store.open()
    store.set_lanes(["mqtt", "city"])
    rows = store.append(readings(10))
    seqs = [r.seq for r in rows]
    assert store.ack(seqs[:6], "mqtt") == 0  # city has not acknowledged them yet
    assert [r.seq for r in store.fetch(0, None, 100, "mqtt")] == seqs[6:]
    assert [r.seq for r in store.fetch(0, None, 100, "city")] == seqs
    assert store.stats().lanes == {"mqtt": 4, "city": 10} and store.stats().pending == 10
    assert store.ack(seqs[:4], "city") == 4
    assert store.ack(seqs[:4], "city") == 0  # twice is fine
    assert store.stats().lanes == {"mqtt": 4, "city": 6} and store.stats().pending == 6
    store.close()

    again = Store(path, 16 * 1024 * 1024)
    again.open()
    again.set_lanes(["mqtt", "city"])
    assert again.stats().lanes == {"mqtt": 4, "city": 6}
    assert [r.seq for r in again.fetch(0, None, 100, "mqtt")] == seqs[6:]
    # The city upstream removed from the config: what mqtt acknowledged goes, the rest stays for mqtt.
    again.set_lanes(["mqtt"])
    assert again.stats().pending == 4 and [r.seq for r in again.fetch(0, None, 100)] == seqs[6:]
    # A new lane later gets every pending row, even those of a former lane's bit.
    again.set_lanes(["mqtt", "scada"])
    assert [r.seq for r in again.fetch(0, None, 100, "scada")] == seqs[6:]
    again.close()


def test_eviction_takes_rows_from_every_lane_and_counts_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", 256 * 1024)
    store.open()
    store.set_lanes(["mqtt", "city"])
    total = 0
    for i in range(40):
        rows = store.append(readings(200, i * 200))
        total += len(rows)
        store.ack([r.seq for r in rows], "mqtt")  # mqtt keeps up, city is down
    st = store.stats()
    assert st.evicted > 0
    assert st.pending + st.evicted == total == 8000
    assert st.lanes == {"mqtt": 0, "city": st.pending}
    assert len(store.fetch(0, None, 100_000, "city")) == st.pending
    store.close()
