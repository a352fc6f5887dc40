"""The CI skip policy of tests/conftest.py, checked on a tiny test file run by a separate pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI_ALLOWED_SKIPS, ci_skip_allowed
from tests.daemon import REPO

TESTS = """
import pytest

def test_passes():
    assert True

def test_unlisted_skip():
    pytest.skip("some-tool is not installed")

def test_listed_skip():
    pytest.skip("could not import 'bumble': No module named 'bumble'")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_xfail():
    assert False
"""


def run(tmp_path: Path, source: str, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci:
        env["CI"] = "true"
    # tests/conftest.py loaded as a plugin (-p): the tiny file lives outside tests/, with no config file
    args = ["-p", "tests.conftest", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path)]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args, str(tmp_path / "test_tiny.py"), "-q"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_under_ci_an_unlisted_skip_fails_and_a_listed_one_is_printed_with_its_reason(tmp_path: Path) -> None:
    done = run(tmp_path, TESTS, ci=True)
    out = done.stdout
    assert done.returncode == 1, out
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in out, out
    assert "FAILED" in out and "test_unlisted_skip" in out and "some-tool is not installed" in out
    assert "not on the allow-list" in out
    # the allowed skip is listed with its reason and why it is allowed
    assert "skips allowed under CI" in out
    assert "test_listed_skip: could not import 'bumble'" in out
    assert "BLE is an optional extra" in out


def test_without_ci_skips_are_plain_skips(tmp_path: Path) -> None:
    done = run(tmp_path, TESTS, ci=False)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in done.stdout
    assert "skips allowed under CI" not in done.stdout


def test_under_ci_a_module_level_skip_fails_the_session(tmp_path: Path) -> None:
    source = 'import pytest\npytest.importorskip("no_such_module_xyz")\n\ndef test_x():\n    pass\n'
    done = run(tmp_path, source, ci=True)
    assert done.returncode == 1, done.stdout
    assert "skips refused under CI" in done.stdout and "no_such_module_xyz" in done.stdout
    assert run(tmp_path, source, ci=False).returncode == pytest.ExitCode.NO_TESTS_COLLECTED


def test_under_ci_an_allowed_module_level_skip_passes(tmp_path: Path) -> None:
    source = "import pytest\npytest.skip(\"could not import 'bleak': gone\", allow_module_level=True)\n"
    done = run(tmp_path, source, ci=True)
    assert done.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, (
        done.stdout
    )  # the only module skipped: not 1
    assert "allowed because BLE is an optional extra" in done.stdout


@pytest.mark.parametrize(
    ("reason", "allowed"),
    [
        ("could not import 'bumble': No module named 'bumble'", True),
        ("could not import 'bleak': x", True),
        ("mount -t tmpfs not permitted here: mount: permission denied", True),
        ("a tiny filesystem needs root (mount -t tmpfs)", True),
        ("long variant: run with --run-slow", True),
        ("libfaketime not installed (apt-get install faketime)", False),
        ("mosquitto_passwd not installed", False),
        ("chromium is not installed (apt-get install -y chromium)", False),
        ("could not import 'playwright.async_api'", False),
    ],
)
def test_the_allow_list(reason: str, allowed: bool) -> None:
    assert (ci_skip_allowed(reason) is not None) is allowed


def test_every_allowed_skip_says_why() -> None:
    assert all(pattern and len(why) > 20 for pattern, why in CI_ALLOWED_SKIPS)
