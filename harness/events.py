"""The run's event log: results/<run-id>/events.jsonl, one JSON object per line.

Every source stamps its events with the host's wall-clock time (`time.time()`)
and monotonic time as they happen and appends them at once, so a run that dies
half-way keeps its events up to that point. The writers:

- the console reader: each console line with the host time its first byte
  arrived (console.log itself stays the raw bytes, untouched);
- the QMP channel: each command sent (with its key arguments) and its reply,
  and each asynchronous event with QEMU's own timestamp;
- the machine and the pytest plugin: the harness's own steps (QEMU started,
  boot detected, each guest test's start and end with its outcome, shutdown);
- the runner: the tests' start and end, and at the end the host kernel's lines
  from the run's window.

Several processes append to the one file (each pytest-xdist worker's VM, the
runner): each write is one write(2) of whole lines on an O_APPEND descriptor,
which Linux keeps whole on a local filesystem, so lines never interleave. A
run killed during a write leaves at most one torn last line, which
`read_events` skips and counts.

The log never fails a run: a write that fails (a full results disk) stops the
log, and `EventLog.error` says why. `harness/timeline.py` makes timeline.txt
from the log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"


class Source(StrEnum):
    GUEST = "guest"        # the guest's serial console
    QMP = "qmp"            # commands to QEMU, their replies, QEMU's events
    HARNESS = "harness"    # the harness's own steps
    HOST = "host"          # the host kernel's log


@dataclass(frozen=True)
class Event:
    """One thing that happened, as it was seen.

    `t` is host wall-clock seconds (for a QMP event, QEMU's own timestamp,
    which is the host's wall clock too); `mono` the host's monotonic clock
    where the writer took it. `kind` names what it is within its source:
    guest `console`; qmp `command`, `reply`, `event`; host `kmsg`, `note`;
    harness a step (`qemu-started`, `boot-detected`, `boot-failed`,
    `shutdown`, `qemu-exited`, `test-start`, `test-end`, `tests-started`,
    `tests-ended`, `run-ended`). `data` carries what a reader may want beyond
    the text (the QMP command's id and arguments, a test's outcome, a kernel
    record's own timestamp).
    """

    t: float
    source: Source
    kind: str
    text: str
    worker: str = ""
    mono: float | None = None
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "source": self.source.value, "kind": self.kind,
                               "text": self.text}
        if self.worker:
            out["worker"] = self.worker
        if self.mono is not None:
            out["mono"] = round(self.mono, 6)
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, data: object) -> Event:
        """The event `data` holds. Raises ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("an event is a JSON object")
        t, mono, extra = data.get("t"), data.get("mono"), data.get("data")
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ValueError("t: expected a number")
        if mono is not None and (not isinstance(mono, (int, float)) or isinstance(mono, bool)):
            raise ValueError("mono: expected a number")
        if extra is not None and not isinstance(extra, dict):
            raise ValueError("data: expected an object")
        for key in ("kind", "text"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key}: expected a string")
        worker = data.get("worker", "")
        if not isinstance(worker, str):
            raise ValueError("worker: expected a string")
        try:
            source = Source(str(data.get("source")))
        except ValueError:
            raise ValueError(f"source: {data.get('source')!r} is not one of "
                             f"{', '.join(s.value for s in Source)}") from None
        return cls(float(t), source, str(data["kind"]), str(data["text"]), worker,
                   float(mono) if mono is not None else None, extra)


class EventLog:
    """The appending end of a run's events.jsonl, for one writer (a VM, the runner).

    Thread-safe; never raises: the first write that fails closes the log and
    sets `error`.
    """

    def __init__(self, path: Path, worker: str = "") -> None:
        self.path = path
        self.worker = worker
        self.error: str | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()

    def event(self, source: Source, kind: str, text: str, data: dict[str, Any] | None = None,
              t: float | None = None) -> Event:
        """An event of this writer stamped now (or at wall-clock `t`), not yet written."""
        return Event(time.time() if t is None else t, source, kind, text, self.worker, time.monotonic(), data)

    def emit(self, source: Source, kind: str, text: str, data: dict[str, Any] | None = None,
             t: float | None = None) -> None:
        """Stamp and append one event."""
        self.write([self.event(source, kind, text, data, t)])

    def write(self, events: Iterable[Event]) -> None:
        """Append events already stamped, in one write."""
        payload = "".join(json.dumps(e.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
                          for e in events).encode()
        if not payload:
            return
        with self._lock:
            if self.error is not None:
                return
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                written = os.write(self._fd, payload)
                if written != len(payload):
                    raise OSError(0, f"short write ({written} of {len(payload)} bytes)")
            except OSError as e:
                self.error = f"{self.path}: {e.strerror} (event log stopped here)"
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def read_events(path: Path) -> tuple[list[Event], int]:
    """The events in the file, in the order they were written, and how many lines
    were not events (a line torn by a kill, a foreign line). A missing file is no events."""
    try:
        raw = path.read_bytes()
    except OSError:
        return [], 0
    events, bad = [], 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            events.append(Event.from_json(json.loads(line)))
        except ValueError:
            bad += 1
    return events, bad
