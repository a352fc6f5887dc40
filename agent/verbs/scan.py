"""`fieldgate scan modbus|ble|serial`: find devices (Modbus unit ids, BLE advertisers, serial ports)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from agent.errors import FieldgateError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "scan", parents=[common], help="find devices: modbus unit ids, BLE advertisers, serial ports"
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    # -c works before or after the kind; SUPPRESS keeps the kind's parser from overwriting a value
    # given before it (`scan -c FILE modbus --bus B`) with its own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS, help="config file")

    m = kinds.add_parser(
        "modbus", parents=[common], help="sweep Modbus unit ids on a serial line or a TCP host"
    )
    where = m.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial port (RTU), e.g. /dev/serial/by-id/usb-FTDI_...")
    where.add_argument("--host", help="Modbus TCP device or gateway (HOST or HOST:PORT)")
    where.add_argument("--bus", help="a bus of the config file")
    m.add_argument("--units", default="1-247", help="unit ids: 1-247, or 1,2,10-20 (default 1-247)")
    m.add_argument("--baudrates", default="9600", help="comma-separated (serial), e.g. 9600,19200")
    m.add_argument("--parities", default="N", help="comma-separated among N,E,O (serial)")
    m.add_argument("--stopbits", type=int, default=1, choices=[1, 2])
    m.add_argument("--timeout", default="200ms", help="per probe (default 200ms)")
    m.add_argument("--rtu-over-tcp", action="store_true", help="RTU framing over TCP (serial device servers)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=scan_modbus)

    b = kinds.add_parser(
        "ble", parents=[common], help="list BLE advertisers, decoded when a decoder knows them"
    )
    b.add_argument("--seconds", type=float, default=10.0)
    b.add_argument("--adapter", default="hci0")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=scan_ble)

    s = kinds.add_parser("serial", parents=[common], help="list serial ports, with their stable by-id names")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=scan_serial)


def parse_units(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    if not out or min(out) < 0 or max(out) > 255:
        raise ValueError("unit ids are 0-255")
    return out


class ProgressBar:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.tty or total <= 0:
            return
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def scan_modbus(args: argparse.Namespace) -> int:
    from agent.config.units import parse_duration
    from drivers.modbus import scan

    try:
        units = parse_units(args.units)
        timeout = parse_duration(args.timeout)
        baudrates = [int(x) for x in args.baudrates.split(",")]
        parities = [x.strip().upper() for x in args.parities.split(",")]
        if not set(parities) <= {"N", "E", "O"}:
            raise ValueError(f"parities are N, E or O (got {args.parities})")
    except ValueError as exc:
        print(f"scan modbus: {exc}", file=sys.stderr)
        return 2
    host, port, serial, rtu_tcp = args.host, 502, args.port, args.rtu_over_tcp
    if args.bus:
        from agent.config.loader import load_config

        bus = load_config(args.config).buses.get(args.bus)
        if bus is None:
            print(f"scan modbus: no bus '{args.bus}' in {args.config}", file=sys.stderr)
            return 2
        if bus.type == "modbus-rtu":
            serial, baudrates, parities = bus.port, [bus.baudrate], [bus.parity]
        else:
            host, port, rtu_tcp = bus.host, bus.port, bus.type == "modbus-rtu-tcp"
    elif host and ":" in host:
        host, port_text = host.rsplit(":", 1)
        port = int(port_text)
    bar = ProgressBar("scanning")
    try:
        if serial:
            hits = asyncio.run(
                scan.scan_serial(serial, units, baudrates, parities, timeout, bar, args.stopbits)
            )
        else:
            hits = asyncio.run(scan.scan_tcp(host, port, units, timeout, bar, rtu_tcp))
    except FieldgateError as exc:
        print(f"scan modbus: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps({"found": [asdict(h) for h in hits]}).decode())
        return 0
    if not hits:
        print("no unit answered")
    for h in hits:
        line = f"unit {h.unit_id:>3}"
        if h.baudrate:
            line += f"  {h.baudrate} baud {h.parity}"
        print(f"{line}  {h.detail}")
    return 0


def scan_ble(args: argparse.Namespace) -> int:
    try:
        from drivers.ble.scan import scan_ble as run_scan
    except ImportError as exc:
        print(
            f"scan ble: BLE support is not installed ({exc}): pip install 'fieldgate[ble]'", file=sys.stderr
        )
        return 1

    def heard(entry: dict[str, Any]) -> None:
        if not args.json:
            print(f"heard {entry.get('address')}  {entry.get('name') or ''}", file=sys.stderr)

    try:
        found = asyncio.run(run_scan(args.seconds, heard, adapter=args.adapter))
    except FieldgateError as exc:
        print(f"scan ble: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps({"found": found}).decode())
        return 0
    print(format_ble(found))
    return 0


def format_ble(found: list[dict[str, Any]]) -> str:
    """The table of `scan ble`: one line per advertiser (entries of drivers.ble.scan.describe)."""
    if not found:
        return "no BLE advertiser heard (is the adapter up? `bluetoothctl show`)"
    lines: list[str] = []
    for e in found:
        rssi = e.get("rssi")
        rssi_text = f"{rssi:>4} dBm" if rssi is not None else "   ? dBm"
        decoder = e.get("decoder")
        if e.get("encrypted"):
            detail = f"{decoder}: encrypted (needs its bindkey)"
        elif decoder:
            values = ", ".join(f"{k}={v}" for k, v in (e.get("values") or {}).items())
            detail = f"{decoder}: {values}"
        else:
            detail = ""
        lines.append(f"{e.get('address')}  {rssi_text}  {e.get('name') or '-':<20} {detail}".rstrip())
    return "\n".join(lines)


def serial_ports() -> list[dict[str, Any]]:
    """Serial ports with their stable /dev/serial/by-id names (USB adapters are renumbered at boot)."""
    by_id: dict[str, str] = {}
    byid_dir = Path("/dev/serial/by-id")
    if byid_dir.is_dir():
        for link in byid_dir.iterdir():
            by_id[str(link.resolve())] = str(link)
    ports: list[dict[str, Any]] = []
    try:
        from serial.tools import list_ports

        for info in list_ports.comports():
            ports.append(
                {
                    "device": info.device,
                    "by_id": by_id.get(info.device),
                    "description": info.description,
                    "hwid": info.hwid,
                }
            )
    except ImportError:
        for dev in sorted(Path("/dev").glob("tty[UA][SCM]*")):
            ports.append({"device": str(dev), "by_id": by_id.get(str(dev)), "description": "", "hwid": ""})
    return ports


def scan_serial(args: argparse.Namespace) -> int:
    ports = serial_ports()
    if args.json:
        print(orjson.dumps({"found": ports}).decode())
        return 0
    if not ports:
        print("no serial port found (is the USB adapter plugged in? `dmesg | tail`)")
    for p in ports:
        print(f"{p['by_id'] or p['device']}\n    -> {p['device']}  {p['description']}")
    return 0
