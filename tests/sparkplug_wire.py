"""An independent Sparkplug B decoder for the tests: raw protobuf wire parsing, field numbers from
agent/formats/sparkplug_b.proto (Payload: 1 timestamp, 2 metrics, 3 seq; Metric: 1 name, 2 alias, 3 timestamp,
4 datatype, 5 is_historical, 7 is_null, 9 properties, 10 int, 11 long, 12 float, 13 double, 14 boolean,
15 string). It shares no code with the gateway (which uses the protobuf package's generated module)."""

from __future__ import annotations

import struct
from typing import Any


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) in order."""
    out: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"wire type {wire} unexpected")
        out.append((number, wire, value))
    return out


def metric(data: bytes) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for number, _, raw in fields(data):
        if number == 1:
            m["name"] = raw.decode()
        elif number == 2:
            m["alias"] = raw
        elif number == 3:
            m["timestamp"] = raw
        elif number == 4:
            m["datatype"] = raw
        elif number == 5:
            m["is_historical"] = bool(raw)
        elif number == 7:
            m["is_null"] = bool(raw)
        elif number == 9:
            props = fields(raw)
            keys = [r.decode() for n, _, r in props if n == 1]
            values = [{n2: r2 for n2, _, r2 in fields(r)} for n, _, r in props if n == 2]
            m["properties"] = {
                k: (v.get(8, b"").decode() if 8 in v else v.get(7)) for k, v in zip(keys, values, strict=True)
            }
        elif number in (10, 11):
            m["value"] = (
                raw - (1 << 64) if number == 11 and m.get("datatype") == 4 and raw >= 1 << 63 else raw
            )
        elif number == 12:
            m["value"] = struct.unpack("<f", raw)[0]
        elif number == 13:
            m["value"] = struct.unpack("<d", raw)[0]
        elif number == 14:
            m["value"] = bool(raw)
        elif number == 15:
            m["value"] = raw.decode()
    return m


def payload(data: bytes) -> dict[str, Any]:
    p: dict[str, Any] = {"metrics": []}
    for number, _, raw in fields(data):
        if number == 1:
            p["timestamp"] = raw
        elif number == 2:
            p["metrics"].append(metric(raw))
        elif number == 3:
            p["seq"] = raw
    return p
