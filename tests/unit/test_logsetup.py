"""Log lines for journald and terminals, and the per-device error reporter that keeps the journal readable."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator

import pytest

from agent.logsetup import LIBRARY_LOGGERS, ErrorReporter, format_duration, setup_logging, syslog_priority


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    yield
    for name, lib_level in libraries.items():
        logging.getLogger(name).setLevel(lib_level)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def emit(stream: io.StringIO | object, environ: dict[str, str], level: str = "INFO") -> None:
    setup_logging(level, stream=stream, environ=environ)  # type: ignore[arg-type]
    log = logging.getLogger("fieldgate.scheduler")
    log.debug("hidden at INFO")
    log.info("meter-1: 12 readings")
    log.warning("lamp-1: timeout after 1 s")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("poller crashed")


def test_journal_lines_have_priorities_and_no_timestamps() -> None:
    out = io.StringIO()
    emit(out, {"JOURNAL_STREAM": "8:12345"})  # a StringIO has no inode: the variable is trusted
    lines = out.getvalue().splitlines()
    assert lines[0] == "<6>INFO fieldgate.scheduler: meter-1: 12 readings"
    assert lines[1] == "<4>WARNING fieldgate.scheduler: lamp-1: timeout after 1 s"
    assert lines[2] == "<3>ERROR fieldgate.scheduler: poller crashed"
    # The traceback stays with its event: same priority, indented.
    assert all(line.startswith("<3>  ") for line in lines[3:]), lines
    assert lines[-1] == "<3>  ValueError: boom"
    assert "hidden" not in out.getvalue()


def test_terminal_lines_have_utc_timestamps() -> None:
    out = io.StringIO()
    emit(out, {}, level="debug")
    lines = out.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp + r" DEBUG fieldgate\.scheduler: hidden at INFO", lines[0]), lines[0]
    assert re.fullmatch(stamp + r" WARNING fieldgate\.scheduler: lamp-1: timeout after 1 s", lines[2])
    assert not lines[0].startswith("<")


def test_journal_stream_of_another_file_is_not_the_journal() -> None:
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        emit(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        f.seek(0)
        assert not f.read().startswith("<")
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        emit(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        f.seek(0)
        assert f.read().startswith("<6>INFO")


def test_setup_twice_keeps_one_handler_and_rejects_bad_levels() -> None:
    out = io.StringIO()
    setup_logging("INFO", stream=out, environ={})
    setup_logging("WARNING", stream=out, environ={})
    logging.getLogger("x").warning("once")
    assert out.getvalue().count("once") == 1
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        setup_logging("loud", stream=out, environ={})


def test_syslog_priority() -> None:
    assert [syslog_priority(x) for x in (10, 20, 25, 30, 40, 50)] == [7, 6, 6, 4, 3, 2]


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 45, 300, 3599, 7500, 7200, 90000, 86400)] == [
        "0 s", "45 s", "5 min", "59 min", "2 h 5 min", "2 h", "1 d 1 h", "1 d",
    ]  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_dead_device_logs_first_failure_then_summaries_then_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    reporter = ErrorReporter(logging.getLogger("fieldgate.devices"), summary_interval=300, clock=clock)
    with caplog.at_level(logging.INFO, logger="fieldgate.devices"):
        reporter.failure("meter-1", "no answer from unit 1 within 500 ms")
        for _ in range(42):  # every 7.2 s for ~5 min
            clock.t += 7.2
            reporter.failure("meter-1", "no answer from unit 1 within 500 ms")
        for _ in range(17):
            clock.t += 7.2
            reporter.failure("meter-1", "CRC error")
        clock.t += 7.2
        reporter.success("meter-1")
        reporter.success("meter-1")  # already fine: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "meter-1: no answer from unit 1 within 500 ms",
        "meter-1: still failing, 42 errors in 5 min: no answer from unit 1 within 500 ms",
        "meter-1: recovered after 7 min, 60 errors",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert reporter.failing() == []


def test_devices_are_reported_independently(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    reporter = ErrorReporter(summary_interval=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="fieldgate.devices"):
        reporter.failure("a", "x")
        reporter.failure("b", "y")
        reporter.failure("a", "x")  # within the interval: silent
        assert reporter.failing() == ["a", "b"]
        reporter.success("b")
        reporter.forget("a")
        assert reporter.failing() == []
        reporter.failure("a", "x")  # a new outage starts afresh
    assert [r.getMessage() for r in caplog.records] == [
        "a: x",
        "b: y",
        "b: recovered after 0 s, 1 error",
        "a: x",
    ]
