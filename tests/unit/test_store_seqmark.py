"""seq never goes backwards: the side file `<buffer>.seq` (a mark the WAL does not cover) against a database
that lost its tail or its content. The fault tests with a real daemon and kill -9 are in
tests/faults/test_corrupt.py; these force each case at the store level."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest

from agent.pipeline import store as store_module
from agent.pipeline.reading import Reading
from agent.pipeline.store import SEQ_BLOCK, Store

MiB = 1024 * 1024
T0 = 1_715_000_000_000


def readings(n: int, start: int = 0) -> list[Reading]:
    return [Reading("meter-1", "power_w", T0 + (start + i) * 1000, 100.5 + i, "W") for i in range(n)]


def mark(db: Path) -> str:
    return Path(f"{db}.seq").read_text()


def regressions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and "went back" in r.getMessage()]


def snapshot(db: Path, dest: Path, *, wal: bool) -> Path:
    """The files as a kill -9 leaves them (copied while the store is open and idle), with or without -wal."""
    dest.mkdir()
    out = dest / db.name
    for suffix in ("", "-wal", "-shm", ".seq"):
        src = Path(f"{db}{suffix}")
        if src.exists() and (wal or suffix != "-wal"):
            shutil.copy2(src, f"{out}{suffix}")
    return out


def test_the_side_file_is_private_reserved_ahead_and_exact_once_closed(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    assert mark(db) == f"{1 + SEQ_BLOCK} open\n"
    assert stat.S_IMODE(Path(f"{db}.seq").stat().st_mode) == 0o600
    s.append(readings(10))
    assert mark(db) == f"{1 + SEQ_BLOCK} open\n"  # within the block: not written again
    s.close()
    assert mark(db) == "11 closed\n"
    assert not Path(f"{db}.seq.tmp").exists()


def test_one_side_file_write_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real = Store._write_mark

    def counting(self: Store, high: int, closed: bool) -> None:
        writes.append(high)
        real(self, high, closed)

    monkeypatch.setattr(Store, "_write_mark", counting)
    s = Store(tmp_path / "buffer.db", 64 * MiB, "normal")
    s.open()
    for k in range(50):
        s.append(readings(500, start=k * 500))  # 25,000 readings
    s.close()
    # open (mark 10,001); the batch 10,001..10,500 (mark: its next seq + a block = 20,501); the batch
    # 20,501..21,000 (31,001); close (exactly the next seq)
    assert writes == [10_001, 20_501, 31_001, 25_001]


def test_an_unclean_stop_with_its_wal_keeps_seq_contiguous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "a" / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(100))
    copy = snapshot(db, tmp_path / "b", wal=True)
    s.close()
    again = Store(copy, 64 * MiB)
    again.open()
    assert again.append(readings(1))[0].seq == 101  # no jump: the reserved seqs were never used
    assert again.stats().recovered == 0
    assert regressions(caplog) == []
    again.close()


def test_a_lost_wal_resumes_above_every_seq_handed_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "a" / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(100))
    s._require_open().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file has rows up to 100
    s.append(readings(50, start=100))  # 101..150 only in the -wal
    copy = snapshot(db, tmp_path / "b", wal=False)
    s.close()
    again = Store(copy, 64 * MiB)
    again.open()
    first = again.append(readings(1))[0].seq
    assert first == 1 + SEQ_BLOCK > 150
    assert again.stats().recovered == 1
    assert len(regressions(caplog)) == 1
    assert "-wal" in regressions(caplog)[0].getMessage()
    again.close()
    # Counted once: the next start finds the file and the mark in agreement.
    caplog.clear()
    third = Store(copy, 64 * MiB)
    third.open()
    assert third.stats().recovered == 1 and regressions(caplog) == []
    assert third.append(readings(1))[0].seq == first + 1
    third.close()


@pytest.mark.parametrize("clean", [True, False], ids=["closed", "killed"])
def test_an_emptied_database_resumes_above_every_seq_handed_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, clean: bool
) -> None:
    db = tmp_path / "a" / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(100))
    if clean:
        s.close()
        copy = db
    else:
        copy = snapshot(db, tmp_path / "b", wal=False)
        s.close()
    copy.write_bytes(b"")  # 0 bytes, as a failing SD card or a careless copy leaves it
    again = Store(copy, 64 * MiB)
    again.open()
    expected = 101 if clean else 1 + SEQ_BLOCK  # closed cleanly: the mark is exactly the next seq
    assert again.append(readings(1))[0].seq == expected
    assert again.stats().recovered == 1
    assert len(regressions(caplog)) == 1
    again.close()


def test_an_older_copy_of_a_cleanly_closed_buffer_is_detected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(100))
    s.close()
    old = tmp_path / "old.db"
    shutil.copy2(db, old)
    s.open()
    s.append(readings(100, start=100))
    s.close()
    shutil.copy2(old, db)  # a backup restored over the buffer
    s = Store(db, 64 * MiB)
    s.open()
    assert s.append(readings(1))[0].seq == 201
    assert s.stats().recovered == 1 and len(regressions(caplog)) == 1
    s.close()


def test_a_corrupt_file_with_a_mark_resumes_at_the_mark_not_at_a_time_value(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(100))
    s.close()
    db.write_bytes(b"garbage" * 1000)
    s = Store(db, 64 * MiB)
    s.open()
    assert s.append(readings(1))[0].seq == 101
    assert s.stats().recovered == 1
    s.close()


def test_a_first_start_beside_an_older_buffer_without_mark(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(10))
    s.close()
    Path(f"{db}.seq").unlink()  # a buffer written by a version without the side file
    s = Store(db, 64 * MiB)
    s.open()
    assert s.append(readings(1))[0].seq == 11
    assert s.stats().recovered == 0
    s.close()


def test_a_side_file_that_cannot_be_written_fails_the_append_and_consumes_no_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(tmp_path / "buffer.db", 64 * MiB, "normal")
    s.open()
    s.append(readings(SEQ_BLOCK - 1))
    real_replace = store_module.os.replace

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", refuse)
    with pytest.raises(store_module.StoreError, match="seq mark"):
        s.append(readings(10, start=SEQ_BLOCK))
    assert s.stats().next_seq == SEQ_BLOCK and s.stats().disk_errors == 1
    monkeypatch.setattr(store_module.os, "replace", real_replace)
    assert s.append(readings(10, start=SEQ_BLOCK))[0].seq == SEQ_BLOCK
    s.close()


def test_the_regression_is_said_with_both_seqs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "buffer.db"
    s = Store(db, 64 * MiB)
    s.open()
    s.append(readings(100))
    s.close()
    old = tmp_path / "old.db"
    shutil.copy2(db, old)
    s.open()
    s.append(readings(100, start=100))
    s.close()
    shutil.copy2(old, db)
    with caplog.at_level(logging.ERROR):
        s = Store(db, 64 * MiB)
        s.open()
    s.close()
    (message,) = [r.getMessage() for r in regressions(caplog)]
    assert message.startswith(
        f"buffer {db} went back: it was closed cleanly at seq 200, but the file only goes to seq 100; "
    )
    assert f"seq resumes at 201 (the mark in {s.seq_path})" in message
