"""The technician's local HTTP server: the status page, GET /api/status, GET /metrics (Prometheus) and the
token-guarded write actions.

Built on `asyncio.start_server` with a small, strict HTTP/1.1 parser rather than aiohttp: on a Pi the
stdlib costs no extra dependency and no extra MiB of RSS (aiohttp pulls in multidict, yarl, frozenlist,
aiosignal, propcache... and ~10 MiB), and the surface we serve is six routes, one request per connection
(`Connection: close`), bodies of a few hundred bytes. See docs/STATUS_API.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import orjson

from agent.errors import FieldgateError
from agent.pipeline.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.upstream.tls import SecretError, read_secret

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8470"
MAX_HEAD = 8 * 1024  # request line + headers; a browser sends ~1 KiB
MAX_HEADERS = 64
MAX_BODY = 4 * 1024  # a test write is {"point": ..., "value": ...}
READ_TIMEOUT = 10.0  # seconds to send a whole request; slow or idle clients are dropped
HEAD_TIMEOUT = 3.0  # seconds to send the request line and headers (a browser or the CLI: a few ms)
ACTION_TIMEOUT = 30.0  # a poll or a write on a slow RS-485 bus, with retries
MAX_CONNECTIONS = 32  # a Pi serves a technician or two; past this, answer 503 at once
# A connection whose request head has not arrived holds a slot for at most HEAD_TIMEOUT; when every slot
# is taken, a new connection takes the slot of the oldest idle one from the address that holds the most
# idle ones (any local user shares 127.0.0.1: idle connections must not lock the technician out).

_TOKEN_CHARS = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: methods and header names
_DEVICE_ROUTE = re.compile(r"^/api/devices/([^/]+)/(poll|write)$")


class StatusSource(Protocol):
    """What the runtime gives the server: the status document and the two actions a technician may trigger."""

    def status(self) -> dict[str, Any]:
        """The /api/status document (a superset of SPEC §3 health); never holds secrets."""
        ...

    async def refresh(self) -> None:
        """Bring the figures `status()` reports up to date (called before each status request)."""
        ...

    async def poll_now(self, device: str) -> None:
        """Re-poll `device` now; raises KeyError for an unknown device."""
        ...

    async def write(self, device: str, point: str, value: Any) -> dict[str, Any]:
        """A test write; returns a command-result-like dict {"ok": bool, "value"|"error", ...}."""
        ...


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError in words otherwise."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"local.listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8470")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"local.listen {listen!r}: port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


class HttpRequestFailed(FieldgateError):
    """A request we answer with an error status; `message` is said in words to the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""


