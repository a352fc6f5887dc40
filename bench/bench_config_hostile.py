"""What a broken or hostile config file costs `fieldgate check`: wall time and peak RSS of the child.

Runs `python -m agent.cli check -c FILE` once per file of tests/hostile_configs.py (plus a valid 100 devices x
100 points config for scale) and prints a table and JSON: exit code, seconds, peak RSS (MiB) and the RSS
above the same command on a minimal valid file ("extra"). The figures are in docs/SPEC.md §2 and the report
of issue 17; tests/unit/test_loader_hostile.py checks the structural bounds that keep them low.

    .venv/bin/python -m bench.bench_config_hostile [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.hostile_configs import HOSTILE, VALID

REPO = Path(__file__).resolve().parents[1]


def large_config() -> bytes:
    lines = [VALID.decode().rstrip("\n"), "buses: {lan: {type: modbus-tcp, host: 127.0.0.1}}", "devices:"]
    for d in range(100):
        lines.append(f"  dev{d}:\n    bus: lan\n    unit_id: {d + 1}\n    poll: 10s\n    points:")
        for p in range(100):
            lines.append(
                f"      p{p}: {{table: holding, address: {p * 2}, type: float32, unit: W, scale: 0.1}}"
            )
    return ("\n".join(lines) + "\n").encode()


def measure(path: Path) -> tuple[int, float, float, str]:
    """(exit code, -1 on a traceback; seconds; peak RSS in MiB; what it said) of one `fieldgate check`.
    Run it in a fresh interpreter (measure_isolated): ru_maxrss of children is the largest child's."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=600,
    )
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    traceback = "Traceback" in done.stdout + done.stderr
    first = (done.stdout.splitlines() or [""])[0].split(": ", 1)[-1][:70]
    return -1 if traceback else done.returncode, seconds, rss, first


def measure_isolated(path: Path) -> tuple[int, float, float, str]:
    """The same in a fresh interpreter, so that ru_maxrss is this child's alone."""
    code = (
        "import sys, json; from bench.bench_config_hostile import measure; from pathlib import Path;"
        "print(json.dumps(measure(Path(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        check=True,
    ).stdout
    rc, seconds, rss, first = json.loads(out)
    return int(rc), float(seconds), float(rss), str(first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument(
        "--quick", action="store_true", help="accepted for scripts/bench: the run is short already"
    )
    args = parser.parse_args(argv)
    cases = {
        "valid-minimal": lambda: VALID,
        **{k: v[0] for k, v in HOSTILE.items()},
        "valid-100x100": large_config,
    }
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name, make in cases.items():
            path = Path(d) / "fieldgate.yaml"
            path.write_bytes(make())
            rc, seconds, rss, first = measure_isolated(path)
            results.append({"case": name, "bytes": path.stat().st_size, "exit": rc, "s": round(seconds, 2),
                            "rss_mib": round(rss, 1), "says": first})  # fmt: skip
    base = results[0]["rss_mib"]
    for r in results:
        r["extra_mib"] = round(float(r["rss_mib"]) - float(base), 1)
    print(f"{'case':24} {'bytes':>9} {'exit':>4} {'s':>6} {'RSS MiB':>8} {'extra':>6}  says")
    for r in results:
        print(
            f"{r['case']:24} {r['bytes']:>9} {r['exit']:>4} {r['s']:>6} {r['rss_mib']:>8} {r['extra_mib']:>6}  {r['says']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
