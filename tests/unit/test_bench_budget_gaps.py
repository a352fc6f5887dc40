"""bench_budget's gap report (docs/PERFORMANCE.md, issue 24): a run whose platform missed seqs keeps its work
directory and says how many of the missing seqs are still in the buffer (durable, not yet sent) rather than
gone. A real SQLite file stands for the buffer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bench.bench_budget import Platform, keep_if_gaps


def _buffer(workdir: Path, seqs: list[int]) -> None:
    conn = sqlite3.connect(workdir / "buffer.db")
    conn.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO readings VALUES (?)", [(s,) for s in seqs])
    conn.commit()
    conn.close()


def test_gaps_are_reported_with_what_the_buffer_still_holds(tmp_path: Path) -> None:
    _buffer(tmp_path, [5, 6, 11])
    platform = Platform(0)
    platform.seqs = {1, 2, 3, 4, 7, 8, 10, 11}
    gaps = keep_if_gaps(tmp_path, platform)
    assert gaps == {
        "missing_first": [5, 6, 9],
        "missing_count": 3,
        "still_in_buffer": 2,  # 5 and 6; 9 is gone; 11 was received, not missing
        "workdir_kept": str(tmp_path),
    }


def test_a_run_without_gaps_keeps_nothing(tmp_path: Path) -> None:
    _buffer(tmp_path, [9])
    platform = Platform(0)
    platform.seqs = {3, 4, 5}  # readings beyond the last received (still buffered at the end) are no gap
    assert keep_if_gaps(tmp_path, platform) is None
    platform.seqs = set()
    assert keep_if_gaps(tmp_path, platform) is None


def test_an_unreadable_buffer_still_reports_the_gaps(tmp_path: Path) -> None:
    platform = Platform(0)
    platform.seqs = {1, 3}
    gaps = keep_if_gaps(tmp_path, platform)  # no buffer.db: nothing known to be in it
    assert gaps is not None and gaps["missing_first"] == [2] and gaps["still_in_buffer"] == 0
