"""The Modbus driver: plans a device's due points into requests, runs them on its shared bus, decodes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent import registry
from agent.driver import Driver, DriverContext, PointSpec
from agent.errors import ConfigError, DecodeError, DeviceProtocolError, PointError, WriteRefused
from agent.pipeline.reading import Reading, Value, now_ms
from drivers.modbus import codec
from drivers.modbus.bus import BusSession, ModbusBus, ModbusExceptionResponse
from drivers.modbus.config import ModbusDeviceConfig, ModbusPoint
from drivers.modbus.planner import Barrier, Limits, PlannedPoint, ReadRequest, plan, split_in_halves

ILLEGAL_DATA_ADDRESS = 2


def bus_for(context: DriverContext, bus_name: str) -> ModbusBus:
    """The one ModbusBus of a bus name, shared by every device on it."""
    if bus_name not in context.buses:
        known = ", ".join(sorted(context.buses)) or "none"
        raise ConfigError([f"unknown bus '{bus_name}' (buses: {known})"])
    config = context.buses[bus_name]
    return context.shared.get(registry.bus_resource(bus_name), lambda: ModbusBus(bus_name, config))


@dataclass(frozen=True, slots=True)
class _Decoder:
    """How to turn one point's registers into its value, resolved from its config once.

    Shared: points decoded the same way (type, order, scale, unit...) share one instance (`of` interns them),
    so 10,000 uint16 points hold one decoder, not 10,000."""

    bits: bool  # a coil or discrete input
    type: str
    order: str
    scale: float
    offset: float
    bit: int | None
    length: int | None
    unit: str | None
    # A one-register integer read as is (no byte swap, scale, offset or bit): the commonest point by far,
    # decoded inline by _decode_request (the register is the value; int16 folds above 0x7fff).
    plain: bool = False
    signed: bool = False

    @classmethod
    def of(cls, point: ModbusPoint) -> _Decoder:
        kind = point.effective_type() if point.bit is None else "uint16"
        bits = point.table in ("coil", "discrete")
        plain = (
            not bits
            and point.bit is None
            and kind in ("uint16", "int16")
            and point.order in ("ABCD", "CDAB")
            and point.scale == 1.0
            and point.offset == 0.0
        )
        dec = cls(
            bits,
            kind,
            point.order,
            point.scale,
            point.offset,
            point.bit,
            point.length,
            point.unit,
            plain,
            kind == "int16",
        )
        return _DECODERS.setdefault(dec, dec)

    def decode(self, registers: list[int]) -> Value:
        if self.bits:
            return bool(registers[0])
        return codec.decode(
            registers,
            self.type,
            self.order,
            scale=self.scale,
            offset=self.offset,
            bit=self.bit,
            length=self.length,
        )


# Every distinct decoder in use, by value (a handful per gateway: types x orders x scales x units).
_DECODERS: dict[_Decoder, _Decoder] = {}


class ModbusDriver(Driver[ModbusDeviceConfig]):
    """One Modbus unit on a bus; requests are planned per cycle and merged across small holes."""

    name = "modbus"

    def __init__(self, device: str, config: ModbusDeviceConfig, context: DriverContext) -> None:
        # `profile:` was merged into `points` by the config loader (agent/config/loader.py), with file positions.
        super().__init__(device, config, context)
        # The config's own dict (frozen models, never changed): not a copy per device.
        self._points: Mapping[str, ModbusPoint] = config.points
        # Per point, what planning and decoding need, resolved once (the hot path never asks the config
        # models): where it is, and its decoder (shared between points decoded alike).
        self._planned = {
            n: (PlannedPoint(n, p.table, p.address, p.register_count()), _Decoder.of(p))
            for n, p in self._points.items()
        }
        self._limits = Limits(config.max_registers_per_request, config.max_bits_per_request, config.max_gap)
        # Points by poll interval: the points of one interval are always due together (read together, they
        # share their last read), so a cycle asks one clock per interval, not one per point.
        groups: dict[float, list[str]] = {}
        for n, p in self._points.items():
            groups.setdefault(p.poll if p.poll is not None else config.poll, []).append(n)
        self._groups: list[tuple[float, tuple[str, ...]]] = [
            (every, tuple(ns)) for every, ns in groups.items()
        ]
        self._cycle = min([config.poll, *groups])
        self._last_read: list[float | None] = [None] * len(self._groups)  # per group: when it was read last
        self.barriers: set[Barrier] = set()  # learned splits (exception 2 on a merged request); only grows
        self._plans: dict[tuple[tuple[str, ...], int], list[ReadRequest]] = {}
        self._bus: ModbusBus | None = None
        self.clock = time.monotonic  # replaceable in tests (per-point poll due times)
        self.requests_last_cycle = 0

    @property
    def bus(self) -> ModbusBus:
        if self._bus is None:
            self._bus = bus_for(self.context, self.config.bus)
        return self._bus

    async def open(self) -> None:
        _ = self.bus  # resolves the bus now so a config mistake shows at start; connects lazily

    def cycle_interval(self) -> float:
        return self._cycle

    def points(self) -> dict[str, PointSpec]:
        return {
            n: PointSpec(
                n, p.effective_type(), p.unit, p.writable, p.min, p.max, p.scale != 1.0 or p.offset != 0.0
            )
            for n, p in self._points.items()
        }

    def _due(self, now: float) -> list[int]:
        """The groups (by interval) due now. Half a cycle of tolerance so that a point due every 2nd cycle
        is not pushed to the 3rd by jitter."""
        slack = self._cycle / 2
        last = self._last_read
        return [
            i
            for i, (every, _) in enumerate(self._groups)
            if (t := last[i]) is None or now - t >= every - slack
        ]

    async def read(self) -> list[Reading]:
        now = self.clock()
        due = self._due(now)
        groups = self._groups
        names = groups[due[0]][1] if len(due) == 1 else tuple(n for i in due for n in groups[i][1])
        readings = await self._read_names(names)
        for i in due:
            self._last_read[i] = now
        return readings

    async def read_points(self, names: list[str]) -> list[Reading]:
        for n in names:
            if n not in self._points:
                raise PointError(
                    n, f"unknown point (points of {self.device}: {', '.join(sorted(self._points))})"
                )
        return await self._read_names(names or list(self._points))

    async def _read_names(self, names: Iterable[str]) -> list[Reading]:
        self.point_errors = {}
        self.requests_last_cycle = 0
        requests = self._plan(tuple(names))
        readings: list[Reading] = []
        answered = [0]
        for request in requests:
            await self._run(request, readings, answered)
        if requests and not answered[0]:
            # not one request was answered with data: the device as a whole is failing for us
            first = next(iter(self.point_errors.values()), "no answer")
            raise DeviceProtocolError(f"{self.device}: every request failed: {first}")
        return readings

    def _plan(self, names: tuple[str, ...]) -> list[ReadRequest]:
        """The requests for these points, planned once per set of points (and again when a barrier is
        learned): a device whose points share one interval asks the same plan every cycle."""
        key = (names, len(self.barriers))
        requests = self._plans.get(key)
        if requests is None:
            if len(self._plans) >= 64:  # points with many intervals: bounded, the oldest plans go first
                del self._plans[next(iter(self._plans))]
            requests = self._plans[key] = plan(
                (self._planned[n][0] for n in names), self._limits, self.barriers
            )
        return requests

    async def _run(self, request: ReadRequest, readings: list[Reading], answered: list[int]) -> bool:
        """Run one request; on exception 2, split it in halves (recursively). True if it went through whole.

        A split boundary is learned (kept as a barrier) only when both halves then went
        through whole: that proves the two cannot be read together. A point refused on
        its own is isolated by barriers on both sides and reported in `point_errors`.
        DeviceUnreachable propagates: a dead unit costs one timeout per cycle, not one per request.
        """
        try:
            self.requests_last_cycle += 1
            values = await self.bus.read(self.config.unit_id, request.table, request.address, request.count)
        except ModbusExceptionResponse as exc:
            if exc.code == ILLEGAL_DATA_ADDRESS:
                try:
                    halves, barrier = split_in_halves(request)
                except ValueError:
                    halves = []
                if halves:
                    left = await self._run(halves[0], readings, answered)
                    right = await self._run(halves[1], readings, answered)
                    if left and right:
                        self.barriers.add(barrier)
                    return False
            for p in request.points:
                self.point_errors[p.name] = str(exc)
                if exc.code == ILLEGAL_DATA_ADDRESS:
                    self.barriers.update({(p.table, p.address), (p.table, p.end)})
            return False
        answered[0] += 1
        readings.extend(self._decode_request(request, values, now_ms()))
        return True

    def _decode_request(self, request: ReadRequest, values: list[int] | list[bool], ts: int) -> list[Reading]:
        out: list[Reading] = []
        device, planned, base = self.device, self._planned, request.address
        for pp in request.points:
            dec = planned[pp.name][1]
            if dec.plain:  # one register, taken as is: no slice, no codec call (hot path)
                v = int(values[pp.address - base])
                if 0 <= v <= 0xFFFF:
                    out.append(
                        Reading(
                            device, pp.name, ts, v - 0x10000 if dec.signed and v >= 0x8000 else v, dec.unit
                        )
                    )
                    continue
            chunk = values[pp.address - base : pp.end - base]
            try:
                value = dec.decode([int(v) for v in chunk])
            except DecodeError as exc:
                self.point_errors[pp.name] = str(exc)
                continue
            out.append(Reading(device, pp.name, ts, value, dec.unit))
        return out

    @staticmethod
    def _decode(point: ModbusPoint, registers: list[int]) -> Value:
        return _Decoder.of(point).decode(registers)

    async def write(self, point: str, value: Value) -> Value:
        p = self._points.get(point)
        if p is None:
            raise WriteRefused(f"{self.device}: unknown point '{point}'")
        if not p.writable:
            raise WriteRefused(f"{self.device}.{point}: the point is not writable")
        kind = p.effective_type()
        try:
            if kind == "bool":
                target: Value = codec.coerce_bool(value)
            elif kind == "string":
                if not isinstance(value, str):
                    raise WriteRefused(f"expected a string, got {value!r}")
                target = value
            else:
                target = codec.coerce_number(value)
                if p.min is not None and target < p.min:
                    raise WriteRefused(f"{target} is below the minimum {p.min:g}")
                if p.max is not None and target > p.max:
                    raise WriteRefused(f"{target} is above the maximum {p.max:g}")
            registers = (
                []
                if p.table == "coil" or p.bit is not None
                else codec.encode(target, kind, p.order, scale=p.scale, offset=p.offset, length=p.length)
            )
        except WriteRefused as exc:
            raise WriteRefused(f"{self.device}.{point}: {exc}") from None
        unit = self.config.unit_id
        async with self.bus.session() as bus:
            await self._write_locked(bus, unit, p, target, registers)
        readings = await self.read_points([point])
        if not readings:
            why = self.point_errors.get(point, "no value")
            raise DeviceProtocolError(f"{self.device}.{point}: written, but the read-back failed: {why}")
        return readings[0].value

    @staticmethod
    async def _write_locked(
        bus: BusSession, unit: int, p: ModbusPoint, target: Value, registers: list[int]
    ) -> None:
        if p.table == "coil":
            await bus.write_coil(unit, p.address, bool(target))
        elif p.bit is not None:
            # read-modify-write under the bus lock: no other request can slip between read and write
            (current,) = await bus.read(unit, "holding", p.address, 1)
            await bus.write_register(unit, p.address, codec.set_bit(int(current), p.bit, bool(target)))
        elif len(registers) == 1:
            await bus.write_register(unit, p.address, registers[0])
        else:
            await bus.write_registers(unit, p.address, registers)
