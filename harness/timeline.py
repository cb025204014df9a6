"""One timeline per run: what the guest, QEMU, the harness and the host kernel
each said, in order, on the host's wall clock (results/<run-id>/timeline.txt).

Input: the run's event log (harness/events.py), each event stamped with the
host's wall-clock time as it was seen. Everything here is a pure function of
the events, so a timeline can be made again from events.jsonl at any time (the
HTML report does, and so does a run that died before writing timeline.txt).

Guest time: a console line `[   12.345678] text` carries the guest's printk
time u (seconds since the guest kernel's clock started). A line printed at
uptime u arrives at host time a = E + u + latency, with E the host time of the
guest clock's zero; so a - u is E plus that line's serial latency, and the
smallest a - u over several lines is E plus the smallest latency among them:
an estimate that errs late by that latency, never early. The guest's clock is
not E + u for a whole boot, though: early boot lines say 0.000000 until the
clock runs (they are placed at their arrival), the clock jumps when the TSC is calibrated, and it stands still
while the VM is stopped. So each line is placed at u + the smallest a - u over
the lines of the next GUEST_WINDOW seconds of guest uptime (itself included):
never after its arrival, never before its own print time unless the guest
clock ran fast within that window, and a pause only moves the lines after it.
One estimate per VM and per boot (a reset starts the guest clock again). Lines
without a printk time (userspace on the console) are placed at their arrival.
Within one console, the order of the lines is kept.

Host kernel time: a /dev/kmsg record's printk clock, mapped with the
CLOCK_MONOTONIC to wall-clock difference taken when it was read.

Line format of timeline.txt (after `#` header lines saying which mappings
were used):

    HH:MM:SS.mmm  +SECONDS  SOURCE  UPTIME  TEXT

host time of day; seconds since QEMU started (the first VM's); guest, qmp,
harness or host (with `:<worker>` when a run had several VMs); the printk time
in brackets for kernel lines (the guest's for guest lines, the host's for host
lines); the text.
"""

from __future__ import annotations

import re
import statistics
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from harness.events import EVENTS, Event, EventLog, Source, read_events
from harness.paths import atomic_write
from harness.probe.kmsg import HostLogWindow

TIMELINE = "timeline.txt"

# `[   12.345678] ` with an optional caller id (`[    T1]`, CONFIG_PRINTK_CALLER) after it.
_PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\]\s?")
# Later on a line only in printk's own format (six decimals), so `ls [1.0]` is no stamp.
_PRINTK_AFTER = re.compile(r"^(.*?)\[\s*(\d+\.\d{6})\]\s?")
_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_BANNER = re.compile(r"Linux version \d+\.\d+")
# A drop of the guest's printk time by more than this starts a new boot (a reset).
_RESET_DROP = 1.0
# Seconds of guest uptime ahead of a line whose lines' smallest a - u places it (module docstring).
GUEST_WINDOW = 5.0

# The host kernel lines a guest run can be about: device assignment (vfio,
# iommufd, the IOMMUs' faults), KVM and the CoCo firmware/modules, the PCI TSM,
# and QEMU itself meeting the kernel (a segfault, the OOM killer).
HOST_RELEVANT = re.compile(
    r"vfio|iommu|DMAR|AMD-Vi|\bkvm|\bSEV|\bSNP|\bTDX|virt/tdx|\bccp\b|\btsm\b|qemu|Out of memory|oom-kill",
    re.I)


@dataclass(frozen=True)
class GuestClock:
    """How one boot of one VM's guest clock was mapped onto the host's: host = uptime + offset,
    the offset estimated per line (module docstring)."""

    worker: str
    boot: int              # 1, then 2 after a reset...
    lines: int             # console lines with a printk time
    zero: float            # the smallest offset: host time of the guest clock's zero
    spread: float          # largest - smallest offset: the guest clock's jumps, pauses and drift
    latency_median: float  # arrival - placed time: serial latency beyond the smallest near it
    latency_max: float     # large for early boot lines, which wait in the printk buffer for a console


