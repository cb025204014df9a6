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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

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


# -- counted from the tree --------------------------------------------------------------

_ASSIGN = re.compile(r"^([A-Za-z0-9_./-]+?)-(y|m|objs)\s*(?:\+=|:=|=)\s*(.*)$")
_COND = re.compile(r"^(ifdef|ifndef|ifeq|ifneq)\s*(.*)$")
_VAR = re.compile(r"\$\((CONFIG_\w+|BITS|SRCARCH|ARCH)\)")


def _logical_lines(text: str) -> Iterable[str]:
    """Makefile lines with continuations joined and comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0]
        if raw.rstrip().endswith("\\"):
            pending += line.rstrip().removesuffix("\\") + " "
            continue
        yield (pending + line).strip()
        pending = ""


def _condition(kind: str, arg: str, expand: Callable[[str], str]) -> bool | None:
    """Whether an `ifdef`/`ifndef`/`ifeq`/`ifneq` holds; None when it names something
    other than config options (both branches then count)."""
    if kind in ("ifdef", "ifndef"):
        value = expand(f"$({arg.strip()})")
        if "$(" in value:
            return None
        return (value not in ("", "n")) == (kind == "ifdef")
    m = re.match(r"^\(\s*(.*?)\s*,\s*(.*?)\s*\)$", arg.strip())
    if not m:
        return None
    a, b = expand(m.group(1)), expand(m.group(2))
    if "$(" in a + b:
        return None
    return (a == b) == (kind == "ifeq")


def count_objects(srctree: Path, config: dict[str, str], arch: str = "x86") -> int:
    """An estimate of the objects kbuild compiles for `config` (CONFIG_X -> value):
    the obj-y/obj-m/lib-y entries of the Kbuild files (and Makefiles) reachable from
    the top-level Kbuild, with `ifdef`/`ifeq` on config options, composite objects
    counted by their parts, and the boot image's directories. An estimate: calls
    and variables this reader does not expand are skipped."""
    return len(kbuild_objects(srctree, config, arch))


def kbuild_objects(srctree: Path, config: dict[str, str], arch: str = "x86") -> list[str]:
    """The objects `count_objects` counts, as paths relative to the tree."""
    modules = config.get("CONFIG_MODULES") == "y"
    values = {"BITS": "64" if config.get("CONFIG_64BIT") == "y" else "32", "SRCARCH": arch, "ARCH": arch}

    def expand(text: str) -> str:
        text = _VAR.sub(lambda m: config.get(m.group(1), "") if m.group(1).startswith("CONFIG_")
                        else values[m.group(1)], text)
        return re.sub(r"\$\(subst m,y,(\w*)\)", lambda m: m.group(1).replace("m", "y"), text)

    # The top-level directories: the top Kbuild's, and the core/drivers/libs lists of the Makefiles.
    pending = [Path(".")]
    for makefile in (srctree / "Makefile", srctree / "arch" / arch / "Makefile"):
        lists = _lists(makefile, expand)
        for name in ("core", "drivers", "libs"):
            pending += [Path(os.path.normpath(d)) for d in (*lists.get(f"{name}-y", ()),
                                                            *(lists.get(f"{name}-m", ()) if modules else ()))
                        if d.endswith("/")]
    # The boot image is made by the arch Makefile's own rules, not through the Kbuild lists.
    boot = [Path(f"arch/{arch}/boot"), Path(f"arch/{arch}/boot/compressed")]
    seen: set[Path] = set()
    found: list[str] = []
    while pending or boot:
        rel = pending.pop() if pending else boot.pop()
        if rel in seen:
            continue
        seen.add(rel)
        directory = srctree / rel
        found_file = next((directory / n for n in ("Kbuild", "Makefile") if (directory / n).is_file()), None)
        if found_file is None:
            continue
        lists = _lists(found_file, expand)
        wanted = [*lists.get("obj-y", ()), *lists.get("lib-y", ()), *(lists.get("obj-m", ()) if modules else ())]
        if rel in (Path(f"arch/{arch}/boot"), Path(f"arch/{arch}/boot/compressed")):
            wanted += [*lists.get("setup-y", ()), *lists.get("vmlinux-objs-y", ())]
        counted: set[str] = set()
        while wanted:
            item = wanted.pop()
            if item.endswith("/"):
                pending.append(Path(os.path.normpath(rel / item)))
            elif item.endswith(".o") and item not in counted:
                counted.add(item)
                stem = item.removesuffix(".o")
                parts = [*lists.get(f"{stem}-y", ()), *lists.get(stem, ()),
                         *(lists.get(f"{stem}-m", ()) if modules else ())]
                if parts and parts != [item]:
                    wanted += parts
                else:
                    found.append(os.path.normpath(rel / item))
    return found


def _lists(makefile: Path, expand: Callable[[str], str]) -> dict[str, list[str]]:
    """The `NAME-y`/`NAME-m`/`NAME-objs` lists a Makefile assigns, under the conditions
    that hold (`:=`/`=` start a list again, `+=` adds); `NAME-objs` is kept as NAME."""
    try:
        text = makefile.read_text(errors="replace")
    except OSError:
        return {}
    lists: dict[str, list[str]] = {}

    def local(line: str) -> str:
        return re.sub(r"\$\(([\w.-]+-[ym])\)", lambda m: " ".join(lists.get(m.group(1), ())), line)

    # One entry per open conditional: does its current branch hold (None: unknown, counts)?
    branches: list[bool | None] = []
    for line in _logical_lines(text):
        cond = _COND.match(line)
        if cond:
            branches.append(_condition(cond.group(1), cond.group(2), expand))
            continue
        if (line == "else" or line.startswith("else ")) and branches:
            branches[-1] = None if branches[-1] is None else not branches[-1]
            continue
        if line == "endif" and branches:
            branches.pop()
            continue
        holds = all(b is not False for b in branches)
        assign = _ASSIGN.match(local(expand(line))) if holds else None
        if not assign:
            continue
        name = assign.group(1) if assign.group(2) == "objs" else f"{assign.group(1)}-{assign.group(2)}"
        items = [x for x in assign.group(3).split() if "$(" not in x]
        if "+=" in line:
            lists.setdefault(name, []).extend(items)
        else:
            lists[name] = items
    return lists


def stale_objects(objtree: Path, started: float | None = None) -> int | None:
    """How many objects of a previous build in `objtree` make will compile (again):
    those gone, those whose dependency list (kbuild's `.NAME.o.cmd`: the source and
    `deps_...`, config options as include/config/ files) names a file newer than the
    object, and those written since `started` (make, running meanwhile, has done them).
    None when `objtree` holds no previous build."""
    objects: list[tuple[str, float]] = []
    stale = 0
    for root, _, files in os.walk(objtree):
        for name in files:
            if name.startswith(".") and name.endswith(".o.cmd"):
                try:
                    objects.append((os.path.join(root, name), os.stat(os.path.join(root, name[1:-4])).st_mtime))
                except OSError:
                    stale += 1
    if not objects and not stale:
        return None
    oldest = min((built for _, built in objects), default=0.0)
    # Only files newer than the oldest object can make one stale: find those once, then
    # each object's dependencies are a set intersection, not a stat each.
    mtimes: dict[str, float] = {}
    recent: set[str] = set()
    for cmd, built in objects:
        if started is not None and built >= started:
            stale += 1
            continue
        try:
            with open(cmd, errors="replace") as f:
                text = f.read()
        except OSError:
            stale += 1
            continue
        at = text.find("source_")
        deps = set(text[at:].replace("$(wildcard ", " ").replace(")", " ").split()) if at >= 0 else set()
        for dep in deps.difference(mtimes):
            try:
                mtimes[dep] = os.stat(dep if dep.startswith("/") else objtree / dep).st_mtime
            except (OSError, ValueError):
                mtimes[dep] = 0.0
            if mtimes[dep] > oldest:
                recent.add(dep)
        if any(mtimes[dep] > built for dep in deps & recent):
            stale += 1
    return stale


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
