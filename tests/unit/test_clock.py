"""Clock state: detection through an injected probe, latching, the assume_synced override, the kernel call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.pipeline import clock
from agent.pipeline.clock import (
    MAXERROR_LIMIT_US,
    STA_UNSYNC,
    TIME_ERROR,
    SystemClock,
    detect_synced,
    kernel_synced,
    libc_adjtime,
    shared_clock,
    timesyncd_synced,
)


class Probe:
    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.answers[min(self.calls - 1, len(self.answers) - 1)]


def test_detect_rechecks_at_most_every_10_s_and_latches_once_synced() -> None:
    t = [0.0]
    probe = Probe([False, True, False])
    clock = SystemClock("detect", probe=probe, monotonic=lambda: t[0])
    assert clock.synced() is False
    t[0] = 5.0
    assert clock.synced() is False and probe.calls == 1  # cached
    t[0] = 10.0
    assert clock.synced() is True and probe.calls == 2
    t[0] = 100.0
    assert clock.synced() is True and probe.calls == 2  # once set, the clock stays trusted


def test_assume_synced_never_asks() -> None:
    probe = Probe([False])
    assert SystemClock("assume_synced", probe=probe).synced() is True
    assert probe.calls == 0


def test_shared_clock_is_one_per_mode() -> None:
    assert shared_clock("detect") is shared_clock("detect")
    assert shared_clock("assume_synced").synced() is True


def test_kernel_query_answers_without_privileges() -> None:
    # This machine's clock may or may not be synchronised; the call itself must work on Linux.
    assert kernel_synced() in (True, False)


def test_kernel_query_reads_the_kernels_struct_timex() -> None:
    """The real call through a spy: the fields land where the kernel writes them (a wrong struct layout
    would read `status` or `maxerror` from the wrong bytes and decide on garbage)."""
    real = libc_adjtime()
    assert real is not None
    seen: list[Any] = []

    def spy(ptr: Any) -> int:
        state = real(ptr)
        seen.append(
            (state, ptr.contents.modes, ptr.contents.tick, ptr.contents.maxerror, ptr.contents.status)
        )
        return state

    answer = kernel_synced(spy)
    state, modes, tick, maxerror, status = seen[0]
    assert modes == 0  # read-only: nothing asked to be set
    assert 0 <= state <= TIME_ERROR
    # The kernel's tick length in microseconds: 1e6 / USER_HZ (100 on every Linux ABI): 10,000 +- 10 %.
    assert 9_000 <= tick <= 11_000, tick
    assert maxerror >= 0
    assert answer == (state != TIME_ERROR and not status & STA_UNSYNC and maxerror < MAXERROR_LIMIT_US)


def fake_adjtime(state: int, status: int = 0, maxerror: int = 1000) -> Any:
    """An ntp_adjtime stand-in: fills the struct as the kernel would and returns `state`."""

    def call(ptr: Any) -> int:
        ptr.contents.status = status
        ptr.contents.maxerror = maxerror
        return state

    return call


@pytest.mark.parametrize(
    ("state", "status", "maxerror", "expected"),
    [
        (0, 0, 1000, True),  # TIME_OK, a small maximum error: synchronised
        (1, 0, 1000, True),  # TIME_INS (a leap second announced) is still synchronised
        (TIME_ERROR, 0, 1000, False),  # the kernel says the clock is not synchronised
        (0, STA_UNSYNC, 1000, False),  # the status bit alone
        (0, STA_UNSYNC | 0x0001, 1000, False),  # STA_PLL set beside it changes nothing
        (0, 0x2000, 1000, True),  # STA_NANO: a flag that does not mean unsynchronised
        (0, 0, MAXERROR_LIMIT_US, False),  # NTP's 16 s limit reached
        (0, 0, MAXERROR_LIMIT_US - 1, True),
        (-1, 0, 0, None),  # the call failed: unknown
    ],
)
def test_kernel_answers_decide_the_state(
    state: int, status: int, maxerror: int, expected: bool | None
) -> None:
    assert kernel_synced(fake_adjtime(state, status, maxerror)) is expected


@pytest.mark.parametrize(
    ("kernel", "timesyncd", "expected"),
    [
        (True, False, True),
        (False, True, True),  # timesyncd synchronised it (a kernel without NTP status)
        (False, False, False),
        (None, False, True),  # no way to ask: not flagged forever
        (None, True, True),
    ],
)
def test_detect_combines_kernel_and_timesyncd(kernel: bool | None, timesyncd: bool, expected: bool) -> None:
    assert detect_synced(lambda: kernel, lambda: timesyncd) is expected


def test_detect_looks_its_sources_up_at_each_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the fault suite relies on to force a daemon's clock state (tests/faults/test_clock.py)."""
    monkeypatch.setattr(clock, "kernel_synced", lambda: False)
    monkeypatch.setattr(clock, "TIMESYNCD_FLAG", tmp_path / "synchronized")
    assert detect_synced() is False
    (tmp_path / "synchronized").touch()
    assert detect_synced() is True


def test_timesyncd_flag(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    assert timesyncd_synced(flag) is False
    flag.touch()
    assert timesyncd_synced(flag) is True
