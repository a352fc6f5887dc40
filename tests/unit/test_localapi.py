"""The local HTTP server over real loopback HTTP with a fake StatusSource; and the `status` verb's output."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.control.localapi import MAX_BODY, LocalServer, parse_listen, serve
from agent.errors import WriteRefused
from agent.verbs import status as status_verb

TOKEN = "s3cret-token-for-tests"


def status_doc() -> dict[str, Any]:
    return {
        "ts": 1_700_000_100_000,
        "uptime_s": 3700,
        "version": "0.1.0",
        "gateway": {"id": "gw-test", "name": "Armoire test"},
        "buffer": {"pending": 12, "oldest_ts": 1_700_000_000_000, "evicted": 3, "bytes": 40960,
                   "recovered": 0, "disk_errors": 0, "last_error": None},
        "upstream": {"connected": False, "sent": 99, "url": "mqtt://127.0.0.1:1883",
                     "last_error": "connection refused", "since_ts": 1_700_000_040_000},
        "devices": {
            "meter-1": {"state": "ok", "errors": 0, "last_ok_ts": 1_700_000_098_000, "last_error": None,
                        "driver": "modbus", "point_errors": {}, "next_attempt_ts": None, "counters": {},
                        "readings": {"voltage": {"value": 230.1, "unit": "V", "ts": 1_700_000_098_000},
                                     "on": {"value": True, "unit": None, "ts": 1_700_000_098_000}}},
            "lamp:2": {"state": "failing", "errors": 7, "last_ok_ts": None,
                       "last_error": "no answer from unit 3 within 1 s", "driver": "modbus",
                       "point_errors": {"dim": "illegal data address"},
                       "next_attempt_ts": 1_700_000_108_000, "counters": {}, "readings": {}},
        },
    }  # fmt: skip


class FakeSource:
    """Our own StatusSource interface, recording the actions it was asked for."""

    def __init__(self) -> None:
        self.doc = status_doc()
        self.polls: list[str] = []
        self.writes: list[tuple[str, str, Any]] = []
        self.refreshed = 0

    async def refresh(self) -> None:
        self.refreshed += 1

    def status(self) -> dict[str, Any]:
        return self.doc

    async def poll_now(self, device: str) -> None:
        if device not in self.doc["devices"]:
            raise KeyError(device)
        self.polls.append(device)

    async def write(self, device: str, point: str, value: Any) -> dict[str, Any]:
        if device not in self.doc["devices"]:
            raise KeyError(device)
        if point == "forbidden":
            raise WriteRefused(f"{point} is not writable")
        self.writes.append((device, point, value))
        return {"ok": True, "value": value, "ts": 1}


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        writer.write_eof()  # half-close: a truncated request is seen as such, not waited for
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body) or not body
    return status, headers, body


def request(method: str, path: str, body: bytes = b"", token: str | None = None, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "local.token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
async def served(token_file: Path) -> AsyncIterator[tuple[LocalServer, FakeSource]]:
    source = FakeSource()
    server = LocalServer(source, "127.0.0.1:0", token_file)
    await server.start()
    try:
        yield server, source
    finally:
        await server.aclose()


async def test_status_json(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    status, headers, body = await http(server.port, request("GET", "/api/status"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body) == source.doc
    assert TOKEN.encode() not in body
    assert source.refreshed == 1  # the figures were brought up to date for this request


async def test_page_is_served_self_contained(served: tuple[LocalServer, FakeSource]) -> None:
    server, _ = served
    status, headers, body = await http(server.port, request("GET", "/"))
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"/api/status" in body
    assert len(body) < 16 * 1024
    # works offline: no external script, style, font or image
    assert b'src="http' not in body and b'href="http' not in body and b"@import" not in body
    assert "default-src 'none'" in headers["content-security-policy"]


async def test_head_and_query_string(served: tuple[LocalServer, FakeSource]) -> None:
    server, _ = served
    status, headers, body = await http(server.port, request("HEAD", "/api/status?x=1"))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize("action", ["poll", "write"])
@pytest.mark.parametrize(
    ("token", "expected"),
    [(None, "needs the token"), ("wrong-token", "wrong token"), ("", "needs the token")],
)
async def test_writes_need_the_token(
    served: tuple[LocalServer, FakeSource], action: str, token: str | None, expected: str
) -> None:
    server, source = served
    body = b'{"point": "dim", "value": 50}' if action == "write" else b""
    status, headers, answer = await http(
        server.port, request("POST", f"/api/devices/meter-1/{action}", body, token)
    )
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert expected in json.loads(answer)["error"]
    assert source.polls == [] and source.writes == []


async def test_other_auth_scheme_is_refused(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    raw = request("POST", "/api/devices/meter-1/poll", extra=f"Authorization: Basic {TOKEN}\r\n")
    status, _, _ = await http(server.port, raw)
    assert status == 401 and source.polls == []


async def test_writes_disabled_without_token_file() -> None:
    source = FakeSource()
    server = LocalServer(source, "127.0.0.1:0", None)
    await server.start()
    try:
        status, _, body = await http(server.port, request("POST", "/api/devices/meter-1/poll", token=TOKEN))
    finally:
        await server.aclose()
    assert status == 403
    assert json.loads(body)["error"] == "writes are disabled: set local.token_file"
    assert source.polls == []


@pytest.mark.parametrize("content", ["\n", None])
async def test_empty_or_missing_token_file_disables_writes(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "local.token"
    if content is not None:
        path.write_text(content)
    source = FakeSource()
    server = LocalServer(source, "127.0.0.1:0", path)
    await server.start()
    try:
        status, _, _ = await http(server.port, request("POST", "/api/devices/meter-1/poll", token=""))
    finally:
        await server.aclose()
    assert status == 403 and source.polls == []


async def test_poll_with_token(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    status, _, body = await http(server.port, request("POST", "/api/devices/lamp%3A2/poll", token=TOKEN))
    assert status == 200
    assert json.loads(body) == {"ok": True, "device": "lamp:2"}
    assert source.polls == ["lamp:2"]


async def test_write_with_token(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    raw = request("POST", "/api/devices/meter-1/write", b'{"point": "dim", "value": 42.5}', TOKEN)
    status, _, body = await http(server.port, raw)
    assert status == 200
    assert json.loads(body)["ok"] is True
    assert source.writes == [("meter-1", "dim", 42.5)]


async def test_refused_write_is_a_result_not_a_crash(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    raw = request("POST", "/api/devices/meter-1/write", b'{"point": "forbidden", "value": 1}', TOKEN)
    status, _, body = await http(server.port, raw)
    assert status == 200
    assert json.loads(body) == {"ok": False, "error": "forbidden is not writable"}
    assert source.writes == []


@pytest.mark.parametrize("action", ["poll", "write"])
async def test_unknown_device_is_404(served: tuple[LocalServer, FakeSource], action: str) -> None:
    server, source = served
    body = b'{"point": "dim", "value": 1}' if action == "write" else b""
    status, _, answer = await http(server.port, request("POST", f"/api/devices/nope/{action}", body, TOKEN))
    assert status == 404
    assert "unknown device 'nope'" in json.loads(answer)["error"]
    assert source.polls == [] and source.writes == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"point": "dim"}',
        b'{"point": "", "value": 1}',
        b'{"point": "dim", "value": null}',
        b'{"point": "dim", "value": {"a": 1}}',
        b'{"point": "dim", "value": 1, "extra": 2}',
        b"\xff\xfe",
    ],
)
async def test_bad_write_bodies_are_400(served: tuple[LocalServer, FakeSource], body: bytes) -> None:
    server, source = served
    status, _, answer = await http(server.port, request("POST", "/api/devices/meter-1/write", body, TOKEN))
    assert status == 400
    assert json.loads(answer)["error"]
    assert source.writes == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS ClientHello
        (b"GET\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET http://evil/ HTTP/1.1\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / FOO/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
        (b"POST /api/devices/meter-1/poll HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /api/devices/meter-1/poll HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /api/devices/meter-1/poll HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
        (b"POST /api/devices/meter-1/poll HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n", 400),  # the client closes mid-head
    ],
)
async def test_garbage_is_400_never_a_crash(
    served: tuple[LocalServer, FakeSource], raw: bytes, expected: int
) -> None:
    server, source = served
    status, _, body = await http(server.port, raw)
    assert status == expected
    assert json.loads(body)["error"]
    assert source.polls == [] and source.writes == []
    # and the server still answers
    status, _, _ = await http(server.port, request("GET", "/api/status"))
    assert status == 200


async def test_body_too_large_is_413(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    raw = request("POST", "/api/devices/meter-1/write", b"x" * (MAX_BODY + 1), TOKEN)
    status, _, _ = await http(server.port, raw)
    assert status == 413 and source.writes == []


@pytest.mark.parametrize(
    ("method", "path", "expected", "allow"),
    [
        ("POST", "/api/status", 405, "GET, HEAD"),
        ("DELETE", "/", 405, "GET, HEAD"),
        ("GET", "/api/devices/meter-1/poll", 405, "POST"),
        ("GET", "/nope", 404, None),
        ("POST", "/api/devices/meter-1/reboot", 404, None),
        ("GET", "/api/devices//poll", 404, None),
    ],
)
async def test_routes(
    served: tuple[LocalServer, FakeSource], method: str, path: str, expected: int, allow: str | None
) -> None:
    server, source = served
    status, headers, _ = await http(server.port, request(method, path, token=TOKEN))
    assert status == expected
    assert headers.get("allow") == allow
    assert source.polls == []


async def test_client_closing_without_a_request(served: tuple[LocalServer, FakeSource]) -> None:
    server, _ = served
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.close()
    await writer.wait_closed()
    status, _, _ = await http(server.port, request("GET", "/api/status"))
    assert status == 200


async def test_stalled_client_gets_408(token_file: Path) -> None:
    server = LocalServer(FakeSource(), "127.0.0.1:0", token_file, read_timeout=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /api/status HTTP/1.1\r\n")  # ...and nothing more
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        await server.aclose()
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_aclose_ends_open_connections(token_file: Path) -> None:
    server = LocalServer(FakeSource(), "127.0.0.1:0", token_file)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /api/status HTTP/1.1\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # let the server pick the connection up
    await server.aclose()
    assert await reader.read() == b""  # closed by the server, not left hanging
    writer.close()
    await writer.wait_closed()


async def test_status_source_failure_is_500(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served
    source.doc = {"devices": {1.5: object()}}  # cannot be encoded
    status, _, body = await http(server.port, request("GET", "/api/status"))
    assert status == 500 and b"error" in body


async def test_unencodable_write_result_is_500(served: tuple[LocalServer, FakeSource]) -> None:
    server, source = served

    async def bad_write(device: str, point: str, value: Any) -> dict[str, Any]:
        return {"ok": True, "value": object()}

    source.write = bad_write  # type: ignore[method-assign]
    raw = request("POST", "/api/devices/meter-1/write", b'{"point": "dim", "value": 1}', TOKEN)
    status, _, _ = await http(server.port, raw)
    assert status == 500


async def test_disabled_and_port_before_start() -> None:
    server = LocalServer(FakeSource(), "", None)
    await server.start()
    assert not server.enabled
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.aclose()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:8470", ("127.0.0.1", 8470)), ("[::1]:80", ("::1", 80)), ("0.0.0.0:0", ("0.0.0.0", 0))],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8470", "localhost", ":8470", "host:99999", "host:http"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError, match=r"local\.listen"):
        parse_listen(listen)


# -- the `status` verb ---------------------------------------------------------------------------------


def test_render_summary() -> None:
    text = status_verb.render(status_doc())
    lines = text.splitlines()
    assert lines[0] == 'fieldgate 0.1.0: gw-test "Armoire test", up 62 min'
    assert "DISCONNECTED from mqtt://127.0.0.1:1883 for 60 s" in text
    assert "last error: connection refused" in text
    assert "12 pending, oldest 2 min old, 41.0 kB on disk, 3 evicted" in text
    assert "devices   2: 1 ok, 1 failing" in text
    meter = next(line for line in lines if "meter-1" in line)
    assert "ok" in meter and "voltage 230.1 V" in meter and "on true" in meter and "(2 s ago)" in meter
    lamp = next(line for line in lines if "lamp:2" in line)
    assert "FAILING" in lamp and "no reading yet" in lamp
    assert "no answer from unit 3 within 1 s (7 errors, never ok, next try in 8 s)" in text
    assert "dim: illegal data address" in text


def _args(url: str, as_json: bool = False) -> argparse.Namespace:
    return argparse.Namespace(url=url, json=as_json, config=Path("/nonexistent/fieldgate.yaml"))


async def test_status_verb_against_the_server(
    served: tuple[LocalServer, FakeSource], capsys: pytest.CaptureFixture[str]
) -> None:
    server, source = served
    code = await asyncio.to_thread(status_verb.main, _args(f"http://127.0.0.1:{server.port}", as_json=True))
    assert code == 0
    assert json.loads(capsys.readouterr().out) == source.doc
    code = await asyncio.to_thread(status_verb.main, _args(f"http://127.0.0.1:{server.port}"))
    assert code == 0
    assert "meter-1" in capsys.readouterr().out


async def test_status_verb_no_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    # a port that was just free: nothing listens there
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    code = await asyncio.to_thread(status_verb.main, _args(f"http://127.0.0.1:{port}"))
    assert code == 1
    err = capsys.readouterr().err
    assert "no fieldgate daemon answers on" in err and "systemctl status fieldgate" in err


async def test_serve_leaves_data_collection_alone_when_its_port_is_taken() -> None:
    """The daemon's way in (`serve`): off when `local.listen` is empty, None (logged) on a busy address."""
    assert await serve(FakeSource(), "", None) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert await serve(FakeSource(), f"127.0.0.1:{port}", None) is None
    server = await serve(FakeSource(), "127.0.0.1:0", None)
    assert server is not None and server.port > 0
    await server.aclose()
