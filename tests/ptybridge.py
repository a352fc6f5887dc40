"""A linked pair of pseudo-terminals: a null-modem cable in software, optionally paced at a baud rate.

Two `os.openpty()` pairs; a thread relays bytes between the two masters, so
whatever is written to `path_a` is read from `path_b` and back. With `baudrate`,
bytes leave at the line's speed (`bits_per_char` bits each, 10 for 8N1, 11 with
parity or 2 stop bits), so RTU timing is realistic. `silence()` drops traffic
(a cut cable) until `resume()`. As on a real line, when the two ends are set to
different speeds or parities (read from each pty's termios, where pyserial put
them), the bytes arrive garbled. `tap` records (direction, bytes) when `record`, and
`tap_times` the monotonic time the bridge read each of those chunks. With `turnaround`
(paced mode), the b end (the slave) cannot start answering before that many seconds
after the last byte of a request reached it: a real RTU slave only knows a request has
ended after the 3.5-character silence, so without it a simulated slave beats the line.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import time
import tty
from types import TracebackType


class PtyBridge:
    def __init__(self, baudrate: int | None = None, bits_per_char: int = 10, turnaround: float = 0.0) -> None:
        self.baudrate = baudrate
        self.bits_per_char = bits_per_char
        self.turnaround = turnaround
        self._ma, self._sa = os.openpty()
        self._mb, self._sb = os.openpty()
        for fd in (self._sa, self._sb, self._ma, self._mb):
            tty.setraw(fd)  # no echo, no CR/LF translation: bytes pass untouched
        self.path_a = os.ttyname(self._sa)
        self.path_b = os.ttyname(self._sb)
        self._silenced = threading.Event()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.bytes_relayed = 0
        self.record = False
        self.tap: list[tuple[str, bytes]] = []
        self.tap_times: list[float] = []
        self._thread = threading.Thread(target=self._run, name="ptybridge", daemon=True)
        self._thread.start()

    def silence(self) -> None:
        self._silenced.set()

    def resume(self) -> None:
        self._silenced.clear()

    def _line_settings(self, fd: int) -> tuple[int, int, int]:
        attrs = termios.tcgetattr(fd)
        return attrs[4], attrs[5], attrs[2] & (termios.PARENB | termios.PARODD | termios.CSIZE)

    def _mismatch(self) -> bool:
        try:
            return self._line_settings(self._sa) != self._line_settings(self._sb)
        except termios.error:
            return False

    def _run(self) -> None:
        peer = {self._ma: self._mb, self._mb: self._ma}
        line_free_at = {self._ma: 0.0, self._mb: 0.0}  # per direction: when the last byte has left
        while not self._stop.is_set():
            ready, _, _ = select.select([self._ma, self._mb, self._wake_r], [], [], 0.5)
            for fd in ready:
                if fd == self._wake_r:
                    return
                try:
                    data = os.read(fd, 4096)
                except OSError:  # the slave side closed and reopened: keep relaying
                    continue
                if not data or self._silenced.is_set():
                    continue
                if self._mismatch():
                    # a UART at the wrong speed/parity reads noise: flip bits, keep the length
                    data = bytes(b ^ 0x5A for b in data)
                if self.record:
                    self.tap.append(("a->b" if fd == self._ma else "b->a", data))
                    self.tap_times.append(time.monotonic())
                if self.baudrate:
                    # byte by byte on a schedule: each byte leaves bits_per_char/baud after the previous
                    per_byte = self.bits_per_char / self.baudrate
                    start = max(time.monotonic(), line_free_at[fd])
                    if fd == self._mb:  # the slave answers a request only after its end-of-frame silence
                        start = max(start, line_free_at[self._ma] + self.turnaround)
                    for i, byte in enumerate(data):
                        due = start + (i + 1) * per_byte
                        delay = due - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        os.write(peer[fd], bytes([byte]))
                    line_free_at[fd] = start + len(data) * per_byte
                else:
                    os.write(peer[fd], data)
                self.bytes_relayed += len(data)

    def close(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._ma, self._mb, self._sa, self._sb, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PtyBridge:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
