"""`fieldgate scan modbus` presentation: the progress bar (on a terminal only) and the unit id ranges."""

from __future__ import annotations

import io

import pytest

from agent.verbs.scan import ProgressBar, parse_units


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_and_ends_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = ProgressBar("scanning")
    for done in (1, 2, 4):
        bar(done, 4)
    out = term.getvalue()
    assert out.count("\r") == 3 and out.endswith("] 4/4\n")
    assert "[" + "#" * 15 + "." * 15 + "] 2/4" in out


def test_progress_bar_stays_quiet_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()  # `--json | jq`, a log file: no carriage returns in them
    monkeypatch.setattr("sys.stderr", pipe)
    ProgressBar("scanning")(1, 2)
    assert pipe.getvalue() == ""


def test_unit_id_ranges() -> None:
    assert parse_units("1-3,10,20-21") == [1, 2, 3, 10, 20, 21]
    assert len(parse_units("1-247")) == 247
    with pytest.raises(ValueError, match="0-255"):
        parse_units("250-300")
