"""The upstream contract: what every sender to a platform implements, as `Driver` is for devices.

An upstream is fed the rows the store writer has just made durable (`offer`, in seq order, in the event
loop) and sends them its own way: the MQTT uplink (`agent/upstream/mqtt.py`, any MQTT format) or the
NGSI-LD sender over HTTP (`agent/upstream/ngsild_http.py`). It reads anything older from its lane of the
buffer, and acknowledges what the platform has accepted there, so nothing is deleted before every upstream
has it. The runtime starts it (`run`, until `stop`), beats the watchdog through `beat`, reports its figures
(health, status page) and, when the upstream is replaced on reload, continues from its `next_seq`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from agent.pipeline.store import StoredRow


class Upstream(Protocol):
    """One sender to one platform, on its own lane of the buffer."""

    beat: Callable[[], None]
    """Set by the runtime: the progress watchdog's heartbeat, called at least once per connection attempt."""

    @property
    def name(self) -> str:
        """Its name: its lane in the buffer and its key in the health document (`mqtt`, or `upstream.extra`)."""
        ...

    @property
    def format_name(self) -> str:
        """What goes on the wire: `fieldgate`, `sparkplug`, `thingsboard`, `ngsi-ld`."""
        ...

    @property
    def connected(self) -> bool: ...

    @property
    def sent(self) -> int:
        """Readings the platform has acknowledged since the start."""
        ...

    @property
    def messages(self) -> int:
        """Messages (requests) the platform has acknowledged since the start."""
        ...

    @property
    def connections(self) -> int: ...

    @property
    def since_ts(self) -> int | None:
        """When the link last came up or went down (ms)."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the link is down, in words; None while it is up."""
        ...

    @property
    def next_seq(self) -> int:
        """One past the last row offered: a replacing upstream treats everything below as backlog."""
        ...

    def offer(self, rows: list[StoredRow]) -> None:
        """Rows just stored, in seq order; never blocks (a slow link leaves them to the backlog)."""

    async def run(self) -> None:
        """Connect, send, reconnect with backoff, until `stop()`; never raises for a link failure."""

    async def stop(self) -> None:
        """Stop cleanly: what was acknowledged is marked in the buffer, the rest stays for the next start."""
