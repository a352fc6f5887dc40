"""The fieldgate JSON format (SPEC §3): telemetry batches, retained status with an offline will, health."""

from __future__ import annotations

from typing import Any

from agent.pipeline.reading import now_ms
from agent.pipeline.store import StoredRow
from agent.upstream import payloads
from agent.upstream.formats import InboundHandler, Message


class FieldgateFormat:
    """SPEC §3 exactly: `{p}/telemetry` (or `/gz`), `{p}/status` retained + will, `{p}/health`."""

    name = "fieldgate"

    def __init__(self, topics: payloads.Topics, gateway_id: str, version: str, compression: str) -> None:
        self.topics = topics
        self.gateway_id = gateway_id
        self.version = version
        self.compression = compression
        self._telemetry = topics.telemetry_for(compression)

    def will(self) -> Message | None:
        return Message(self.topics.status, payloads.status("offline", now_ms(), self.version), retain=True)

    def birth(self) -> list[Message]:
        return [Message(self.topics.status, payloads.status("online", now_ms(), self.version), retain=True)]

    def encode(self, rows: list[StoredRow], backlog: bool) -> list[Message]:
        body = payloads.telemetry(self.gateway_id, [r.body for r in rows], backlog=backlog)
        body = payloads.compress(body, self.compression)
        return [Message(self._telemetry, body, tuple(r.seq for r in rows))]

    def inbound(self) -> list[tuple[str, InboundHandler]]:
        return []  # SPEC commands are the uplink's `Subscription` (kept as it was)

    def goodbye(self) -> list[Message]:
        return [Message(self.topics.status, payloads.status("offline", now_ms(), self.version), retain=True)]

    def health(self, doc: dict[str, Any]) -> Message | None:
        return Message(self.topics.health, payloads.dumps(doc))