@dataclass(frozen=True)
class Entry:
    t: float               # host wall-clock seconds
    source: str            # guest, qmp, harness, host (with :worker for several VMs)
    text: str
    uptime: float | None = None


@dataclass
class Timeline:
    entries: list[Entry] = field(default_factory=list)
    start: float | None = None          # when the first VM's QEMU started (else the first entry)
    clocks: list[GuestClock] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def printk_time(line: str) -> tuple[float, str] | None:
    """(uptime, the rest) of a kernel console line `[   12.345678] text`; None for other lines.

    The console is shared: a shell's prompt and its terminal queries can come
    first on the line the kernel then prints on (`guest:/# ESC[6n[    3.686315]
    pci ...`). Such a line is the kernel's, with what came before it kept at
    the end; terminal escape sequences are dropped.
    """
    found = _printk_split(line)
    return None if found is None else (found[0], found[1])


def _printk_split(line: str) -> tuple[float, str, bool] | None:
    """printk_time, and whether other bytes came first on the line (then the line's arrival time,
    that of its first byte, says nothing of when the kernel printed)."""
    line = _ESCAPE.sub("", line)
    m = _PRINTK.match(line)
    if m is not None:
        return float(m[1]), line[m.end():], False
    m = _PRINTK_AFTER.search(line)
    if m is None:
        return None
    return float(m[2]), f"{line[m.end():]}   (after {m[1]!r} on the same console line)", True


@dataclass
class _ConsoleLine:
    event: Event
    index: int             # in the event list
    uptime: float | None   # printk time, if the line has one
    text: str              # without the printk time
    boot: int = 1
    late: bool = False     # the printk time came after other bytes: the arrival time is its prefix's


def _consoles(events: list[Event]) -> dict[str, list[_ConsoleLine]]:
    """Each VM's console lines in arrival order, their boots numbered: the printk clock going
    back by more than a second, or back at all on a `Linux version` banner, starts a new boot."""
    consoles: dict[str, list[_ConsoleLine]] = {}
    for i, e in enumerate(events):
        if e.source is Source.GUEST and e.kind == "console":
            stamp = _printk_split(e.text)
            consoles.setdefault(e.worker, []).append(
                _ConsoleLine(e, i, stamp[0], stamp[1], late=stamp[2]) if stamp
                else _ConsoleLine(e, i, None, _ESCAPE.sub("", e.text)))
    for lines in consoles.values():
        boot, last = 1, None
        for line in lines:
            if line.uptime is not None:
                if last is not None and line.uptime < last and (
                        line.uptime < last - _RESET_DROP or _BANNER.search(line.text)):
                    boot += 1
                last = line.uptime
            line.boot = boot
    return consoles


def _offsets(lines: list[_ConsoleLine], not_before: float | None) -> dict[int, float]:
    """Per stamped line (by event index): the smallest a - u over the lines of its boot whose
    uptime is within GUEST_WINDOW after its own. Lines at 0.000000 (printed before the clock ran)
    and lines whose a - u would put the guest's clock zero before `not_before` (QEMU's start: no
    printk line, then) offer no estimate and are placed at their arrival."""
    stamped = sorted((line for line in lines if line.uptime and not line.late
                      and (not_before is None or line.event.t - line.uptime >= not_before)),
                     key=lambda line: (line.uptime, line.index))
    diff = [line.event.t - (line.uptime or 0.0) for line in stamped]
    out: dict[int, float] = {}
    # A sliding minimum over [u, u + GUEST_WINDOW], walking down in uptime: positions in `stamped`,
    # uptime and a - u both falling from left to right, so the right end is the window's minimum
    # and the first to leave it.
    window: deque[int] = deque()
    for pos in range(len(stamped) - 1, -1, -1):
        while window and diff[window[0]] >= diff[pos]:
            window.popleft()
        window.appendleft(pos)
        while (stamped[window[-1]].uptime or 0.0) > (stamped[pos].uptime or 0.0) + GUEST_WINDOW:
            window.pop()
        out[stamped[pos].index] = diff[window[-1]]
    # A line whose printk time came after a prompt: no estimate of its own; the offset of the
    # first estimating line at or after its uptime (else the last one).
    uptimes = [line.uptime or 0.0 for line in stamped]
    for line in lines:
        if line.late and line.uptime and stamped:
            pos = min(bisect_left(uptimes, line.uptime), len(stamped) - 1)
            out[line.index] = out[stamped[pos].index]
    return out


