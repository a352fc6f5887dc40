"""The daemon at scale: 100 Modbus TCP devices x 100 holding registers every 10 s (1,000 values/s).

Same measurements as bench_daemon (CPU, RSS, threads, first reading, resume, drain), on a workload with many
devices and wide requests; the target is under 10 % of one core (`cpu_pct_of_core`). One simulator process
serves the 100 unit ids on one TCP port, so the 100 devices share one bus (one connection, one lock).
More devices than a bus can address (unit ids stop at 247) are spread over one simulator and one bus per 200
devices: `--devices 1000 --registers 10` is issue 24's 1,000 devices x 10 points on 5 buses.

    python -m bench.bench_scale [--quick] [--seconds N] [--outage N] [--runs N] [--devices N] [--registers N]
"""

from __future__ import annotations

import argparse

from bench.bench_daemon import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short run for CI (about 45 s)")
    ap.add_argument("--seconds", type=float, default=60, help="measured window (a multiple of the poll)")
    ap.add_argument("--outage", type=float, default=30)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--registers", type=int, default=100)
    ap.add_argument("--poll", type=float, default=10.0)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.outage, args.runs = 20, 10, 1
    report(args, "holding registers")


if __name__ == "__main__":
    main()