async def read_request(
    reader: asyncio.StreamReader, on_head: Callable[[], None] | None = None
) -> Request | None:
    """Read one request; None when the client closed before sending anything. Raises HttpRequestFailed.
    `on_head` is called once the request line and headers have arrived."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpRequestFailed(400, "incomplete request") from None
    except asyncio.LimitOverrunError:
        raise HttpRequestFailed(431, f"request head larger than {MAX_HEAD} bytes") from None
    if on_head is not None:
        on_head()
    lines = head[:-4].split(b"\r\n")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise HttpRequestFailed(400, "request line is not ASCII") from None
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise HttpRequestFailed(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_CHARS.match(method):
        raise HttpRequestFailed(400, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        status = 505 if version.startswith("HTTP/") else 400
        raise HttpRequestFailed(status, f"unsupported protocol version {version!r}")
    if not target.startswith("/"):
        raise HttpRequestFailed(400, "request target must be an absolute path")
    path = target.split("?", 1)[0].split("#", 1)[0]
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpRequestFailed(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name_b, sep, value_b = raw.partition(b":")
        name = name_b.decode("latin-1")
        if not sep or not _TOKEN_CHARS.match(name):  # also rejects obsolete line folding (leading space)
            raise HttpRequestFailed(400, "malformed header field")
        key = name.lower()
        value = value_b.decode("latin-1").strip(" \t")
        if key in headers and key in ("content-length", "authorization", "host"):
            raise HttpRequestFailed(400, f"repeated {name} header")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise HttpRequestFailed(501, "chunked request bodies are not supported; send Content-Length")
    body = b""
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit() or not length_text.isascii():
            raise HttpRequestFailed(400, "malformed Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            raise HttpRequestFailed(413, f"request body larger than {MAX_BODY} bytes")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise HttpRequestFailed(400, "request body shorter than its Content-Length") from None
    return Request(method=method, path=path, headers=headers, body=body)


def _load_page() -> bytes:
    return importlib.resources.files("agent.control").joinpath("statuspage.html").read_bytes()


_PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    # Everything is inline and same-origin: the page works offline and nothing else can load.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


class LocalServer:
    """The status page and JSON API on `local.listen`; writes need the token of `local.token_file`."""

    def __init__(
        self,
        source: StatusSource,
        listen: str,
        token_file: Path | None,
        *,
        read_timeout: float = READ_TIMEOUT,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self._source = source
        self._read_timeout = read_timeout
        self._head_timeout = min(head_timeout, read_timeout)
        self._listen = listen
        self._token_file = token_file
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # connections whose request head has not arrived yet: task -> (client address, writer)
        self._idle: dict[asyncio.Task[None], tuple[str, asyncio.StreamWriter]] = {}
        self.evicted = 0  # idle connections closed to make room (counted for the tests and the log)
        self._page = _load_page()

    @property
    def enabled(self) -> bool:
        return bool(self._listen)

    @property
    def port(self) -> int:
        """The port actually bound (useful with 'host:0'); RuntimeError before start()."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the local API is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and serve; a no-op when local.listen is "". OSError (address in use...) propagates."""
        if not self._listen:
            log.info("local API disabled (local.listen is empty)")
            return
        host, port = parse_listen(self._listen)
        self._server = await asyncio.start_server(self._on_connection, host, port, limit=MAX_HEAD)
        log.info("local status page on http://%s:%d/", host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # Python 3.11's wait_closed() does not wait for open connections: end them ourselves.
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    # -- connection handling --------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if len(self._handlers) > MAX_CONNECTIONS and not self._evict_idle():
                await self._send(writer, 503, {"error": "too many connections; try again"}, head_only=False)
                return
            self._idle[task] = (_address(writer), writer)
            await self._serve_one(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled while we answered: nothing to tell it
        finally:
            self._idle.pop(task, None)
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    def _evict_idle(self) -> bool:
        """Every slot is taken: close the oldest idle connection of the address holding the most idle
        ones, so that a new client is served. False when no connection is idle (all are being answered)."""
        if not self._idle:
            return False
        hog, _ = Counter(address for address, _ in self._idle.values()).most_common(1)[0]
        victim = next(task for task, (address, _) in self._idle.items() if address == hog)  # the oldest
        _, writer = self._idle.pop(victim)
        writer.transport.abort()  # its read ends at once; its handler frees the slot
        self.evicted += 1
        if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
            log.warning(
                "local API: all %d connections taken; idle ones from %s closed (%d so far)",
                MAX_CONNECTIONS,
                hog,
                self.evicted,
            )
        return True

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            try:
                # The head must arrive within head_timeout; the body then has what remains of read_timeout.
                start = loop.time()
                async with asyncio.timeout(self._head_timeout) as deadline:

                    def head_received() -> None:
                        if task is not None:
                            self._idle.pop(task, None)
                        deadline.reschedule(start + self._read_timeout)

                    request = await read_request(reader, head_received)
            except TimeoutError:
                raise HttpRequestFailed(408, "request not received in time") from None
            if request is None:
                return
            head_only = request.method == "HEAD"
            status, doc, headers = await self._route(request, writer)
            body = doc if isinstance(doc, bytes) else _dumps(doc)  # encoding is part of the request's fate
        except HttpRequestFailed as exc:
            status, body, headers = exc.status, _dumps({"error": exc.message}), exc.headers
        except Exception:  # a bug of ours must cost one request, never the server
            log.exception("local API: request failed")
            status, body, headers = 500, _dumps({"error": "internal error; see the daemon's log"}), {}
        await self._send(writer, status, body, head_only=head_only, headers=headers)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: dict[str, Any] | bytes,
        *,
        head_only: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        payload = body if isinstance(body, bytes) else _dumps(body)
        reason = HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        lines += [
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Referrer-Policy: no-referrer",
            "Connection: close",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(payload)
        async with asyncio.timeout(self._read_timeout):
            await writer.drain()

    # -- routes ---------------------------------------------------------------------------------------

    async def _route(
        self, request: Request, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        path = request.path
        if path in ("/", "/api/status"):
            if request.method not in ("GET", "HEAD"):
                raise HttpRequestFailed(
                    405, f"{request.method} not allowed on {path}", {"Allow": "GET, HEAD"}
                )
            if path == "/":
                return 200, self._page, dict(_PAGE_HEADERS)
            try:
                await self._source.refresh()
                # encoded here so that an unencodable document is this request's 500, not a dropped connection
                return 200, _dumps(self._source.status()), {}
            except Exception:
                log.exception("local API: building the status document failed")
                raise HttpRequestFailed(
                    500, "the daemon could not build its status document; see its log"
                ) from None
        if path == "/metrics":
            return await self._metrics(request)
        if path == "/api/history":
            return await self._history(request)
        match = _DEVICE_ROUTE.match(path)
        if match is None:
            raise HttpRequestFailed(404, f"no such resource: {path}")
        if request.method != "POST":
            raise HttpRequestFailed(405, f"{request.method} not allowed on {path}", {"Allow": "POST"})
        self._authorize(request)
        try:
            device = unquote(match.group(1), errors="strict")
        except UnicodeDecodeError:
            raise HttpRequestFailed(400, "device name in the path is not valid UTF-8") from None
        action = match.group(2)
        devices = self._source.status().get("devices", {})
        if device not in devices:
            raise HttpRequestFailed(404, f"unknown device {device!r}")
        peer = writer.get_extra_info("peername")
        if action == "poll":
            log.info("local API: poll of %s requested from %s", device, peer)
            done = {"ok": True, "device": device}
            return 200, await self._act(device, self._source.poll_now(device), done), {}
        point, value = _parse_write(request)
        log.info("local API: test write %s.%s = %r requested from %s", device, point, value, peer)
        return 200, await self._act(device, self._source.write(device, point, value), None), {}

    async def _metrics(self, request: Request) -> tuple[int, bytes, dict[str, str]]:
        """GET /metrics: the Prometheus text format (agent/pipeline/metrics.py), read-only like /api/status."""
        if request.method not in ("GET", "HEAD"):
            raise HttpRequestFailed(405, f"{request.method} not allowed on /metrics", {"Allow": "GET, HEAD"})
        render = getattr(self._source, "metrics_text", None)
        if render is None:
            raise HttpRequestFailed(404, "no metrics from this source")
        try:
            await self._source.refresh()
            text: bytes = render()
        except Exception:
            log.exception("local API: building the metrics failed")
            raise HttpRequestFailed(500, "the daemon could not build its metrics; see its log") from None
        return 200, text, {"Content-Type": METRICS_CONTENT_TYPE}

    async def _history(self, request: Request) -> tuple[int, bytes, dict[str, str]]:
        """GET /api/history: the status page's last hour (agent/pipeline/health.py), read-only like /api/status."""
        if request.method not in ("GET", "HEAD"):
            raise HttpRequestFailed(
                405, f"{request.method} not allowed on /api/history", {"Allow": "GET, HEAD"}
            )
        build = getattr(self._source, "history", None)
        if build is None:
            raise HttpRequestFailed(404, "no history from this source")
        try:
            await self._source.refresh()
            return 200, _dumps(build()), {}
        except Exception:
            log.exception("local API: building the history failed")
            raise HttpRequestFailed(500, "the daemon could not build its history; see its log") from None

    async def _act(self, device: str, action: Any, done: dict[str, Any] | None) -> dict[str, Any]:
        """Run a poll or a write; device errors become {"ok": false, "error"}, not HTTP errors."""
        try:
            async with asyncio.timeout(ACTION_TIMEOUT):
                result = await action
        except KeyError:
            raise HttpRequestFailed(404, f"unknown device {device!r}") from None
        except TimeoutError:
            raise HttpRequestFailed(504, f"{device} did not finish within {ACTION_TIMEOUT:.0f} s") from None
        except FieldgateError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("local API: action on %s failed", device)
            raise HttpRequestFailed(500, f"the action on {device} failed unexpectedly; see the log") from None
        if done is not None:
            return done
        if not isinstance(result, dict):
            raise HttpRequestFailed(500, "the daemon returned no result for the write")
        return result

    def _authorize(self, request: Request) -> None:
        if self._token_file is None:
            raise HttpRequestFailed(403, "writes are disabled: set local.token_file")
        try:
            # read at each write so a rotated token applies at once; may name a systemd credential
            expected = read_secret(self._token_file).strip()
        except SecretError as exc:
            log.error("local API: local.token_file: %s", exc)  # names the file, never the token
            raise HttpRequestFailed(
                403, "writes are disabled: local.token_file cannot be read (see the daemon's log)"
            ) from None
        if not expected:
            raise HttpRequestFailed(403, "writes are disabled: local.token_file is empty")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="fieldgate"'}
        if scheme.lower() != "bearer" or not given.strip():
            raise HttpRequestFailed(
                401, "this action needs the token: Authorization: Bearer TOKEN", challenge
            )
        if not hmac.compare_digest(given.strip().encode("utf-8"), expected.encode("utf-8")):
            raise HttpRequestFailed(401, "wrong token", challenge)


def _address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _dumps(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)


def _parse_write(request: Request) -> tuple[str, Any]:
    """The body of a test write: {"point": NAME, "value": number | boolean | string}."""
    try:
        doc = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise HttpRequestFailed(400, 'body must be JSON: {"point": NAME, "value": VALUE}') from None
    if not isinstance(doc, dict) or set(doc) != {"point", "value"}:
        raise HttpRequestFailed(400, 'body must be exactly {"point": NAME, "value": VALUE}')
    point, value = doc["point"], doc["value"]
    if not isinstance(point, str) or not point:
        raise HttpRequestFailed(400, "point must be a non-empty string")
    if not isinstance(value, bool | int | float | str):
        raise HttpRequestFailed(400, "value must be a number, a boolean or a string")
    return point, value


async def serve(source: StatusSource, listen: str, token_file: Path | None) -> LocalServer | None:
    """The daemon's status page and API on `listen` (`local.listen`); None when it is off or its address
    cannot be had: a busy port is logged and must not stop data collection."""
    if not listen:
        return None
    server = LocalServer(source, listen, token_file)
    try:
        await server.start()
    except OSError as exc:
        log.error("status page not started on %s: %s", listen, exc.strerror or exc)
        return None
    log.info("status page on http://%s/", listen)
    return server