def _clocks(consoles: dict[str, list[_ConsoleLine]], not_before: float | None
            ) -> tuple[dict[int, float], list[GuestClock]]:
    """Each stamped console line's offset (by event index), and each VM's boots' clock summaries."""
    offsets: dict[int, float] = {}
    clocks = []
    for worker, lines in sorted(consoles.items()):
        for boot in sorted({line.boot for line in lines}):
            mine = [line for line in lines if line.boot == boot]
            found = _offsets(mine, not_before)
            if not found:
                continue
            offsets.update(found)
            latency = [line.event.t - (line.uptime or 0.0) - found[line.index] for line in mine
                       if line.index in found and not line.late]
            clocks.append(GuestClock(worker, boot, len(found), min(found.values()),
                                     max(found.values()) - min(found.values()), statistics.median(latency),
                                     max(latency)))
    return offsets, clocks


def guest_clocks(events: list[Event], not_before: float | None = None) -> list[GuestClock]:
    """How each VM's (worker's) guest clock was mapped, per boot (module docstring)."""
    return _clocks(_consoles(events), not_before)[1]


def _args(data: dict[str, Any] | None, key: str) -> Any:
    return (data or {}).get(key)


def build(events: list[Event]) -> Timeline:
    """The timeline of `events` (in the order they were written), sorted by host time."""
    starts = [e.t for e in events if e.source is Source.HARNESS and e.kind == "qemu-started"]
    start = min(starts) if starts else None
    consoles = _consoles(events)
    offsets, clocks = _clocks(consoles, start)
    console_of = {line.index: line for lines in consoles.values() for line in lines}
    workers = {e.worker for e in events if e.source is not Source.HOST and e.worker}
    replies = {(_args(e.data, "channel"), e.worker, _args(e.data, "id")): e
               for e in events if e.source is Source.QMP and e.kind == "reply"}
    placed: list[tuple[float, int, Entry]] = []
    last_console: dict[str, float] = {}
    for i, e in enumerate(events):
        source = e.source.value + (f":{e.worker}" if len(workers) > 1 and e.worker in workers else "")
        if e.source is Source.GUEST and e.kind == "console":
            line = console_of[i]
            if not line.text.strip():
                continue   # blank console lines say nothing
            offset = offsets.get(i)
            if line.uptime is None or offset is None:
                t = e.t
            elif line.late:   # arrived after its prefix's first byte: that time is a lower bound
                t = max(e.t, line.uptime + offset)
            else:
                t = min(e.t, line.uptime + offset)
            # Console order is kept: a line is never placed before one that came ahead of it.
            t = max(t, last_console.get(e.worker, t))
            last_console[e.worker] = t
            placed.append((t, i, Entry(t, source, line.text, line.uptime)))
        elif e.source is Source.QMP and e.kind == "reply":
            continue   # shown on its command's line
        elif e.source is Source.QMP and e.kind == "command":
            reply = replies.get((_args(e.data, "channel"), e.worker, _args(e.data, "id")))
            placed.append((e.t, i, Entry(e.t, source, f"-> {e.text}{_reply_text(reply)}")))
        elif e.source is Source.QMP and e.kind == "event":
            placed.append((e.t, i, Entry(e.t, source, f"<- event {e.text}")))
        elif e.source is Source.HOST and e.kind == "kmsg":
            placed.append((e.t, i, Entry(e.t, source, e.text, _args(e.data, "uptime"))))
        else:
            placed.append((e.t, i, Entry(e.t, source, e.text)))
    placed.sort(key=lambda p: (p[0], p[1]))
    entries = [p[2] for p in placed]
    return Timeline(entries, start if start is not None else (entries[0].t if entries else None), clocks)


