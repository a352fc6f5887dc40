"""Find Modbus units: probe unit ids on a TCP link or on a serial line at several baud rates and parities."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.errors import DeviceProtocolError, DeviceUnreachable
from drivers.modbus.bus import ModbusBus, ModbusExceptionResponse
from drivers.modbus.config import ModbusRtuBusConfig, ModbusRtuTcpBusConfig, ModbusTcpBusConfig

Progress = Callable[[int, int], None]
# Exception codes a gateway answers for a unit that is NOT there (10: no path, 11: target did not respond).
_GATEWAY_ABSENT = (10, 11)


@dataclass(frozen=True, slots=True)
class ScanHit:
    unit_id: int
    baudrate: int | None
    parity: str | None
    detail: str


async def _open(bus: ModbusBus) -> None:
    """Open the port or connection before the sweep; DeviceUnreachable if it cannot be opened.

    Without this, a missing port or a refused connection would look like 247 silent units
    ("no unit answered") instead of an error in words.
    """
    async with bus.session():
        await bus._connected_client()


async def _probe(bus: ModbusBus, unit_id: int) -> str | None:
    """What a unit answered to 'read holding register 0', or None if it is not there."""
    try:
        (value,) = await bus.read(unit_id, "holding", 0, 1)
    except ModbusExceptionResponse as exc:
        if exc.code in _GATEWAY_ABSENT:
            return None
        return f"answers ({exc})".replace(f"unit {unit_id}: function 3: ", "")
    except DeviceUnreachable:
        return None
    except DeviceProtocolError:
        return None  # garbage: another unit's late answer, noise, or the wrong line settings
    return f"answers (holding register 0 = {value})"


async def scan_tcp(
    host: str,
    port: int,
    unit_ids: Sequence[int],
    timeout: float,  # noqa: ASYNC109 - per probe (one answer), not a bound on the whole scan
    progress: Progress | None = None,
    rtu_framing: bool = False,
) -> list[ScanHit]:
    """Probe each unit id on one TCP connection (a Modbus TCP device or gateway, or RTU over TCP)."""
    config: ModbusTcpBusConfig | ModbusRtuTcpBusConfig
    if rtu_framing:
        config = ModbusRtuTcpBusConfig(type="modbus-rtu-tcp", host=host, port=port)
    else:
        config = ModbusTcpBusConfig(type="modbus-tcp", host=host, port=port)
    bus = ModbusBus("scan", config, timeout=timeout)
    hits: list[ScanHit] = []
    try:
        await _open(bus)
        for done, unit_id in enumerate(unit_ids, 1):
            detail = await _probe(bus, unit_id)
            if detail is not None:
                hits.append(ScanHit(unit_id, None, None, detail))
            if progress is not None:
                progress(done, len(unit_ids))
    finally:
        await bus.aclose()
    return hits


async def scan_serial(
    port: str,
    unit_ids: Sequence[int],
    baudrates: Sequence[int],
    parities: Sequence[Literal["N", "E", "O"]] | Sequence[str],
    timeout: float,  # noqa: ASYNC109 - per probe (one answer), not a bound on the whole scan
    progress: Progress | None = None,
    stopbits: int = 1,
) -> list[ScanHit]:
    """Probe each unit id at each line setting; a unit found at one setting is not probed again."""
    total = len(unit_ids) * len(baudrates) * len(parities)
    done = 0
    found: set[int] = set()
    hits: list[ScanHit] = []
    for baudrate in baudrates:
        for parity in parities:
            config = ModbusRtuBusConfig.model_validate(
                {
                    "type": "modbus-rtu",
                    "port": port,
                    "baudrate": baudrate,
                    "parity": parity,
                    "stopbits": stopbits,
                }
            )
            bus = ModbusBus("scan", config, timeout=timeout)
            try:
                await _open(bus)
                for unit_id in unit_ids:
                    if unit_id not in found:
                        detail = await _probe(bus, unit_id)
                        if detail is not None:
                            found.add(unit_id)
                            hits.append(ScanHit(unit_id, baudrate, str(parity), detail))
                    done += 1
                    if progress is not None:
                        progress(done, total)
            finally:
                await bus.aclose()
    return hits
