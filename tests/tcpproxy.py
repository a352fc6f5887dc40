"""A loopback TCP proxy under a test's control: forward, black-hole silently (no close), or cut connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class TcpProxy:
    """Listens on 127.0.0.1 and forwards every connection to `target_port`.

    `blackhole()` makes the network silent: bytes already accepted are held (not forwarded, not
    answered), connections stay open and new ones are accepted but get nothing through, exactly like a
    cable pulled somewhere between the gateway and the broker. `forward()` ends it and drops what was held
    (a black-holed network loses packets; TCP on both ends would see the silence, not the data).
    `cut()` closes every open connection at once (a reset).
    `hold()` is a slow link that loses nothing: bytes in both directions wait in the proxy, in order,
    until `release()` forwards them (a write held "on the wire" while the test does something else).
    `on_upstream`, if set, sees every chunk sent towards the target (client -> server), as it is read.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # accepted since start
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._flowing = asyncio.Event()  # cleared by hold(): data is kept, not dropped
        self._flowing.set()
        self.on_upstream: Callable[[bytes], None] | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def forwarding(self) -> bool:
        return self._open.is_set()

    def blackhole(self) -> None:
        self._open.clear()

    def forward(self) -> None:
        self._open.set()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        try:
            # A connection made during a black hole hangs like a SYN into the void would: nothing is
            # connected upstream until the network comes back.
            await self._open.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                return
            self._writers.add(up_writer)
            try:
                a = asyncio.create_task(self._pipe(reader, up_writer, upstream=True))
                b = asyncio.create_task(self._pipe(up_reader, writer))
                self._pipes.update((a, b))
                _, pending = await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                await asyncio.gather(a, b, return_exceptions=True)
                self._pipes.difference_update((a, b))
            finally:
                self._writers.discard(up_writer)
                await _close(up_writer)
        finally:
            self._writers.discard(writer)
            if me is not None:
                self._handlers.discard(me)
            await _close(writer)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upstream: bool = False
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await src.read(65536)
                if not data:
                    return
                if upstream and self.on_upstream is not None:
                    self.on_upstream(data)
                if not self._open.is_set():
                    continue  # swallowed: the black hole
                await self._flowing.wait()  # held: kept in order until release()
                dst.write(data)
                await dst.drain()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            tasks = [*self._pipes, *self._handlers]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()
