"""Simulated Modbus units on a pymodbus server (TCP, RTU-over-TCP, RTU on a serial path): tests, demo, bench.

Each unit has its own coil/discrete/input/holding tables (0-based, as on the wire),
can be made dead (no answer) or answer exception 2 beyond a limit or inside holes,
and the server counts every request it sees per unit and function code.
Two behaviours move on their own for the demo: an SDM630-like energy meter and a
street-lamp controller (the `streetlamp-controller` profile's register map).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from drivers.modbus import codec

TABLE_SIZE = 65536
_FC_TABLE = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}


@dataclass
class SimUnit:
    """One simulated unit: four tables, a kind ("plain", "energy-meter", "lamp-controller") and its faults."""

    kind: str = "plain"
    dead: bool = False
    illegal_from: int | None = None  # any access at or beyond this address answers exception 2
    holes: set[int] = field(default_factory=set)  # addresses (any register table) answering exception 2
    tables: dict[str, list[Any]] = field(default_factory=dict)
    state: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in ("coil", "discrete"):
            self.tables.setdefault(t, [False] * TABLE_SIZE)
        for t in ("input", "holding"):
            self.tables.setdefault(t, [0] * TABLE_SIZE)

    def illegal(self, table: str, address: int, count: int) -> bool:
        end = address + count
        if address < 0 or end > TABLE_SIZE:
            return True
        if self.illegal_from is not None and end > self.illegal_from:
            return True
        return table in ("input", "holding") and any(address <= h < end for h in self.holes)

    def set(self, table: str, address: int, values: Iterable[Any]) -> None:
        vals = list(values)
        self.tables[table][address : address + len(vals)] = vals

    def get(self, table: str, address: int, count: int = 1) -> list[Any]:
        return list(self.tables[table][address : address + count])

    def set_value(
        self, table: str, address: int, value: Any, type_: str, order: str = "ABCD", **kw: Any
    ) -> None:
        """Store a typed value the way a device would (codec.encode, same orders as the driver)."""
        self.set(table, address, codec.encode(value, type_, order, **kw))


class _ServerContext(ModbusServerContext):
    """The units' datastore, addressed by unit id and 0-based addresses, as on the wire.

    pymodbus 3.16 serves a `ModbusServerContext` in one of two ways: it converts the `ModbusDeviceContext`s
    it holds to its new `SimDevice` model (fixed blocks, which can neither be silent for one unit nor change
    between requests), or, for its own older `ModbusSimulatorContext`, it calls `async_getValues` and
    `async_setValues` with the unit id (`old_simulator`). We take that second path: a dead or unknown unit
    raises NoSuchIdException, which the server (ignore_missing_devices) answers with silence, as a unit absent
    from an RS-485 line does. pymodbus is pinned to 3.16.x for this (docs/MODBUS.md, pymodbus upgrade).
    """

    def __init__(self, sim: ModbusSim) -> None:
        # Not super().__init__(): it requires a device context and logs a deprecation warning.
        self.sim = sim
        self.simdevices: list[Any] = []  # none for pymodbus to convert
        self.old_simulator = True  # the server calls async_getValues/async_setValues below

    def _unit(self, device_id: int) -> SimUnit:
        unit = self.sim.units.get(device_id)
        if unit is None or unit.dead:
            raise NoSuchIdException(f"unit {device_id} does not answer")
        return unit

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        unit = self._unit(device_id)
        table = _FC_TABLE.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if unit.illegal(table, address, count):
            return ExcCodes.ILLEGAL_ADDRESS
        return unit.get(table, address, count)

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        unit = self._unit(device_id)
        table = _FC_TABLE.get(func_code)
        if table not in ("coil", "holding"):
            return ExcCodes.ILLEGAL_FUNCTION
        if unit.illegal(table, address, len(values)):
            return ExcCodes.ILLEGAL_ADDRESS
        unit.set(table, address, values)
        return None

    def device_ids(self) -> list[int]:
        """The units a broadcast (unit 0) reaches."""
        return sorted(uid for uid, unit in self.sim.units.items() if not unit.dead)


class ModbusSim:
    """A pymodbus server holding several SimUnits; `requests` counts (unit_id, function_code) seen.

    `sequence` keeps the order of the last requests (unit_id, function_code), for fairness tests.
    """

    def __init__(self, units: Mapping[int, SimUnit | str] | Iterable[int] = (1,)) -> None:
        items = units.items() if isinstance(units, Mapping) else ((u, "plain") for u in units)
        self.units: dict[int, SimUnit] = {
            uid: (u if isinstance(u, SimUnit) else SimUnit(kind=u)) for uid, u in items
        }
        self.requests: Counter[tuple[int, int]] = Counter()
        self.sequence: deque[tuple[int, int]] = deque(maxlen=10_000)  # bounded: the demo runs for days
        self.port = 0
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        for unit in self.units.values():
            init_behaviour(unit)

    def _trace_pdu(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            key = (int(pdu.dev_id), int(pdu.function_code))
            self.requests[key] += 1
            self.sequence.append(key)
        return pdu

    def count(self, unit_id: int | None = None, function_code: int | None = None) -> int:
        return sum(
            n
            for (u, fc), n in self.requests.items()
            if (unit_id is None or u == unit_id) and (function_code is None or fc == function_code)
        )

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0, *, rtu_framing: bool = False) -> int:
        """Listen on TCP (Modbus TCP, or RTU frames over TCP); returns the bound port."""
        self._server = ModbusTcpServer(
            _ServerContext(self),
            framer=FramerType.RTU if rtu_framing else FramerType.SOCKET,
            address=(host, port),
            ignore_missing_devices=True,
            trace_pdu=self._trace_pdu,
        )
        await self._server.serve_forever(background=True)
        listener = cast(asyncio.Server, self._server.transport)
        self.port = int(listener.sockets[0].getsockname()[1])
        return self.port

    async def start_rtu(
        self, path: str, baudrate: int = 9600, parity: str = "N", stopbits: int = 1, bytesize: int = 8
    ) -> None:
        """Serve RTU on a serial path (one end of a pty pair, a USB adapter)."""
        self._server = ModbusSerialServer(
            _ServerContext(self),
            framer=FramerType.RTU,
            port=path,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            ignore_missing_devices=True,
            trace_pdu=self._trace_pdu,
        )
        await self._server.serve_forever(background=True)

    def start_behaviours(self, period: float = 1.0) -> None:
        """Move the meter and lamp values every `period` seconds (the demo)."""
        self._ticker = asyncio.create_task(self._tick(period), name="modbus-sim-behaviours")

    async def _tick(self, period: float) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for unit in self.units.values():
                step_behaviour(unit, now - last)
            last = now

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None


# --- behaviours -------------------------------------------------------------------------------------

# SDM630 input registers (PROTOCOLS.md §3), float32 ABCD.
SDM = {
    "v1": 0x00,
    "v2": 0x02,
    "v3": 0x04,
    "i1": 0x06,
    "i2": 0x08,
    "i3": 0x0A,
    "p1": 0x0C,
    "p2": 0x0E,
    "p3": 0x10,
    "pf1": 0x1E,
    "pf2": 0x20,
    "pf3": 0x22,
    "v_avg": 0x2A,
    "i_sum": 0x30,
    "p_total": 0x34,
    "pf_total": 0x3E,
    "freq": 0x46,
    "import_kwh": 0x48,
    "export_kwh": 0x4A,
    "total_kwh": 0x156,
}
# Street-lamp controller (drivers/modbus/profiles/streetlamp-controller.yaml).
LAMP_RATED_W = 100.0


def init_behaviour(unit: SimUnit) -> None:
    if unit.kind == "energy-meter":
        unit.state.update(kwh=1234.5)
        step_behaviour(unit, 0.0)
    elif unit.kind == "lamp-controller":
        unit.state.update(wh=52_000.0, hours=8_760.0)
        unit.set("coil", 0, [True])
        unit.set("holding", 0, [80])
        step_behaviour(unit, 0.0)


def step_behaviour(unit: SimUnit, dt: float) -> None:
    """Advance a unit's physics by dt seconds."""
    t = time.time()
    if unit.kind == "energy-meter":
        total = 0.0
        for ph in (1, 2, 3):
            v = 230.0 + 2.0 * math.sin(t / 30 + ph) + random.uniform(-0.3, 0.3)
            i = 4.0 + ph + 1.5 * math.sin(t / 60 + 2 * ph)
            pf = 0.95
            p = v * i * pf
            total += p
            for key, value in ((f"v{ph}", v), (f"i{ph}", i), (f"p{ph}", p), (f"pf{ph}", pf)):
                unit.set_value("input", SDM[key], value, "float32")
        unit.state["kwh"] += total * dt / 3_600_000
        v_avg = sum(codec.decode(unit.get("input", SDM[f"v{k}"], 2), "float32") for k in (1, 2, 3)) / 3  # type: ignore[misc]
        for key, value in (
            ("v_avg", v_avg),
            ("p_total", total),
            ("pf_total", 0.95),
            ("freq", 50.0 + random.uniform(-0.05, 0.05)),
            ("import_kwh", unit.state["kwh"]),
            ("export_kwh", 0.0),
            ("total_kwh", unit.state["kwh"]),
        ):
            unit.set_value("input", SDM[key], value, "float32")
    elif unit.kind == "lamp-controller":
        on = bool(unit.get("coil", 0)[0])
        dim = max(0, min(100, int(unit.get("holding", 0)[0])))
        failed = bool(unit.state.get("lamp_failure", 0.0))
        power = (
            0.0 if (not on or failed or dim == 0) else LAMP_RATED_W * dim / 100 + random.uniform(-0.5, 0.5)
        )
        unit.state["wh"] += power * dt / 3600
        if power > 0:
            unit.state["hours"] += dt / 3600
        unit.set("input", 0, [max(0, round(power * 10))])  # power, 0.1 W
        unit.set_value("input", 1, int(unit.state["wh"]), "uint32")  # energy, Wh
        unit.set_value("input", 3, int(unit.state["hours"] * 10), "uint32")  # burning hours, 0.1 h
        unit.set("input", 5, [round((230.0 + random.uniform(-1, 1)) * 10)])  # mains voltage, 0.1 V
        unit.set("input", 6, [1 if failed else 0])  # status bits: b0 lamp failure, b1 driver, b2 temperature


