"""An independent Sparkplug B decoder for the tests: the payload schema is the one a third party ships.

`sparkplug-b-packets` (PyPI, dev extra) carries its own protoc-generated `sparkplug_b_pb2` (Eclipse Tahu's
sparkplug_b.proto). Its serialized FileDescriptorProto is read from that module's source and loaded into a
private descriptor pool, so the messages the gateway publishes are parsed with the third party's schema,
never with agent/formats/sparkplug_b_pb2.py (importing both would merge them in protobuf's default pool).
The datatype rules (which field carries which type, two's complement of Int8..Int64) follow Sparkplug 3.0
§6.4.16 as the same package's Tahu encoder (`sparkplug_b.addMetric`) applies them.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from typing import Any

from google.protobuf import descriptor_pool, message_factory

DATATYPES = {
    1: "Int8",
    2: "Int16",
    3: "Int32",
    4: "Int64",
    5: "UInt8",
    6: "UInt16",
    7: "UInt32",
    8: "UInt64",
    9: "Float",
    10: "Double",
    11: "Boolean",
    12: "String",
    13: "DateTime",
    14: "Text",
}
_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}
THIRD_PARTY = "sparkplub_b_packets.core.sparkplug_b_pb2"  # (sic: the package's own spelling)


@cache
def serialized_descriptor() -> bytes:
    """The third party's `sparkplug_b.proto`, as its generated module registers it (not imported)."""
    spec = importlib.util.find_spec(THIRD_PARTY)
    assert spec is not None and spec.origin is not None, f"{THIRD_PARTY}: pip install -e '.[dev]'"
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            value = ast.literal_eval(node.args[0])
            assert isinstance(value, bytes)
            return value
    raise AssertionError(f"{spec.origin}: no AddSerializedFile call")


@cache
def payload_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(serialized_descriptor())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


def _typed(datatype: int, field: str | None, raw: Any) -> Any:
    if field is None:
        return None
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None and field in ("int_value", "long_value"):
        raw &= (1 << bits) - 1
        return raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
    return raw


def _properties(ps: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, pv in zip(ps.keys, ps.values, strict=True):
        out[key] = None if pv.is_null else _typed(pv.type, pv.WhichOneof("value"), _field(pv))
    return out


def _field(msg: Any) -> Any:
    name = msg.WhichOneof("value")
    return getattr(msg, name) if name is not None else None


def metric(m: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if m.HasField("name"):
        d["name"] = m.name
    if m.HasField("alias"):
        d["alias"] = m.alias
    if m.HasField("timestamp"):
        d["timestamp"] = m.timestamp
    if m.HasField("datatype"):
        d["datatype"] = m.datatype
        d["type"] = DATATYPES.get(m.datatype, str(m.datatype))
    if m.is_historical:
        d["is_historical"] = True
    if m.is_null:
        d["is_null"] = True
    if m.HasField("properties"):
        d["properties"] = _properties(m.properties)
    field = m.WhichOneof("value")
    if field is not None and not m.is_null:
        d["field"] = field
        d["value"] = _typed(m.datatype, field, getattr(m, field))
    return d


def payload(data: bytes) -> dict[str, Any]:
    """A Sparkplug B payload as a dict: timestamp, seq, metrics (name, alias, datatype, type, value…)."""
    p = payload_class()()
    p.ParseFromString(data)
    out: dict[str, Any] = {"metrics": [metric(m) for m in p.metrics]}
    if p.HasField("timestamp"):
        out["timestamp"] = p.timestamp
    if p.HasField("seq"):
        out["seq"] = p.seq
    return out
