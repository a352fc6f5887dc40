"""Clock state: detection through an injected probe, latching, the assume_synced override, the kernel call."""

from __future__ import annotations

from pathlib import Path

from agent.clock import SystemClock, kernel_synced, shared_clock, timesyncd_synced


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


def test_timesyncd_flag(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    assert timesyncd_synced(flag) is False
    flag.touch()
    assert timesyncd_synced(flag) is True
