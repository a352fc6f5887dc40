"""The .deb as a user meets it: `apt install ./fieldgate_*.deb` in a clean Debian bookworm root.

The root is made by debootstrap (minbase, from the Debian mirror apt uses on this machine) and cached for
the day (scripts/deb/bookworm-root); each run works on a copy, with /proc and /dev mounted and apt's
download cache shared between runs. Inside it, with chroot: install (Depends resolved by apt),
`fieldgate check` as the service's user, the unit checked from the host against the installed root,
readings written into /var/lib/fieldgate/buffer.db with the store, upgrade to a package with a bumped
version (every reading and the operator's edits still there), remove (config and buffer kept), purge
(all gone). Long (two package builds, an apt install): `--run-slow`, run once in CI by .ci/run with a
timeout. Needs root (debootstrap, chroot, mount).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__
from tests.broker import Broker, free_port
from tests.daemon import write_config
from tests.vectors import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CACHE = Path(os.environ.get("FIELDGATE_ROOT_CACHE", "/var/cache/fieldgate-test"))
VERSION = __version__
NEXT = f"{VERSION}.post1"  # sorts after VERSION for dpkg and for pip
ROWS = 500


def run(*cmd: str | Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, (
            f"{cmd}: rc={done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    first = run(REPO_ROOT / "scripts" / "build-deb", "--out", out).stdout.strip().splitlines()[-1]
    # The next version reuses the first package's wheels: offline, and the same dependencies.
    wheels = out / "wheels"
    run("dpkg-deb", "-x", first, out / "x")
    shutil.move(out / "x" / "opt" / "fieldgate" / "wheels", wheels)
    second = (
        run(REPO_ROOT / "scripts" / "build-deb", "--out", out, "--version", NEXT, "--wheels", wheels)
        .stdout.strip()
        .splitlines()[-1]
    )
    return {VERSION: Path(first), NEXT: Path(second)}


@contextlib.contextmanager
def debian_root(tmp: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap, chroot and mount")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap not installed (scripts/setup --dev installs it)")
    base = Path(run(REPO_ROOT / "scripts" / "deb" / "bookworm-root", timeout=1000).stdout.strip())
    root = tmp / "root"
    run("cp", "-a", "--reflink=auto", base, root)
    archives = CACHE / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    mounts = [
        ("proc", root / "proc", ["-t", "proc", "proc"]),
        ("dev", root / "dev", ["--bind", "/dev"]),
        ("archives", root / "var/cache/apt/archives", ["--bind", str(archives)]),
    ]
    done: list[Path] = []
    try:
        for _name, where, args in mounts:
            run("mount", *args, where)
            done.append(where)
        yield root
    finally:
        for where in reversed(done):
            run("umount", "-l", where, check=False)
        shutil.rmtree(root, ignore_errors=True)


def chroot(
    root: Path, *cmd: str, user: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = [
        "env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND=noninteractive",
        "LANG=C.UTF-8",
    ]
    spec = [f"--userspec={user}:{user}"] if user else []
    return run("chroot", *spec, root, *env, *cmd, check=check)


def apt(root: Path, *args: str) -> None:
    chroot(
        root,
        "apt-get",
        "-y",
        "-q",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        *args,
    )


STORE_WRITE = f"""
from pathlib import Path
from agent.pipeline.reading import Reading
from agent.pipeline.store import Store
s = Store(Path('/var/lib/fieldgate/buffer.db'), 16 * 1024 * 1024)
s.open()
s.append([Reading('meter', 'energy', 1_714_564_800_000 + i, float(i), 'kWh') for i in range({ROWS})])
s.close()
"""
STORE_READ = """
from pathlib import Path
from agent.pipeline.store import Store
s = Store(Path('/var/lib/fieldgate/buffer.db'), 16 * 1024 * 1024)
s.open()
rows = s.fetch(0, None, 100000)
print(len(rows), sorted(r.seq for r in rows) == list(range(1, len(rows) + 1)))
s.close()
"""


def test_apt_install_check_upgrade_remove_purge(tmp_path: Path, debs: dict[str, Path]) -> None:
    with debian_root(tmp_path) as root:
        for deb in debs.values():
            shutil.copy(deb, root / "tmp" / deb.name)
        apt(root, "update")
        apt(root, "install", f"/tmp/{debs[VERSION].name}")  # as a user would: Recommends (systemd) too

        # Installed as documented: program, unit, user, config (a conffile), profiles, directories.
        assert chroot(root, "fieldgate", "--version").stdout.strip() == f"fieldgate {VERSION}"
        assert (root / "opt/fieldgate/venv").resolve() == root / "opt/fieldgate/lib" / VERSION
        etc = root / "etc/fieldgate"
        assert (etc / "fieldgate.yaml").read_bytes() == (
            REPO_ROOT / "config/fieldgate.example.yaml"
        ).read_bytes()
        shipped = sorted(p.name for p in (REPO_ROOT / "drivers/modbus/profiles").glob("*.yaml"))
        assert sorted(p.name for p in (etc / "profiles").iterdir()) == shipped
        conffiles = chroot(root, "dpkg-query", "-W", "-f=${Conffiles}", "fieldgate").stdout
        assert "/etc/fieldgate/fieldgate.yaml" in conffiles
        assert "fieldgate:x:" in (root / "etc/passwd").read_text()
        assert (etc / "credentials").stat().st_mode & 0o777 == 0o700
        assert (etc / "fieldgate.yaml").stat().st_mode & 0o777 == 0o640
        # `fieldgate check` as the service's user: it can read its config and the profiles.
        checked = chroot(root, "fieldgate", "check", "-c", "/etc/fieldgate/fieldgate.yaml", user="fieldgate")
        assert "ok" in checked.stdout
        # Enabled at boot (systemctl in a chroot without systemd only writes the symlink).
        assert (root / "etc/systemd/system/multi-user.target.wants/fieldgate.service").is_symlink()

        verify_unit(root)
        # The opt-in drop-in for remote upgrades (docs/OPERATIONS.md) checks too: its launcher exists there.
        dropin = root / "etc/systemd/system/fieldgate.service.d/upgrade.conf"
        dropin.parent.mkdir(parents=True)
        shutil.copy(root / "opt/fieldgate/share/fieldgate-upgrade.conf", dropin)
        verify_unit(root)
        usage = chroot(root, "/opt/fieldgate/venv/bin/python", "-m", "agent.control.upgrade", check=False)
        assert usage.returncode == 2 and "launch ROOT" in usage.stderr
        dropin.unlink()

        # Readings in the buffer, written by the installed store as the service's user.
        chroot(root, "/opt/fieldgate/venv/bin/python", "-c", STORE_WRITE, user="fieldgate")
        assert chroot(root, "/opt/fieldgate/venv/bin/python", "-c", STORE_READ).stdout.split() == [
            str(ROWS),
            "True",
        ]
        # The operator's edits, which an upgrade must keep.
        config = (etc / "fieldgate.yaml").read_text().replace("gw-", "gw-edited-", 1)
        assert "gw-edited-" in config
        (etc / "fieldgate.yaml").write_text(config)
        (etc / "credentials" / "mqtt.password").write_text("secret\n")

        # Upgrade.
        apt(root, "install", f"/tmp/{debs[NEXT].name}")
        assert chroot(root, "fieldgate", "--version").stdout.strip() == f"fieldgate {NEXT}"
        assert (root / "opt/fieldgate/venv").resolve() == root / "opt/fieldgate/lib" / NEXT
        assert not (root / "opt/fieldgate/lib" / VERSION).exists()  # the old venv is gone
        assert chroot(root, "/opt/fieldgate/venv/bin/python", "-c", STORE_READ).stdout.split() == [
            str(ROWS),
            "True",
        ]
        assert (etc / "fieldgate.yaml").read_text() == config
        assert (etc / "credentials" / "mqtt.password").read_text() == "secret\n"
        chroot(root, "fieldgate", "check", "-c", "/etc/fieldgate/fieldgate.yaml", user="fieldgate")

        # The upgraded program runs as the service would: its daemon reaches a broker on this machine.
        run_installed_daemon(root, NEXT, tmp_path / "daemon.log")

        # Remove: the program goes, config and buffer stay.
        apt(root, "remove", "fieldgate")
        assert not (root / "opt/fieldgate").exists()
        assert not (root / "usr/bin/fieldgate").exists() and not (root / "usr/bin/fieldgate").is_symlink()
        assert not (root / "lib/systemd/system/fieldgate.service").exists()
        assert (etc / "fieldgate.yaml").read_text() == config
        assert (root / "var/lib/fieldgate/buffer.db").stat().st_size > 0
        status = chroot(root, "dpkg-query", "-W", "-f=${Status}", "fieldgate").stdout
        assert status == "deinstall ok config-files"

        # Purge: everything goes, the user too.
        apt(root, "purge", "fieldgate")
        assert not etc.exists()
        assert not (root / "var/lib/fieldgate").exists()
        assert "fieldgate:x:" not in (root / "etc/passwd").read_text()
        assert not (root / "etc/systemd/system/multi-user.target.wants/fieldgate.service").exists()


def verify_unit(root: Path) -> None:
    """systemd cannot run in the chroot, so the unit is checked from the host against the installed root:
    `systemd-analyze verify --root` resolves ExecStart= and friends inside it."""
    unit = root / "lib/systemd/system/fieldgate.service"
    assert unit.read_bytes() == (REPO_ROOT / "systemd/fieldgate.service").read_bytes()
    exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    binary = exec_start.split("=", 1)[1].split()[0]
    assert os.access(root / binary.lstrip("/"), os.X_OK), f"{binary} is not executable in the root"
    assert (root / binary.lstrip("/")).resolve().is_relative_to(root / "opt/fieldgate/lib")
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (scripts/setup --dev installs systemd)"
    done = run(analyze, "verify", f"--root={root}", "/lib/systemd/system/fieldgate.service", check=False)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "fieldgate.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def run_installed_daemon(root: Path, version: str, log_path: Path) -> None:
    """`fieldgate run` from the installed venv, as the service's user, against a Mosquitto on the host (the
    chroot shares the network): its retained status says online with the package's version, and SIGTERM
    stops it cleanly. Proves the bundled wheels make a daemon that runs, not only one that validates."""
    broker = Broker().start()
    daemon: subprocess.Popen[str] | None = None
    log = open(log_path, "w")  # noqa: SIM115 - the daemon's, closed below
    sub: subprocess.Popen[str] | None = None
    try:
        config = root / "etc/fieldgate/run-test.yaml"
        write_config(
            config,
            gateway="gw-deb",
            broker_port=broker.port,
            db=Path("/var/lib/fieldgate/run-test.db"),
            buses=f"  lan: {{type: modbus-tcp, host: 127.0.0.1, port: {free_port()}, timeout: 300ms}}",
            devices="  meter:\n    bus: lan\n    unit_id: 1\n    poll: 1s\n"
            "    points:\n      voltage: {table: input, address: 0, type: float32, unit: V}\n",
        )
        config.chmod(0o644)
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(broker.port), "-t", "fieldgate/gw-deb/status", "-C", "1", "-W", "90"],
            stdout=subprocess.PIPE,
            text=True,
        )
        daemon = subprocess.Popen(
            [
                "chroot",
                "--userspec=fieldgate:fieldgate",
                str(root),
                "env",
                "-i",
                "PATH=/usr/bin:/bin",
                "fieldgate",
                "run",
                "-c",
                "/etc/fieldgate/run-test.yaml",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out, _ = sub.communicate(timeout=120)
        assert out.strip(), f"no status from the installed daemon; it says: {daemon_output(daemon, log_path)}"
        status = json.loads(out)
        assert status["state"] == "online" and status["version"] == version, status
        daemon.terminate()
        code = daemon.wait(30)
        assert code == 0, daemon_output(daemon, log_path)
        daemon = None
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
            sub.wait()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        broker.cleanup()
        log.close()
        (root / "etc/fieldgate/run-test.yaml").unlink(missing_ok=True)


def daemon_output(daemon: subprocess.Popen[str], log_path: Path) -> str:
    if daemon.poll() is None:
        daemon.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(30)
    return log_path.read_text(errors="replace")[-3000:]
