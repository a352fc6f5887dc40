"""Upstream payload formats as plug-ins: stored rows -> MQTT messages, birth/death, platform commands.

A format turns a batch of stored rows (each a SPEC §3 READING, already JSON-encoded) into one or more
messages; the uplink publishes them at QoS 1 and acknowledges a row's seq in the buffer after the PUBACK of
the message that carried it (`Message.seqs`). Messages that carry no rows (a birth certificate, a device
connect) travel in the same order, before the data that needs them.

Formats: `fieldgate` (SPEC §3, the default), `sparkplug` (Sparkplug B), `thingsboard` (gateway MQTT API).
NGSI-LD goes over HTTP and has its own sender (`agent/formats/ngsild.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from agent.store import StoredRow


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publication; `seqs` are the stored rows it carries (acknowledged after its PUBACK)."""

    topic: str
    payload: bytes
    seqs: tuple[int, ...] = ()
    retain: bool = False
    qos: int = 1


CommandExecutor = Callable[..., Awaitable[dict[str, Any]]]
"""`CommandProcessor.execute(device, point, value, source=...)`: the validated, audited write path."""

InboundHandler = Callable[[str, bytes], Awaitable[list[Message]]]
"""A platform message (topic, payload) -> the messages to publish in answer."""


@dataclass(frozen=True, slots=True)
class PointInfo:
    """What a format may announce of a point before its first value (Sparkplug DBIRTH)."""

    name: str
    type: str | None = None  # "bool", "int16", ..., "float32", "string"
    unit: str | None = None
    writable: bool = False
    scaled: bool = False  # an integer register with scale/offset: its values are engineering floats


Catalog = Callable[[], dict[str, list[PointInfo]]]
"""The gateway's devices and their points, as known now (drivers' `points()`)."""


class MqttFormat(Protocol):
    """What the MQTT uplink needs from a format."""

    name: str

    def will(self) -> Message | None:
        """The last will, set on each new connection (called once per connection, before `birth`)."""

    def birth(self) -> list[Message]:
        """Published first on every connection, before any data."""

    def encode(self, rows: list[StoredRow], backlog: bool) -> list[Message]:
        """Every row's seq in exactly one returned message; `backlog` = replayed from the buffer."""

    def inbound(self) -> list[tuple[str, InboundHandler]]:
        """Topic filters to subscribe to, each with its handler."""

    def goodbye(self) -> list[Message]:
        """Published on a clean stop, before disconnecting (the broker does not send the will then)."""

    def health(self, doc: dict[str, Any]) -> Message | None:
        """The periodic health message, if the format has one."""


def decode_rows(rows: list[StoredRow]) -> list[dict[str, Any]]:
    """The READING objects of stored rows (formats other than fieldgate re-shape them)."""
    loads = orjson.loads
    return [loads(r.body) for r in rows]
