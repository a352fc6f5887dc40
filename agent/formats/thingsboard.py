"""ThingsBoard gateway MQTT API: device connect, per-device telemetry with `ts`, RPC writes with replies.

The gateway logs in with the access token of a ThingsBoard *gateway* device (`username`) and speaks for its
devices: `v1/gateway/connect` `{"device": D}` before a device's first data in a session,
`v1/gateway/attributes` `{D: {"points": {POINT: {"type", "unit", "writable"}}}}` (client-side attributes: what
the device measures and which RPC writes it takes), `v1/gateway/telemetry`
`{D: [{"ts": T, "values": {POINT: X, ...}}, ...], ...}` (readings of one device taken at the same `ts` share
one entry), `v1/gateway/disconnect` on a clean stop. Server-side RPC arrives on
`v1/gateway/rpc` as `{"device": D, "data": {"id": N, "method": M, "params": P}}` and is answered on the same
topic with `{"device": D, "id": N, "data": RESULT}`. Methods: `write` with `{"point": P, "value": X}`, or
`set_<point>` with the value as params; both go through the commands path (validated, audited, read back).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from agent.formats import Catalog, CommandExecutor, InboundHandler, Message, decode_rows
from agent.store import StoredRow

log = logging.getLogger("fieldgate.thingsboard")

CONNECT = "v1/gateway/connect"
DISCONNECT = "v1/gateway/disconnect"
TELEMETRY = "v1/gateway/telemetry"
ATTRIBUTES = "v1/gateway/attributes"
RPC = "v1/gateway/rpc"


class ThingsBoardFormat:
    name = "thingsboard"

    def __init__(self, catalog: Catalog | None = None, execute: CommandExecutor | None = None) -> None:
        self.catalog = catalog or dict
        self.execute = execute
        self.connected: set[str] = set()

    def will(self) -> Message | None:
        return None  # the gateway API has no will; ThingsBoard marks the gateway inactive by itself

    def _connect(self, device: str) -> Message:
        self.connected.add(device)
        return Message(CONNECT, orjson.dumps({"device": device}))

    def birth(self) -> list[Message]:
        self.connected.clear()
        try:
            catalog = self.catalog()
        except Exception as exc:
            log.warning("device catalog unavailable for the ThingsBoard connects: %s", exc)
            catalog = {}
        out = [self._connect(d) for d in sorted(catalog)]
        attributes = {
            device: {
                "points": {
                    p.name: {"type": p.type, "unit": p.unit, "writable": p.writable} for p in catalog[device]
                }
            }
            for device in sorted(catalog)
            if catalog[device]
        }
        if attributes:
            out.append(Message(ATTRIBUTES, orjson.dumps(attributes)))
        return out

    def encode(self, rows: list[StoredRow], backlog: bool) -> list[Message]:
        doc: dict[str, list[dict[str, Any]]] = {}
        entries: dict[tuple[str, int], dict[str, Any]] = {}
        for reading in decode_rows(rows):
            device, ts = str(reading["device"]), int(reading["ts"])
            entry = entries.get((device, ts))
            if entry is None:
                entry = entries[(device, ts)] = {"ts": ts, "values": {}}
                doc.setdefault(device, []).append(entry)
            entry["values"][reading["point"]] = reading.get("value")
        out = [self._connect(d) for d in doc if d not in self.connected]
        out.append(Message(TELEMETRY, orjson.dumps(doc), tuple(r.seq for r in rows)))
        return out

    def inbound(self) -> list[tuple[str, InboundHandler]]:
        return [(RPC, self._on_rpc)]

    async def _on_rpc(self, topic: str, raw: bytes) -> list[Message]:
        try:
            msg = orjson.loads(raw)
            device, data = msg["device"], msg["data"]
            if not isinstance(data, dict) or "method" not in data:
                return []  # our own replies come back on the same topic
            rpc_id, method, params = data.get("id"), str(data["method"]), data.get("params")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("%s: malformed RPC ignored (%s)", topic, exc)
            return []
        result = await self._write(str(device), method, params)
        return [Message(RPC, orjson.dumps({"device": device, "id": rpc_id, "data": result}))]

    async def _write(self, device: str, method: str, params: Any) -> dict[str, Any]:
        if method == "write" and isinstance(params, dict) and "point" in params and "value" in params:
            point, value = str(params["point"]), params["value"]
        elif method.startswith("set_") and len(method) > 4:
            point, value = method[4:], params
        else:
            return {"ok": False, "error": f"unknown method {method!r}: use 'write' or 'set_<point>'"}
        if self.execute is None:
            return {"ok": False, "error": "writes are not enabled on this gateway"}
        result: dict[str, Any] = await self.execute(device, point, value, source="thingsboard")
        return result

    def goodbye(self) -> list[Message]:
        out = [Message(DISCONNECT, orjson.dumps({"device": d})) for d in sorted(self.connected)]
        self.connected.clear()
        return out

    def health(self, doc: dict[str, Any]) -> Message | None:
        return None
