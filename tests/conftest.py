"""Shared fixtures: a private Mosquitto broker on a free port; the CI skip policy."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.broker import Broker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run the long variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker().start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def pbroker() -> Iterator[Broker]:
    """A broker that keeps the checker's persistent session across its own restarts."""
    b = Broker(persistence=True).start()
    try:
        yield b
    finally:
        b.cleanup()


# ---------------------------------------------------------------------------------------------------------
# CI skip policy (docs/TESTING.md): with CI=true in the environment, a skipped test fails the run unless its
# reason matches one line of this table. A skip elsewhere hides a missing dependency (mosquitto_passwd,
# libfaketime, chromium...) that CI must install, so the tests it guards would never run.

CI_ALLOWED_SKIPS: tuple[tuple[str, str], ...] = (
    (
        r"could not import '(bumble|bleak)'",
        "BLE is an optional extra (pip install .[ble]); the BLE tests run where it is installed",
    ),
    (
        r"a tiny filesystem needs root|mount -t tmpfs not permitted",
        "test_disk's full filesystem needs CAP_SYS_ADMIN to mount a tmpfs, which CI containers do not grant",
    ),
    (
        r"long variant: run with --run-slow",
        "the long variants run in the benches (bench/bench_kill9.py runs the 150-kill loop)",
    ),
    (
        r"wait_for keeps the cancellation from 3\.12 on",
        "reproduces a CPython 3.11 bug: nothing to reproduce on a newer Python",
    ),
)


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def ci_skip_allowed(reason: str) -> str | None:
    """Why a skip with this reason is allowed under CI (the table's second column), or None."""
    for pattern, why in CI_ALLOWED_SKIPS:
        if re.search(pattern, reason):
            return why
    return None


_ALLOWED_SEEN: dict[str, list[str]] = {}
_REFUSED_COLLECT: list[tuple[str, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not _ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    why = ci_skip_allowed(reason)
    if why is not None:
        _ALLOWED_SEEN.setdefault(why, []).append(f"{item.nodeid}: {reason}")
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI, and not on the allow-list (tests/conftest.py CI_ALLOWED_SKIPS): {reason}"
    )


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Module-level skips (pytest.importorskip at import): recorded here, they fail the session at the end."""
    if not _ci() or not report.skipped:
        return
    reason = _skip_reason(report)
    why = ci_skip_allowed(reason)
    if why is not None:
        _ALLOWED_SEEN.setdefault(why, []).append(f"{report.nodeid}: {reason}")
    else:
        _REFUSED_COLLECT.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _REFUSED_COLLECT and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ci():
        return
    if _ALLOWED_SEEN:
        terminalreporter.section("skips allowed under CI")
        for why, where in _ALLOWED_SEEN.items():
            terminalreporter.write_line(f"{len(where)} skipped, allowed because {why}:")
            for line in where[:5]:
                terminalreporter.write_line(f"    {line}")
            if len(where) > 5:
                terminalreporter.write_line(f"    ... and {len(where) - 5} more")
    if _REFUSED_COLLECT:
        terminalreporter.section("skips refused under CI", red=True)
        for nodeid, reason in _REFUSED_COLLECT:
            terminalreporter.write_line(
                f"{nodeid}: skipped at collection, not on the allow-list (tests/conftest.py): {reason}",
                red=True,
            )
