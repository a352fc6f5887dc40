"""NGSI-LD over HTTP: the sender of one `upstream.extra` context broker (an `Upstream`, contract.py).

What it sends is the format's (agent/upstream/formats/ngsild.py: readings -> Smart Data Models entities).
Sending: `POST {url}/ngsi-ld/v1/entityOperations/upsert?options=update` with `application/ld+json` (the
@context is in each entity), over the stdlib's asyncio streams. A batch that mentions an entity several times
(several poll cycles) is split into successive requests, each naming an entity once, in time order.
Rows are acknowledged in the lane after a 201/204 (or 207: the entities the broker refused are counted in
`rejected`; sending them again would be refused again). A 400/422 is counted as rejected the same way; a
413 halves the batch; any other answer or a network error is retried with a back-off, nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson

from agent.config.models import NgsiLdConfig
from agent.config.urls import redact_url
from agent.errors import StoreError, UpstreamError
from agent.pipeline.reading import now_ms
from agent.pipeline.store import AsyncStore, StoredRow
from agent.upstream.formats.ngsild import EntityMapper
from agent.upstream.tls import read_secret

log = logging.getLogger("fieldgate.ngsild")

UPSERT_PATH = "/ngsi-ld/v1/entityOperations/upsert?options=update"
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0


class ContextBrokerError(UpstreamError):
    """The broker answered with a status that means: try again later."""


async def http_post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    deadline_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on its own connection (asyncio streams); returns (status, body)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(deadline_s):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=(ssl_context or ssl.create_default_context()) if https else None
        )
        try:
            head = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            head.append("Connection: close")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
            try:
                status = int(status_line.split(b" ", 2)[1])
            except (IndexError, ValueError):
                raise ContextBrokerError(f"not an HTTP answer: {status_line[:80]!r}") from None
            length: int | None = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                data = b""
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
            elif length is not None:
                data = await reader.readexactly(length)
            else:
                data = await reader.read()
            return status, data
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


class NgsiLdUplink:
    """One NGSI-LD context broker, fed from its own lane of the buffer (one request in flight at a time).

    An `Upstream` (agent/upstream/contract.py)."""

    def __init__(
        self,
        name: str,
        cfg: NgsiLdConfig,
        mapper: EntityMapper,
        store: AsyncStore,
        lane: str | None,
        *,
        next_seq: int = 1,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.mapper = mapper
        self.store = store
        self.lane = lane
        self.connected = False
        self.sent = 0
        self.messages = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.since_ts: int | None = None
        self.connections = 0
        self._next_seq = next_seq
        self._cursor = 0
        self._limit = cfg.batch_max
        self._event = asyncio.Event()
        self._stopping = False
        self._unacked: list[int] = []
        self.beat: Callable[[], None] = lambda: None
        self.on_connect: list[Callable[[], None]] = []
        self.url = cfg.url.rstrip("/") + UPSERT_PATH

    @property
    def format_name(self) -> str:
        return "ngsi-ld"

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def offer(self, rows: list[StoredRow]) -> None:
        if rows:
            self._next_seq = rows[-1].seq + 1
            self._event.set()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/ld+json", "Accept": "application/json"}
        if self.cfg.tenant:
            headers["NGSILD-Tenant"] = self.cfg.tenant
        if self.cfg.token_file is not None:
            headers["Authorization"] = f"Bearer {read_secret(self.cfg.token_file)}"
        return headers

    async def run(self) -> None:
        attempt = 0
        last_send = 0.0
        while not self._stopping:
            self.beat()
            self._event.clear()
            try:
                if self._unacked:
                    await self._ack([])
                rows = await self.store.fetch(self._cursor, None, self._limit, self.lane)
            except StoreError as exc:
                log.error("upstream %s: buffer unreadable, retrying: %s", self.name, exc)
                await asyncio.sleep(1.0)
                continue
            if not rows:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await self._event.wait()
                continue
            wait = self.cfg.batch_interval - (time.monotonic() - last_send)
            if len(rows) < self._limit and wait > 0:
                await asyncio.sleep(wait)  # let a live batch fill up
                continue
            last_send = time.monotonic()
            try:
                await self._send(rows)
            except (OSError, TimeoutError, ContextBrokerError, asyncio.IncompleteReadError) as exc:
                self._failed(str(exc) or type(exc).__name__)
                delay = min(RECONNECT_MAX, RECONNECT_MIN * (2**attempt)) * random.uniform(0.8, 1.2)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self._cursor = rows[-1].seq
            await self._ack([r.seq for r in rows])

    def _failed(self, message: str) -> None:
        if self.connected:
            log.warning("upstream %s lost: %s", self.name, message)
        elif message != self.last_error:
            log.warning("upstream %s unreachable: %s", self.name, message)
        self.connected = False
        self.last_error = message
        self.since_ts = now_ms()

    async def _ack(self, seqs: list[int]) -> None:
        self._unacked.extend(seqs)
        pending, self._unacked = self._unacked, []
        try:
            await self.store.ack(pending, self.lane)
        except StoreError:
            self._unacked = pending + self._unacked  # retried before the next fetch
            raise

    async def _send(self, rows: list[StoredRow]) -> None:
        for entities, seqs in self.mapper.requests(rows):
            if not entities:
                continue
            body = orjson.dumps(entities)
            status, answer = await http_post(self.url, body, self._headers(), self.cfg.timeout)
            if status == 413 and self._limit > 1:
                self._limit = max(1, self._limit // 2)
                raise ContextBrokerError(f"413 request too large: batches reduced to {self._limit} readings")
            if status in (400, 422):
                self.rejected += len(seqs)
                log.error(
                    "upstream %s refused %d entities (%d readings, not sent again): %d %s",
                    self.name,
                    len(entities),
                    len(seqs),
                    status,
                    answer[:500].decode("utf-8", "replace"),
                )
            elif status == 207:
                self._multi_status(answer)
            elif status not in (200, 201, 204):
                raise ContextBrokerError(
                    f"HTTP {status} from {redact_url(self.cfg.url)}: {answer[:200].decode('utf-8', 'replace')}"
                )
            self.messages += 1
            self.sent += len(seqs)
            if not self.connected:
                self.connections += 1
                self.connected = True
                self.last_error = None
                self.since_ts = now_ms()
                log.info("upstream %s (ngsi-ld) reached %s", self.name, redact_url(self.cfg.url))
                for hook in self.on_connect:
                    hook()
        self.beat()

    def _multi_status(self, answer: bytes) -> None:
        try:
            errors = orjson.loads(answer).get("errors", [])
        except (orjson.JSONDecodeError, AttributeError):
            errors = []
        if errors:
            self.rejected += len(errors)
            log.error(
                "upstream %s refused %d entities, e.g. %s", self.name, len(errors), str(errors[0])[:300]
            )

    async def stop(self) -> None:
        self._stopping = True
        self._event.set()
        if self._unacked:
            with contextlib.suppress(StoreError):
                await self._ack([])