@dataclass
class SimHandle:
    """A running simulator: where it listens and how to stop it."""

    sim: ModbusSim
    host: str
    port: int

    async def aclose(self) -> None:
        await self.sim.aclose()


async def start_tcp_simulator(
    host: str = "127.0.0.1", port: int = 0, units: Mapping[int, str] | None = None
) -> SimHandle:
    """Start the demo's units (default: 1 = energy meter, 2 = lamp controller), values moving every second."""
    sim = ModbusSim(dict(units) if units is not None else {1: "energy-meter", 2: "lamp-controller"})
    bound = await sim.start_tcp(host, port)
    sim.start_behaviours(1.0)
    return SimHandle(sim, host, bound)


def _parse_units(text: str) -> dict[int, SimUnit]:
    units: dict[int, SimUnit] = {}
    for part in text.split(","):
        uid, _, kind = part.partition(":")
        units[int(uid)] = SimUnit(kind=kind or "plain")
    return units


async def _main(args: argparse.Namespace) -> None:
    sim = ModbusSim(_parse_units(args.units))
    for uid in args.dead:
        sim.units[uid].dead = True
    for unit in sim.units.values():
        unit.illegal_from = args.illegal_from
    if args.rtu:
        await sim.start_rtu(args.rtu, args.baudrate, args.parity)
        where = f"{args.rtu} at {args.baudrate} baud"
    else:
        port = await sim.start_tcp(args.host, args.port, rtu_framing=args.rtu_framing)
        where = f"{args.host}:{port}"
    sim.start_behaviours(1.0)
    print(f"modbus simulator listening on {where}, units {sorted(sim.units)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Simulated Modbus units (TCP, RTU-over-TCP or RTU on a serial path)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port, printed)")
    parser.add_argument(
        "--units",
        default="1:energy-meter,2:lamp-controller",
        help="ID[:KIND],... with KIND plain, energy-meter or lamp-controller",
    )
    parser.add_argument("--dead", type=int, action="append", default=[], help="a unit id that never answers")
    parser.add_argument(
        "--illegal-from", type=int, default=None, help="exception 2 at and beyond this address"
    )
    parser.add_argument("--rtu-framing", action="store_true", help="RTU frames over TCP")
    parser.add_argument("--rtu", metavar="PATH", help="serve RTU on this serial path instead of TCP")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", default="N", choices=["N", "E", "O"])
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