def _reply_text(reply: Event | None) -> str:
    if reply is None:
        return "  (no reply recorded)"
    data = reply.data or {}
    took = data.get("seconds")
    took_text = f" in {float(took) * 1000:.1f} ms" if isinstance(took, (int, float)) else ""
    if data.get("ok"):
        return f"  -> ok{took_text}"
    return f"  -> FAILED{took_text}: {data.get('error', '')}"


def host_events(window: HostLogWindow, log: EventLog) -> list[Event]:
    """The host kernel's lines of the run's window that concern it (HOST_RELEVANT), as events of
    `log`'s writer, and one note saying what was read (or why nothing could be)."""
    kept = [r for r in window.records if HOST_RELEVANT.search(r.text)]
    out = [log.event(Source.HOST, "kmsg", r.text,
                     {"uptime": round(r.usec / 1e6, 6), "seq": r.seq, "level": r.level}, t=window.wall_time(r))
           for r in kept]
    if window.note and not window.records:
        summary = window.note
    else:
        summary = (f"host kernel log ({window.source}): {len(window.records)} lines during the run, "
                   f"{len(kept)} about vfio/IOMMU/KVM/SEV/TDX/QEMU shown"
                   + (f"; {window.note}" if window.note else ""))
    return [*out, log.event(Source.HOST, "note", summary)]


def _clock_text(t: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(t, tz).strftime("%H:%M:%S.%f")[:-3]


def render_text(tl: Timeline, run: str = "", tz: tzinfo | None = None) -> str:
    """timeline.txt (see the module docstring); `tz` None is the host's local time."""
    zone = datetime.fromtimestamp(tl.start if tl.start is not None else 0, tz).astimezone(tz).strftime("%Z%z")
    head = [f"# timeline{f' of run {run}' if run else ''}: {len(tl.entries)} events, host wall-clock time "
            f"({zone.strip()}), seconds since QEMU started"]
    if tl.start is not None:
        head.append(f"# QEMU started at {datetime.fromtimestamp(tl.start, tz).strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}")
    for c in tl.clocks:
        head += [
            f"# guest clock ({c.worker or 'vm'}, boot {c.boot}): host time = guest uptime + offset, the offset of a "
            f"line the smallest (host arrival - guest uptime)",
            f"#   over the next {GUEST_WINDOW:.0f} s of guest uptime; from {c.lines} lines with a running printk "
            f"clock: guest clock zero at {_clock_text(c.zero, tz)}, offsets spread over {c.spread * 1000:.1f} ms,",
            f"#   arrival after placed time median {c.latency_median * 1000:.1f} ms, "
            f"max {c.latency_max * 1000:.0f} ms (early boot lines wait for the console)"]
    if not tl.clocks:
        head.append("# guest clock: no console line with a printk time; guest lines at their host arrival time")
    head.append("# host kernel lines: their printk time taken as CLOCK_MONOTONIC, mapped when read")
    head += [f"# {note}" for note in tl.notes]
    width = max((len(e.source) for e in tl.entries), default=7)
    rows = []
    for e in tl.entries:
        since = f"{e.t - tl.start:+9.3f}" if tl.start is not None else " " * 9
        uptime = f"[{e.uptime:12.6f}]" if e.uptime is not None else " " * 14
        rows.append(f"{_clock_text(e.t, tz)} {since}  {e.source:<{width}}  {uptime}  {e.text}".rstrip())
    return "\n".join(head + rows) + "\n"


def load(run_dir: Path) -> Timeline:
    """The timeline of a run directory, from its event log."""
    events, bad = read_events(run_dir / EVENTS)
    tl = build(events)
    if bad:
        tl.notes.append(f"{bad} line(s) of {EVENTS} unreadable (torn by a kill?) and left out")
    return tl


def write_timeline(run_dir: Path, run: str = "") -> Path:
    """timeline.txt from the run's event log. Raises OSError if it cannot be written."""
    path = run_dir / TIMELINE
    atomic_write(path, render_text(load(run_dir), run or run_dir.name))
    return path
