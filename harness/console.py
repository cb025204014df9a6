"""The guest's serial console: the reader that owns its socket, and the pure
parsers it feeds (what ends a boot wait at once).

Parser input: decoded console lines without their line ending (the serial
console sends CR LF; the CR is stripped by `split_lines`). Kernel lines may
carry a `[    1.234567] ` timestamp prefix, which the patterns tolerate.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.dmesg import default_rules
from harness.events import Event, EventLog, Source

# The dmesg rules that end a boot at once: the same patterns the engine uses.
_FATAL = tuple((r.id, r.pattern) for r in default_rules() if r.id in ("panic", "oops"))
_BANNER = re.compile(r"Linux version \d+\.\d+")


@dataclass(frozen=True)
class BootFault:
    kind: str
    line: str


class BootScanner:
    """Feeds on console lines; reports the first fault that must end a boot.

    A second "Linux version" banner means the guest reset (a triple fault, or
    a reboot the profile did not suppress).
    """

    def __init__(self) -> None:
        self.banners = 0
        self.fault: BootFault | None = None

    def feed(self, line: str) -> BootFault | None:
        if self.fault is not None:
            return self.fault
        if _BANNER.search(line):
            self.banners += 1
            if self.banners > 1:
                self.fault = BootFault("reset", line)
                return self.fault
        for kind, pattern in _FATAL:
            if pattern.search(line):
                self.fault = BootFault(kind, line)
                return self.fault
        return None


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Split raw console bytes into complete decoded lines and the unfinished rest."""
    *complete, rest = buffer.split(b"\n")
    return [c.rstrip(b"\r").decode("utf-8", "replace") for c in complete], rest


class Console:
    """The console socket QEMU connected to, read by one thread of its own.

    Every byte is teed raw to the log (and to `sink`, a terminal) before it is
    split into lines and fed to a BootScanner. With `events`, each line also goes
    to the run's event log stamped with the host time its first byte arrived
    (the guest's printk time, if it has one, is in the text; harness/timeline.py
    maps one onto the other). `close()` stops and joins the reader.

    The socket is drained from the start, whether or not anyone is waiting on
    the boot: once its buffer is full QEMU stops taking bytes from the emulated
    UART, and the guest's console writes stall waiting for it, so a guest that
    prints a lot would crawl to the deadline with nobody reading.
    """

    def __init__(self, sock: socket.socket, log: Path, sink: Callable[[bytes], None] | None = None,
                 events: EventLog | None = None) -> None:
        self._sock = sock
        self._log = log
        self._sink = sink
        self._events = events
        self._lines: list[str] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self._scanner = BootScanner()
        self._reader: threading.Thread | None = None
        self.log_error: str | None = None  # why the raw log stopped, if it had to

    def start(self, name: str) -> None:
        self._reader = threading.Thread(target=self._read, name=name, daemon=True)
        self._reader.start()

    @property
    def fault(self) -> BootFault | None:
        """The first fault that ends a boot (panic, oops, reset), once seen."""
        return self._scanner.fault

    @property
    def bytes_read(self) -> int:
        with self._lock:
            return self._bytes

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def send(self, data: bytes) -> None:
        """Type into the console (the guest's ttyS0)."""
        self._sock.sendall(data)

    def wait_closed(self, timeout: float) -> None:
        """Wait up to `timeout` s for the reader to reach the end (QEMU closed its side)."""
        if self._reader is not None:
            self._reader.join(timeout)

    def close(self) -> None:
        """Close the socket and join the reader; safe to call twice."""
        try:
            # shutdown() wakes a reader blocked in recv(); close() alone does not.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self.wait_closed(2.0)

    def _read(self) -> None:
        pending = b""
        pending_since: tuple[float, float] | None = None   # when the unfinished line's first byte came
        try:
            log = open(self._log, "ab", buffering=0)
        except OSError as e:
            self.log_error = f"{self._log}: {e.strerror} (no console log)"
            log = open(os.devnull, "ab", buffering=0)
        with log:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                arrived = (time.time(), time.monotonic())
                # Tee first, parse second: the raw bytes are on disk before any
                # decision is taken on them. A full or read-only results disk must
                # not stop the draining (QEMU would block on the socket and the
                # guest with it): the log stops, the reading goes on.
                if self.log_error is None:
                    try:
                        log.write(data)
                    except OSError as e:
                        self.log_error = f"{self._log}: {e.strerror} (console log cut here)"
                if self._sink is not None:
                    self._sink(data)
                lines, rest = split_lines(pending + data)
                self._stamp(lines, pending_since or arrived, arrived)
                if rest:
                    pending_since = (pending_since or arrived) if not lines else arrived
                else:
                    pending_since = None
                pending = rest
                self._add(lines, len(data))
        if pending:
            last = [pending.decode("utf-8", "replace")]
            self._stamp(last, pending_since or (time.time(), time.monotonic()), None)
            self._add(last, 0)

    def _stamp(self, lines: list[str], first: tuple[float, float], rest: tuple[float, float] | None) -> None:
        """Console events for `lines`: the first began at `first`, the others in the chunk that came at `rest`."""
        if self._events is None or not lines:
            return
        worker = self._events.worker
        stamps = [first] + [rest or first] * (len(lines) - 1)
        self._events.write(Event(t, Source.GUEST, "console", line, worker, mono)
                           for line, (t, mono) in zip(lines, stamps, strict=True))

    def _add(self, lines: list[str], size: int) -> None:
        with self._lock:
            self._bytes += size
            for line in lines:
                self._lines.append(line)
                self._scanner.feed(line)
