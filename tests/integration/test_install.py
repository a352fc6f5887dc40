"""scripts/install.sh into a throwaway root: files in place, idempotent, edits kept, clean uninstall."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vectors import REPO_ROOT

INSTALL = REPO_ROOT / "scripts" / "install.sh"


def install(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["bash", str(INSTALL), "--prefix", str(root), "--no-venv", "--no-systemctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def test_install_twice_then_uninstall_then_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = install(root)
    etc = root / "etc" / "fieldgate"
    assert (root / "etc/systemd/system/fieldgate.service").read_bytes() == (
        REPO_ROOT / "systemd" / "fieldgate.service"
    ).read_bytes()
    assert (etc / "fieldgate.yaml").read_bytes() == (
        REPO_ROOT / "config" / "fieldgate.example.yaml"
    ).read_bytes()
    shipped = sorted(p.name for p in (REPO_ROOT / "drivers" / "modbus" / "profiles").glob("*.yaml"))
    assert shipped and sorted(p.name for p in (etc / "profiles").iterdir()) == shipped
    assert (etc / "credentials").stat().st_mode & 0o777 == 0o700
    assert (etc / "fieldgate.yaml").stat().st_mode & 0o777 == 0o640
    assert (root / "var/lib/fieldgate").is_dir()
    assert "wrote" in out and "fieldgate.yaml" in out

    # Idempotent: a second run changes nothing.
    before = snapshot(root)
    out = install(root)
    assert snapshot(root) == before
    assert "wrote" not in out

    # An upgrade keeps the operator's config and edited profiles; the shipped profile goes beside it.
    (etc / "fieldgate.yaml").write_text("gateway: {id: gw-edited}\n")
    edited = etc / "profiles" / shipped[0]
    edited.write_text("# tuned on site\n")
    (root / "var/lib/fieldgate/buffer.db").write_bytes(b"readings")
    out = install(root)
    assert (etc / "fieldgate.yaml").read_text() == "gateway: {id: gw-edited}\n"
    assert edited.read_text() == "# tuned on site\n"
    assert (etc / "profiles" / f"{shipped[0]}.new").read_bytes() == (
        REPO_ROOT / "drivers" / "modbus" / "profiles" / shipped[0]
    ).read_bytes()
    assert "kept your" in out

    # Uninstall: program and unit go; config and buffer stay.
    install(root, "--uninstall")
    assert not (root / "etc/systemd/system/fieldgate.service").exists()
    assert not (root / "opt/fieldgate").exists()
    assert (etc / "fieldgate.yaml").read_text() == "gateway: {id: gw-edited}\n"
    assert (root / "var/lib/fieldgate/buffer.db").read_bytes() == b"readings"
    install(root, "--uninstall")  # again: nothing left to remove, still fine

    install(root, "--uninstall", "--purge")
    assert not etc.exists()
    assert not (root / "var/lib/fieldgate").exists()


def test_bad_usage_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(INSTALL), "--prefix", str(tmp_path), "--purge"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "--purge goes with --uninstall" in done.stderr
    done = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "unknown option --frobnicate" in done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_passes_check_systemd() -> None:
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "check-systemd")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: clean" in done.stdout and "security: exposure" in done.stdout
