"""Modbus figures: requests per cycle for 10 x 20 registers, and RTU device polls/s against the line's limit.

Run: .venv/bin/python -m bench.bench_modbus [--quick]
Prints one JSON object, then a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from agent.driver import DriverContext, SharedResources
from drivers.modbus.bus import char_bits, rtu_silence
from drivers.modbus.config import ModbusDeviceConfig, ModbusRtuBusConfig, ModbusTcpBusConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import ModbusSim, SimUnit
from tests.ptybridge import PtyBridge


async def requests_per_cycle() -> dict[str, Any]:
    sim = ModbusSim({uid: SimUnit() for uid in range(1, 11)})
    port = await sim.start_tcp()
    bus = ModbusTcpBusConfig(type="modbus-tcp", host="127.0.0.1", port=port, timeout="1s")
    ctx = DriverContext(SharedResources(), {"lan": bus}, Path("."))
    drivers = [
        ModbusDriver(
            f"d{u}",
            ModbusDeviceConfig(bus="lan", unit_id=u, points={f"r{i}": {"address": i} for i in range(20)}),
            ctx,
        )
        for u in range(1, 11)
    ]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(d.read_points([]) for d in drivers))
        elapsed = time.perf_counter() - t0
    finally:
        await ctx.shared.aclose()
        await sim.aclose()
    return {
        "devices": 10,
        "registers_each": 20,
        "requests": sim.count(),
        "naive_requests": 200,
        "cycle_s": elapsed,
    }


def line_seconds(config: ModbusRtuBusConfig, registers: int) -> float:
    """The shortest time one FC3 poll of `registers` can take on the line: the theoretical limit.

    Request (8 bytes) + response (5 + 2 x registers bytes), each character start + data +
    parity + stop bits, plus two 3.5-character silences (before the answer and before the next request).
    """
    request_bytes = 8
    response_bytes = 5 + 2 * registers
    return (request_bytes + response_bytes) * char_bits(config) / config.baudrate + 2 * rtu_silence(config)


async def rtu_line(baudrate: int, registers: int, devices: int, cycles: int) -> dict[str, Any]:
    """`devices` units of `registers` contiguous registers each, polled through the driver on one paced line."""
    config = ModbusRtuBusConfig(type="modbus-rtu", port="-", baudrate=baudrate, timeout="1s")
    # The simulated slave waits its end-of-frame silence before answering, like a real one.
    with PtyBridge(
        baudrate=baudrate, bits_per_char=char_bits(config), turnaround=rtu_silence(config)
    ) as bridge:
        config = config.model_copy(update={"port": bridge.path_a})
        sim = ModbusSim({u: SimUnit() for u in range(1, devices + 1)})
        await sim.start_rtu(bridge.path_b, baudrate=baudrate)
        ctx = DriverContext(SharedResources(), {"rs485": config}, Path("."))
        drivers = [
            ModbusDriver(
                f"d{u}",
                ModbusDeviceConfig(
                    bus="rs485", unit_id=u, points={f"r{i}": {"address": i} for i in range(registers)}
                ),
                ctx,
            )
            for u in range(1, devices + 1)
        ]
        try:
            await drivers[0].read_points([])  # opens the port
            sim.requests.clear()
            t0 = time.perf_counter()
            for _ in range(cycles):
                await asyncio.gather(*(d.read_points([]) for d in drivers))
            elapsed = time.perf_counter() - t0
        finally:
            await ctx.shared.aclose()
            await sim.aclose()
    polls = devices * cycles
    limit = 1 / line_seconds(config, registers)
    return {
        "baudrate": baudrate,
        "devices": devices,
        "registers_each": registers,
        "requests_per_cycle": sim.count() / cycles,
        "device_polls": polls,
        "achieved_polls_per_s": polls / elapsed,
        "line_limit_polls_per_s": limit,
        "efficiency": polls / elapsed / limit,
    }


async def main(quick: bool) -> dict[str, Any]:
    cycles = 3 if quick else 15
    rows = []
    for baudrate in (9600, 19200):
        rows.append(await rtu_line(baudrate, 2, 10, cycles))
        rows.append(await rtu_line(baudrate, 20, 10, cycles))
    return {"planning": await requests_per_cycle(), "rtu": rows}


def markdown(result: dict[str, Any]) -> str:
    p = result["planning"]
    lines = [
        f"Planning: {p['devices']} devices x {p['registers_each']} registers -> {p['requests']} requests "
        f"per cycle (one per register would be {p['naive_requests']}).",
        "",
        "RTU line (pty pair paced at the baud rate, 8N1), 10 devices polled through the driver:",
        "",
        "| baud | registers/device | requests/cycle | achieved device polls/s | line limit polls/s | efficiency |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rtu"]:
        lines.append(
            f"| {r['baudrate']} | {r['registers_each']} | {r['requests_per_cycle']:g} "
            f"| {r['achieved_polls_per_s']:.1f} | {r['line_limit_polls_per_s']:.1f} | {r['efficiency']:.0%} |"
        )
    lines += [
        "",
        "Line limit = (8 request + 5 + 2 x registers response bytes) x 10 bits / baud + two 3.5-character",
        "silences: what a perfect master and an instant slave could reach. The simulated slave waits its",
        "end-of-frame silence, as a real one must; a real slave also adds its turnaround (often 5-50 ms).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    result = asyncio.run(main(parser.parse_args().quick))
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
