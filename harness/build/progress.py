"""Build progress a person can plan with: objects done of a total, and the time left.

The total comes from the previous build of the same configuration (a record in
the cache: how many objects it compiled and when), else is counted from the
tree: for a cold object directory, the objects the Kbuild files ask for under
this .config (`count_objects`, an estimate shown with `~`); for one that holds a
previous build, the objects whose recorded dependencies are newer than they are
(`stale_objects`, what make will rebuild). The time left follows the previous
build's pace through the same share of the work (its link at the end included),
else the pace so far.

Everything here but `Terminal` and the record files is pure: lines and times in,
numbers and text out.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from harness.build.kbuild_count import count_objects, stale_objects
from harness.paths import atomic_write

Say = Callable[[str], None]

# kbuild's quiet lines for compiled objects: "  CC      kernel/fork.o", "  CC [M]  drivers/x.o", "  AS ...".
_OBJECT = re.compile(r"^  (?:CC|AS)(?: \[M\])?\s+(\S+\.o)$")
# Any kbuild quiet line ("  LD      vmlinux", "  AR      init/built-in.a"): the step now being done.
_STEP = re.compile(r"^  ([A-Z][A-Z0-9_]{1,9}(?: \[M\])?)\s+(\S.*)$")


def object_of(line: str) -> str | None:
    """The object a make output line says is being compiled, or None."""
    m = _OBJECT.match(line)
    return m.group(1) if m else None


def step_of(line: str) -> str | None:
    """`CC kernel/fork.o` for a kbuild quiet line, or None."""
    m = _STEP.match(line)
    return f"{m.group(1)} {m.group(2).strip()}" if m else None


# -- the previous build of a configuration ---------------------------------------------


@dataclass(frozen=True)
class Record:
    """A finished compile of one configuration from an empty object directory: how
    many objects, how long, and when each twentieth of the objects was done (so the
    next build's estimate knows the link at the end takes a while)."""

    objects: int
    seconds: float
    curve: tuple[float, ...]    # 21 points: elapsed seconds when 0/20, 1/20 ... 20/20 of the objects were done

    @classmethod
    def of(cls, times: list[float], seconds: float) -> Record | None:
        """From the elapsed time of each compiled object; None if there were none."""
        if not times:
            return None
        n = len(times)
        curve = tuple(round(times[min(n - 1, max(0, round(k * n / 20) - 1))] if k else 0.0, 2) for k in range(21))
        return cls(n, round(seconds, 2), curve)

    def at(self, done: int) -> float:
        """Seconds the recorded build had taken when `done` objects were done (interpolated)."""
        x = min(max(done / self.objects, 0.0), 1.0) * 20
        k = min(int(x), 19)
        return self.curve[k] + (self.curve[k + 1] - self.curve[k]) * (x - k)

    @property
    def tail(self) -> float:
        """Seconds after the last object: linking vmlinux, the boot image."""
        return max(0.0, self.seconds - self.curve[-1])

    @property
    def per_object(self) -> float:
        return self.curve[-1] / self.objects


def load_record(path: Path) -> Record | None:
    try:
        data = json.loads(path.read_text())
        return Record(int(data["objects"]), float(data["seconds"]), tuple(float(x) for x in data["curve"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_record(path: Path, record: Record) -> None:
    atomic_write(path, json.dumps(asdict(record)) + "\n")


# -- what is shown ----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What this compile expects: `total` objects (None: unknown), where that number
    comes from, and the previous build of the configuration, if any."""

    total: int | None
    source: str                 # "last build" | "counted" | "to rebuild" | ""
    record: Record | None = None
    cold: bool = True


def plan_for(srctree: Path, objtree: Path, config: dict[str, str], record: Record | None, cold: bool,
             started: float) -> Plan:
    """The plan of a compile in `objtree`: from an empty one (`cold`), the previous
    cold build's objects if there is a record, else those the Kbuild files ask for;
    else the objects make will compile again (those written since `started`
    included: make runs while this counts)."""
    if cold:
        if record is not None:
            return Plan(record.objects, "last build", record, True)
        return Plan(count_objects(srctree, config) or None, "counted", None, True)
    return Plan(stale_objects(objtree, started), "to rebuild", record, False)


@dataclass(frozen=True)
class Status:
    label: str
    done: int
    total: int | None
    estimated: bool             # the total is an estimate (counted from the Kbuild files)
    elapsed: float
    left: float | None
    step: str


def time_left(plan: Plan, done: int, elapsed: float, last: float | None = None) -> float | None:
    """Seconds left. `last`: the elapsed time when the latest object was done (default
    `elapsed`); the build is expected to end that long after it that the rest took
    the previous build of the configuration, scaled by how this build's pace
    compares with that one's (a loaded machine); without one, at the pace so far."""
    last = elapsed if last is None else last
    rec = plan.record
    if plan.cold and rec is not None and plan.total == rec.objects:
        then = rec.at(done)
        scale = last / then if then >= 5 and last >= 5 else 1.0
        end = last + max(0.0, rec.seconds - then) * scale
    elif plan.total is None:
        return None
    elif rec is not None:
        # An incremental build: its objects at the recorded pace, then the link.
        end = last + max(0, plan.total - done) * rec.per_object + rec.tail
    elif done >= 5 and last >= 5:
        end = last + max(0, plan.total - done) * last / done
    else:
        return None
    return max(0.0, end - elapsed)


def status(label: str, plan: Plan, done: int, elapsed: float, step: str, last: float | None = None) -> Status:
    """Where a compile stands; `last` as for `time_left`."""
    total = plan.total if plan.total is None else max(plan.total, done)
    return Status(label, done, total, plan.source == "counted", elapsed, time_left(plan, done, elapsed, last), step)


def duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _prefix(label: str) -> str:
    return "build" if label in ("build", "") else f"build {label}"


def plain_line(s: Status) -> str:
    """One line for a log: `build: 412/~1480 objects (28%), 2m03s, about 3m10s left; CC kernel/fork.o`."""
    if s.total:
        count = f"{s.done}/{'~' if s.estimated else ''}{s.total} objects ({100 * s.done // s.total}%)"
    else:
        count = f"{s.done} objects"
    left = f", about {duration(s.left)} left" if s.left is not None else ""
    step = f"; {s.step[:60]}" if s.step else ""
    return f"{_prefix(s.label)}: {count}, {duration(s.elapsed)}{left}{step}"


def bar_line(s: Status, width: int) -> str:
    """The terminal's line: `build [#######.......] 412/1480 28% 2m03s ~3m10s left  CC kernel/fork.o`, in `width`."""
    left = f" ~{duration(s.left)} left" if s.left is not None else ""
    if s.total:
        frac = min(1.0, s.done / s.total)
        count = f" {s.done}/{'~' if s.estimated else ''}{s.total} {int(100 * frac)}%"
        cells = 20
        bar = "[" + "#" * int(frac * cells) + "." * (cells - int(frac * cells)) + "]"
    else:
        count, bar = f" {s.done} objects", ""
    head = f"{_prefix(s.label)} {bar}{count} {duration(s.elapsed)}{left}"
    room = width - len(head) - 3
    return (head + ("  " + s.step[:room] if room > 10 and s.step else ""))[:max(width - 1, 0)]


class Terminal:
    """Progress on a terminal: lines as they come, and one bar line redrawn in place
    below them. `say` is the build's usual line sink; the bar is never in a log."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._bar = ""
        self._lock = threading.Lock()

    @staticmethod
    def wanted(stream: TextIO | None = None) -> bool:
        stream = stream or sys.stderr
        return stream.isatty() and os.environ.get("TERM", "dumb") != "dumb" and not os.environ.get("CI")

    def __call__(self, line: str) -> None:
        with self._lock:
            self._stream.write(("\r\033[K" if self._bar else "") + line + "\n" + self._bar)
            self._stream.flush()

    def show(self, s: Status) -> None:
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns or 80   # 0 from a pty nobody sized
        except (OSError, ValueError):
            width = 80
        with self._lock:
            self._bar = bar_line(s, width)
            self._stream.write("\r\033[K" + self._bar)
            self._stream.flush()

    def clear(self) -> None:
        with self._lock:
            if self._bar:
                self._stream.write("\r\033[K")
                self._stream.flush()
            self._bar = ""
