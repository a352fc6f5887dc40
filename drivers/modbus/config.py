"""Modbus device, point and bus configuration models (no I/O imports)."""

from __future__ import annotations

from typing import Literal

from agent.config_base import AggregateConfig, Deadband, DeviceConfigBase, Model, ReportMode
from agent.modelkit import Field, field_validator, model_validator
from agent.units import Duration, duration_field

Table = Literal["coil", "discrete", "input", "holding"]
PointType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
Order = Literal["ABCD", "DCBA", "BADC", "CDAB"]

REGISTER_COUNT: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}


class ModbusPoint(Model):
    """One value of a Modbus device (SPEC §2 point fields)."""

    table: Table = "holding"
    address: int = Field(ge=0, le=65535, description="0-based PDU address")
    type: PointType | None = Field(None, description="default uint16, or bool for coils and discrete inputs")
    order: Order = "ABCD"
    length: int | None = Field(None, ge=1, le=125, description="registers, for type string")
    bit: int | None = Field(None, ge=0, le=15, description="one bit of a register, as a bool")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    poll: Duration | None = duration_field(
        None, "10ms", "1d", description="overrides the device's poll interval"
    )
    description: str | None = None
    # Edge processing (docs/EDGE_PROCESSING.md): override the device's report options for this point.
    report: ReportMode | None = Field(None, description="always | on_change | deadband; default the device's")
    deadband: Deadband | None = Field(None, description="0.5 (absolute) or '2%' (relative): report: deadband")
    heartbeat: Duration | None = duration_field(
        None, "1s", "7d", zero_off=True, description="longest time without sending an unchanged value"
    )
    aggregate: AggregateConfig | None = Field(None, description="windowed aggregates instead of raw values")

    @model_validator(mode="after")
    def _rules(self) -> ModbusPoint:
        bit_table = self.table in ("coil", "discrete")
        if bit_table and self.type not in (None, "bool"):
            raise ValueError(f"a {self.table} is a bool; type '{self.type}' does not apply")
        if self.type == "string" and self.length is None:
            raise ValueError("type string needs 'length' (registers)")
        if self.type != "string" and self.length is not None:
            raise ValueError("'length' applies only to type string")
        if self.bit is not None and (bit_table or self.effective_type() not in ("bool", "uint16", "int16")):
            raise ValueError("'bit' selects one bit of a 16-bit register (table input or holding)")
        if self.writable and self.table in ("discrete", "input"):
            kind = "discrete inputs" if self.table == "discrete" else "input registers"
            raise ValueError(f"{kind} are read-only; only coils and holding registers can be written")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        last = self.address + self.register_count() - 1
        if last > 65535:
            raise ValueError(
                f"the point spans addresses {self.address}-{last}: past the last Modbus address (65535)"
            )
        return self

    def effective_type(self) -> str:
        if self.bit is not None:
            return "bool"
        if self.type is not None:
            return self.type
        return "bool" if self.table in ("coil", "discrete") else "uint16"

    def register_count(self) -> int:
        """Registers (or bits, for coil/discrete tables) the point spans."""
        if self.table in ("coil", "discrete"):
            return 1
        if self.type == "string":
            assert self.length is not None
            return self.length
        if self.bit is not None:
            return 1
        return REGISTER_COUNT[self.effective_type()]


class ModbusDeviceConfig(DeviceConfigBase):
    driver: Literal["modbus"] = "modbus"
    bus: str = Field(description="name of a bus in `buses`")
    unit_id: int = Field(
        1, ge=0, le=255, description="Modbus unit (slave) id: 0-247 on a serial line, 0-255 over TCP"
    )
    profile: str | None = Field(
        None, description="a profile name in config/profiles/ or a path; its points are merged"
    )
    points: dict[str, ModbusPoint] = Field(default_factory=dict)
    max_registers_per_request: int = Field(125, ge=1, le=125)
    max_bits_per_request: int = Field(2000, ge=1, le=2000)
    max_gap: int = Field(
        10, ge=0, le=100, description="unused registers read between two points to merge requests"
    )


def host_problem(host: str) -> str | None:
    """Why `host` is not a host name or address a socket can connect to (None when it is)."""
    if not host or len(host) > 253:
        return "a host name or address (1 to 253 characters)"
    if "@" in host or "/" in host:
        return f"'{host}' is a host name or address only (no scheme, credentials or path)"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in host):
        return "a host name cannot contain spaces or control characters"
    return None


class _TcpBus(Model):
    host: str

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        problem = host_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class ModbusTcpBusConfig(_TcpBus):
    type: Literal["modbus-tcp"]
    port: int = Field(502, ge=1, le=65535)
    timeout: Duration = duration_field(1.0, "10ms", "1m")


class ModbusRtuTcpBusConfig(_TcpBus):
    """RTU framing over a TCP socket (serial device servers)."""

    type: Literal["modbus-rtu-tcp"]
    port: int = Field(502, ge=1, le=65535)
    timeout: Duration = duration_field(1.0, "10ms", "1m")


class ModbusRtuBusConfig(Model):
    type: Literal["modbus-rtu"]
    port: str = Field(
        min_length=1,
        pattern=r"^[^\x00]+$",
        description="serial port; prefer /dev/serial/by-id/... (stable across reboots)",
    )
    baudrate: int = Field(9600, ge=300, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    timeout: Duration = duration_field(0.5, "10ms", "1m")
