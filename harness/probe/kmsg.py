"""The host kernel's log over a window of time, read from /dev/kmsg.

`HostKernelLog` opens /dev/kmsg when a run starts and seeks to its end, so
what it reads at the end of the run is exactly what the host kernel logged in
between (by sequence number, not by a guess on timestamps). Reads never block
and never fail the run: a host that does not let us read its log (no
CAP_SYSLOG with `kernel.dmesg_restrict=1`, a container) is a note saying so.

Record format (Documentation/ABI/testing/dev-kmsg): one record per read(2),

    <prefix>,<seq>,<usec>,<flags>[,...];<message>
     KEY=value            (continuation lines of the record's dictionary)

where prefix is facility << 3 | level, usec the printk clock in microseconds
since boot, and non-printable bytes of the message escaped as `\\xNN`. The
printk clock is the kernel's local_clock(); this reader maps it to wall-clock
time as CLOCK_MONOTONIC, which runs with it apart from NTP's slewing (a host
up for weeks can see the two apart by a fraction of a second or more).
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

KMSG = Path("/dev/kmsg")
_RECORD = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;(.*)$", re.S)
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_MAX_RECORDS = 100_000   # a host that logs without pause cannot make the read endless


@dataclass(frozen=True)
class KmsgRecord:
    seq: int
    usec: int          # printk clock, microseconds since the host booted
    level: int         # 0 emerg .. 7 debug
    facility: int      # 0 kernel, 1 user (a line written to /dev/kmsg)...
    text: str


def parse_kmsg(record: str) -> KmsgRecord | None:
    """One /dev/kmsg record (its dictionary lines dropped, escapes undone); None if it is not one."""
    head = record.split("\n", 1)[0]
    m = _RECORD.match(head)
    if m is None:
        return None
    prefix, seq, usec, message = int(m[1]), int(m[2]), int(m[3]), m[4]
    text = _ESCAPE.sub(lambda e: chr(int(e[1], 16)) if e[1].lower() not in ("0a", "0d") else " ", message)
    return KmsgRecord(seq, usec, prefix & 7, prefix >> 3, text)


def wall_minus_monotonic() -> float:
    """time.time() - CLOCK_MONOTONIC, from the tightest of a few readings taken together."""
    best: tuple[float, float] | None = None
    for _ in range(5):
        before = time.time()
        mono = time.clock_gettime(time.CLOCK_MONOTONIC)
        after = time.time()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) / 2 - mono)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class HostLogWindow:
    """What the host kernel logged in a run's window."""

    source: str                  # "/dev/kmsg"
    records: list[KmsgRecord] = field(default_factory=list)
    wall_minus_mono: float = 0.0  # add to a record's usec / 1e6 for host wall-clock time
    note: str | None = None      # why lines are missing (unreadable log, overflowed ring)

    def wall_time(self, record: KmsgRecord) -> float:
        return record.usec / 1e6 + self.wall_minus_mono


class HostKernelLog:
    """/dev/kmsg from the moment this is made until `read()`; see the module docstring."""

    def __init__(self, path: Path = KMSG) -> None:
        self.path = path
        self._fd: int | None = None
        self._error: str | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:
            self._error = (f"host kernel log not readable: {path}: {e.strerror}"
                           + (" (kernel.dmesg_restrict without CAP_SYSLOG, or a container)"
                              if e.errno in (errno.EPERM, errno.EACCES) else ""))
            self.close()

    def read(self) -> HostLogWindow:
        """Everything logged since this was made (then closed); never raises."""
        if self._fd is None:
            return HostLogWindow(str(self.path), note=self._error or f"{self.path}: already read")
        records: list[KmsgRecord] = []
        note = None
        try:
            while len(records) < _MAX_RECORDS:
                try:
                    raw = os.read(self._fd, 16384)
                except BlockingIOError:
                    break
                except BrokenPipeError:
                    # The ring buffer wrapped past us: the oldest lines of the window are gone.
                    note = f"{self.path}: the host log overflowed during the run; some of its lines are lost"
                    continue
                except OSError as e:
                    note = f"{self.path}: reading stopped: {e.strerror}"
                    break
                if not raw:
                    break
                parsed = parse_kmsg(raw.decode("utf-8", "replace"))
                if parsed is not None:
                    records.append(parsed)
            else:
                note = f"{self.path}: more than {_MAX_RECORDS} lines during the run; the rest not read"
        finally:
            self.close()
        return HostLogWindow(str(self.path), records, wall_minus_monotonic(), note)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
