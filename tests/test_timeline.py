"""One timeline per run: the event log, the guest clock's mapping onto the host's,
the merge and its rendering, the host kernel log; scenarios named by what they
show, and one real hotplug run of the sample kernel.

The /dev/kmsg sample (tests/data/kmsg/recorded-lab-vm-6.18.kmsg) was recorded
on the project's lab VM, as its README says.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from harness.compare import compare, load_run
from harness.console import Console
from harness.events import EVENTS, Event, EventLog, Source, read_events
from harness.paths import SAMPLE_KERNEL
from harness.probe.kmsg import HostKernelLog, HostLogWindow, parse_kmsg
from harness.report import render_html
from harness.timeline import GUEST_WINDOW, build, guest_clocks, host_events, load, printk_time, render_text
from tests.conftest import REPO, Cli, meta

KMSG_SAMPLE = REPO / "tests" / "data" / "kmsg" / "recorded-lab-vm-6.18.kmsg"
T0 = 1_800_000_000.0   # 2027-01-15T08:00:00Z, a round wall-clock time for the scenarios


def ev(t: float, source: Source, kind: str, text: str, worker: str = "main", **data: object) -> Event:
    return Event(t, source, kind, text, worker, None, dict(data) if data else None)


def console(t: float, uptime: float | None, text: str, worker: str = "main") -> Event:
    return ev(t, Source.GUEST, "console", (f"[{uptime:12.6f}] " if uptime is not None else "") + text, worker)


# -- printk times and the guest clock -----------------------------------------------------------

def test_printk_time_with_and_without_a_caller_id() -> None:
    assert printk_time("[   12.345678] pci 0000:01:00.0: enabling device") == (12.345678, "pci 0000:01:00.0: "
                                                                                 "enabling device")
    assert printk_time("[    0.000000][    T0] Linux version 6.12") == (0.0, "[    T0] Linux version 6.12")
    assert printk_time("~ # ls [1.0]") is None


def test_printk_time_after_a_shell_prompt_on_the_same_console_line() -> None:
    # Recorded from a tio-emulated run's console.log: the console's shell printed its prompt and a
    # cursor-position query just before the kernel's hot-plug enumeration line.
    line = "guest:/# \x1b[6n[    3.686315] pci 0000:01:00.0: [1234:11e8] type 00 class 0x00ff00"
    assert printk_time(line) == (3.686315, "pci 0000:01:00.0: [1234:11e8] type 00 class 0x00ff00   "
                                           "(after 'guest:/# ' on the same console line)")
    assert printk_time("\x1b[6nguest:/# ") is None


def test_offset_is_the_smallest_arrival_minus_uptime_so_lines_land_between_print_and_arrival() -> None:
    # The guest clock's zero is at T0 + 1; each line arrives 2 ms after it was printed, one 30 ms late.
    zero = T0 + 1.0
    lat = {0.5: 0.002, 0.6: 0.030, 0.7: 0.002}
    events = [ev(T0, Source.HARNESS, "qemu-started", "QEMU started")]
    events += [console(zero + u + lat[u], u, f"line at {u}") for u in (0.5, 0.6, 0.7)]
    (clock,) = guest_clocks(events, not_before=T0)
    assert clock.lines == 3 and abs(clock.zero - (zero + 0.002)) < 1e-9 and abs(clock.spread) < 1e-9
    tl = build(events)
    placed = {e.text: e.t for e in tl.entries if e.source == "guest"}
    # The late line is placed 2 ms after its print time (the smallest latency), not at its arrival.
    assert abs(placed["line at 0.6"] - (zero + 0.602)) < 1e-9
    assert all(zero + u <= placed[f"line at {u}"] <= zero + u + lat[u] + 1e-9 for u in lat)


def test_lines_before_the_guest_clock_runs_and_a_clock_jump_do_not_pull_later_lines_early() -> None:
    # Recorded shape of a TCG boot: 0.000000 lines, then the TSC calibration makes the clock jump
    # back (0.032 -> 0.018), after which arrival - uptime settles 120 ms above the first lines.
    zero = T0 + 1.0
    events = [ev(T0, Source.HARNESS, "qemu-started", "QEMU started"),
              console(zero, 0.0, "Linux version 6.12.117+"),
              console(zero + 0.010, 0.0, "NX (Execute Disable) protection: active"),
              console(zero + 0.118, 0.032, "tsc: using HPET reference calibration"),
              console(zero + 0.139, 0.0189, "x86/fpu: Supporting XSAVE feature 0x010"),
              console(zero + 0.123 + 1.0, 1.0, "virtio_blk virtio1: [vda] 131072 512-byte logical blocks"),
              ev(zero + 3.0, Source.QMP, "command", "device_add driver=edu id=tio0 bus=hp0", channel="vm", id=1),
              console(zero + 0.123 + 2.890, 2.890, "pci 0000:01:00.0: [1234:11e8] type 00 class 0x00ff00"),
              console(zero + 0.123 + 2.895, 2.895, "pci 0000:01:00.0: BAR 0 [mem 0xfde00000-0xfdefffff]: assigned")]
    texts = [e.text for e in build(events).entries]
    assert texts.index("pci 0000:01:00.0: [1234:11e8] type 00 class 0x00ff00") > next(
        i for i, t in enumerate(texts) if "device_add" in t)
    tl = build(events)
    first = next(e for e in tl.entries if e.text.startswith("Linux version"))
    assert first.t == zero and first.uptime == 0.0       # a 0.000000 line sits at its arrival


def test_a_paused_guest_clock_moves_only_the_lines_after_the_pause() -> None:
    # The VM is stopped for 2 s (QMP stop/cont): the guest clock stands still, the host's runs on.
    zero = T0 + 1.0
    events = [console(zero + 1.0 + 0.001, 1.0, "before the pause"),
              ev(zero + 1.5, Source.QMP, "command", "stop", channel="vm", id=1),
              ev(zero + 3.5, Source.QMP, "command", "cont", channel="vm", id=2),
              console(zero + 3.5 + 0.2 + 0.001, 1.2, "after the pause")]
    tl = build(events)
    assert [e.text.split()[0] for e in tl.entries] == ["before", "->", "->", "after"]
    before, after = tl.entries[0], tl.entries[-1]
    assert abs(before.t - (zero + 1.001)) < 1e-9 and abs(after.t - (zero + 3.701)) < 1e-9


def test_a_reset_starts_a_second_guest_clock() -> None:
    events = [console(T0 + 10.001, 5.0, "Linux version 6.12 boot one"), console(T0 + 10.501, 5.5, "last words"),
              console(T0 + 20.001, 0.5, "Linux version 6.12 boot two"), console(T0 + 20.101, 0.6, "again")]
    clocks = guest_clocks(events)
    assert [(c.boot, round(c.zero, 3)) for c in clocks] == [(1, T0 + 5.001), (2, T0 + 19.501)]
    assert [e.text for e in build(events).entries][-1] == "again"


def test_console_order_is_kept_around_a_line_without_a_printk_time() -> None:
    # A userspace line (no printk time) arrives; the kernel line after it was printed earlier than
    # its own latency would say, but is never placed before the line that came ahead of it.
    events = [console(T0 + 1.001, 1.0, "kernel one"), console(T0 + 1.300, None, "~ # "),
              console(T0 + 1.310, 1.2, "kernel two"), console(T0 + 1.501, 1.5, "kernel three")]
    tl = build(events)
    assert [e.text for e in tl.entries] == ["kernel one", "~ # ", "kernel two", "kernel three"]
    assert tl.entries[2].t == T0 + 1.300 and tl.entries[2].uptime == 1.2


def test_a_kernel_line_after_a_prompt_is_placed_by_its_printk_time_not_the_prompts_arrival() -> None:
    # The prompt's first byte came at +1.300 s; the kernel printed on the same line 2 s later (the
    # hot-plug's enumeration). Placed by its uptime and its neighbours' offset, after device_add.
    prompt_line = "guest:/# \x1b[6n[    3.300000] pci 0000:01:00.0: [1234:11e8] type 00"
    events = [console(T0 + 1.001, 1.0, "kernel one"),
              ev(T0 + 3.200, Source.QMP, "command", "device_add driver=edu id=tio0"),
              Event(T0 + 1.300, Source.GUEST, "console", prompt_line, "main", None),
              console(T0 + 3.402, 3.4, "pci 0000:01:00.0: BAR 0 assigned")]
    tl = build(events)
    assert [e.text.split("   (after")[0].split("  (no reply")[0] for e in tl.entries] == [
        "kernel one", "-> device_add driver=edu id=tio0", "pci 0000:01:00.0: [1234:11e8] type 00",
        "pci 0000:01:00.0: BAR 0 assigned"]
    placed = tl.entries[2]
    assert placed.uptime == 3.3 and abs(placed.t - (T0 + 3.302)) < 1e-6
    assert "(after 'guest:/# ' on the same console line)" in placed.text
    # The prompt's early arrival is no estimate of the guest's clock.
    (clock,) = guest_clocks(events)
    assert clock.lines == 3 and abs(clock.zero - (T0 + 0.001)) < 1e-9


def test_several_vms_each_have_their_clock_and_name() -> None:
    events = [console(T0 + 1.001, 1.0, "gw0 line", "gw0"), console(T0 + 2.502, 2.0, "gw1 line", "gw1"),
              ev(T0 + 0.5, Source.HARNESS, "test-start", "test start t.py::a", "gw0")]
    tl = build(events)
    assert [(e.source, e.text) for e in tl.entries] == [
        ("harness:gw0", "test start t.py::a"), ("guest:gw0", "gw0 line"), ("guest:gw1", "gw1 line")]
    assert {(c.worker, round(c.zero, 3)) for c in tl.clocks} == {("gw0", T0 + 0.001), ("gw1", T0 + 0.502)}


def test_a_line_that_would_put_the_guest_clock_before_qemu_started_is_no_estimate() -> None:
    # Userspace echoing a printk-looking line: taken at its word it would place the guest's
    # clock zero long before QEMU existed.
    events = [ev(T0, Source.HARNESS, "qemu-started", "QEMU started"), console(T0 + 2.001, 1.0, "real"),
              console(T0 + 3.0, 99999.0, "forged")]
    (clock,) = guest_clocks(events, not_before=T0)
    assert clock.lines == 1 and abs(clock.zero - (T0 + 1.001)) < 1e-9
    forged = next(e for e in build(events).entries if e.text == "forged")
    assert forged.t == T0 + 3.0


def test_window_is_seconds_of_guest_uptime() -> None:
    # A line GUEST_WINDOW + 1 s later with a smaller latency does not tighten an earlier line's offset.
    events = [console(T0 + 1.050, 1.0, "early, 50 ms"), console(T0 + 1.0 + GUEST_WINDOW + 1.001,
                                                                1.0 + GUEST_WINDOW + 1.0, "late, 1 ms")]
    entries = build(events).entries
    assert entries[0].t == T0 + 1.050


# -- QMP, the harness's steps, rendering ---------------------------------------------------------

HOTPLUG = [
    ev(T0 - 0.4, Source.HARNESS, "tests-started", "guest tests started (pytest)", ""),
    ev(T0 - 0.01, Source.HARNESS, "test-start", "test start test_hotplug.py::test_tio_workflow"),
    ev(T0, Source.HARNESS, "qemu-started", "QEMU started (pid 4242, tio-emulated, accel tcg)"),
    console(T0 + 1.2, 0.0, "Linux version 6.12.117+"),
    console(T0 + 1.3 + 0.123, 0.1, "Command line: console=ttyS0,115200"),
    ev(T0 + 2.0, Source.HARNESS, "boot-detected", "boot detected"),
    ev(T0 + 2.45, Source.QMP, "command", "device_add driver=edu id=tio0 bus=hp0", channel="vm", id=2,
       execute="device_add"),
    ev(T0 + 2.452, Source.QMP, "reply", "device_add: ok", channel="vm", id=2, ok=True, seconds=0.0021),
    console(T0 + 2.46 + 0.123, 1.16, "pci 0000:01:00.0: [1234:11e8] type 00 class 0x00ff00"),
    ev(T0 + 2.7, Source.QMP, "command", "device_del id=tio0", channel="vm", id=3),
    ev(T0 + 2.8, Source.QMP, "event", "DEVICE_DELETED device=tio0", event="DEVICE_DELETED"),
    ev(T0 + 2.9, Source.QMP, "command", "quit", channel="vm", id=4),
    ev(T0 + 3.0, Source.HARNESS, "test-end", "test end test_hotplug.py::test_tio_workflow: PASSED in 2.97 s",
       status="passed"),
    ev(T0 + 3.1, Source.HOST, "kmsg", "vfio-pci 0000:41:00.0: enabling device (0000 -> 0002)", "", uptime=5.25),
]


def test_hotplug_scenario_renders_in_order_with_both_clocks() -> None:
    text = render_text(build(HOTPLUG), "r1", tz=UTC)
    lines = text.splitlines()
    assert lines[0] == "# timeline of run r1: 13 events, host wall-clock time (UTC+0000), seconds since QEMU started"
    assert lines[1] == "# QEMU started at 2027-01-15 08:00:00.000"
    assert "guest clock (main, boot 1)" in lines[2] and "from 2 lines with a running printk clock" in lines[3]
    rows = [line for line in lines if not line.startswith("#")]
    assert rows == [
        "07:59:59.600    -0.400  harness                  guest tests started (pytest)",
        "07:59:59.990    -0.010  harness                  test start test_hotplug.py::test_tio_workflow",
        "08:00:00.000    +0.000  harness                  QEMU started (pid 4242, tio-emulated, accel tcg)",
        "08:00:01.200    +1.200  guest    [    0.000000]  Linux version 6.12.117+",
        "08:00:01.423    +1.423  guest    [    0.100000]  Command line: console=ttyS0,115200",
        "08:00:02.000    +2.000  harness                  boot detected",
        "08:00:02.450    +2.450  qmp                      -> device_add driver=edu id=tio0 bus=hp0  -> ok in 2.1 ms",
        "08:00:02.583    +2.583  guest    [    1.160000]  pci 0000:01:00.0: [1234:11e8] type 00 class 0x00ff00",
        "08:00:02.700    +2.700  qmp                      -> device_del id=tio0  (no reply recorded)",
        "08:00:02.800    +2.800  qmp                      <- event DEVICE_DELETED device=tio0",
        "08:00:02.900    +2.900  qmp                      -> quit  (no reply recorded)",
        "08:00:03.000    +3.000  harness                  test end test_hotplug.py::test_tio_workflow: PASSED in "
        "2.97 s",
        "08:00:03.100    +3.100  host     [    5.250000]  vfio-pci 0000:41:00.0: enabling device (0000 -> 0002)",
    ]


def test_a_failed_command_says_so_with_qemus_error() -> None:
    events = [ev(T0, Source.QMP, "command", "device_add driver=nope id=x", channel="vm", id=1),
              ev(T0 + 0.001, Source.QMP, "reply", "device_add: failed", channel="vm", id=1, ok=False,
                 seconds=0.001, error="ExecuteError: 'nope' is not a valid device model name")]
    (entry,) = build(events).entries
    assert entry.text == ("-> device_add driver=nope id=x  -> FAILED in 1.0 ms: ExecuteError: 'nope' is not a valid "
                          "device model name")


# -- the event log --------------------------------------------------------------------------------

def test_event_log_appends_whole_lines_and_a_torn_one_is_counted(tmp_path: Path) -> None:
    path = tmp_path / EVENTS
    log, other = EventLog(path, "main"), EventLog(path, "")
    log.emit(Source.HARNESS, "qemu-started", "QEMU started", {"pid": 1})
    other.emit(Source.HARNESS, "tests-started", "guest tests started")
    log.close()
    other.close()
    with open(path, "ab") as f:
        f.write(b'{"t": 1.0, "source": "guest", "kind": "cons')   # a kill in the middle of a write
    events, bad = read_events(path)
    assert [(e.worker, e.kind, e.data) for e in events] == [("main", "qemu-started", {"pid": 1}),
                                                            ("", "tests-started", None)]
    assert bad == 1 and all(abs(e.t - time.time()) < 60 and e.mono is not None for e in events)
    assert Event.from_json(events[0].to_json()) == events[0]
    assert "1 line(s) of events.jsonl unreadable" in render_text(load(tmp_path))


def test_event_log_on_an_unwritable_place_never_raises(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "no-such-dir" / EVENTS)
    log.emit(Source.HARNESS, "qemu-started", "QEMU started")
    log.emit(Source.HARNESS, "boot-detected", "boot detected")
    assert log.error is not None and "No such file or directory" in log.error


def test_console_stamps_each_line_with_its_first_bytes_arrival_and_keeps_the_log_raw(tmp_path: Path) -> None:
    ours, qemus = socket.socketpair()
    log = EventLog(tmp_path / EVENTS, "main")
    con = Console(ours, tmp_path / "console.log", events=log)
    con.start("test-console")
    raw = b"[    1.000000] first\r\n[    1.5"
    qemus.sendall(raw)
    time.sleep(0.3)
    before_rest = time.time()
    qemus.sendall(b"00000] second\r\nno newline at the end")
    time.sleep(0.2)
    qemus.close()
    con.wait_closed(5)
    con.close()
    log.close()
    assert (tmp_path / "console.log").read_bytes() == raw + b"00000] second\r\nno newline at the end"
    events, bad = read_events(tmp_path / EVENTS)
    assert bad == 0 and [e.text for e in events] == ["[    1.000000] first", "[    1.500000] second",
                                                     "no newline at the end"]
    # The second line began in the first chunk: it is stamped with that chunk's arrival.
    assert events[1].t == events[0].t < before_rest <= events[2].t


# -- the host kernel log --------------------------------------------------------------------------

def _sample_records() -> list[str]:
    text = KMSG_SAMPLE.read_text()
    return re.split(r"\n(?=[^ ])", text.rstrip("\n"))


def test_kmsg_records_parse_with_escapes_undone_and_dictionaries_dropped() -> None:
    records = [parse_kmsg(r) for r in _sample_records()]
    assert all(r is not None for r in records)
    by_seq = {r.seq: r for r in records if r is not None}
    assert by_seq[12].text == "Hypervisor detected: KVM" and by_seq[12].usec == 0 and by_seq[12].level == 6
    assert by_seq[18].level == 7 and by_seq[18].facility == 0
    assert by_seq[90].text.startswith("rcu: \tRCU restricting CPUs")
    assert by_seq[193].text.startswith("acpi PNP0A08:00: _OSC:") and "SUBSYSTEM" not in by_seq[193].text
    assert by_seq[214].usec == 309451
    assert parse_kmsg("not a record") is None


def test_host_lines_in_the_window_are_mapped_to_wall_clock_and_filtered() -> None:
    records = [r for r in (parse_kmsg(x) for x in _sample_records()) if r is not None]
    window = HostLogWindow("/dev/kmsg", records, wall_minus_mono=T0)
    events = host_events(window, EventLog(Path("/nonexistent"), ""))
    kmsg = [e for e in events if e.kind == "kmsg"]
    texts = [e.text for e in kmsg]
    assert "iommu: Default domain type: Translated" in texts and "Hypervisor detected: KVM" in texts
    assert "DMI not present or invalid." not in texts
    iommu = kmsg[texts.index("iommu: Default domain type: Translated")]
    assert iommu.t == T0 + 0.309451 and iommu.data == {"uptime": 0.309451, "seq": 214, "level": 6}
    assert events[-1].kind == "note" and f"{len(records)} lines during the run, {len(kmsg)} about" in events[-1].text


def test_an_unreadable_host_log_is_one_note() -> None:
    window = HostKernelLog(Path("/nonexistent/kmsg")).read()
    (note,) = host_events(window, EventLog(Path("/nonexistent"), ""))
    assert note.source is Source.HOST and note.text.startswith("host kernel log not readable: /nonexistent/kmsg")


def test_the_real_host_log_reads_without_blocking() -> None:
    log = HostKernelLog()
    start = time.monotonic()
    window = log.read()
    assert time.monotonic() - start < 2
    # Here (root) it is readable; elsewhere it must say why not.
    assert window.note is None if os.access("/dev/kmsg", os.R_OK) else window.note
    assert abs(window.wall_minus_mono - (time.time() - time.clock_gettime(time.CLOCK_MONOTONIC))) < 0.01


# -- the HTML report ------------------------------------------------------------------------------

def test_compare_page_has_each_runs_timeline_collapsed(tmp_path: Path) -> None:
    from tests.test_compare import fake_run

    run = fake_run(tmp_path, "r1", "6.12", {"t.py::a": "passed"}, 2.0, "2027-01-15T08:00:00")
    log = EventLog(run / EVENTS, "main")
    log.write(HOTPLUG)
    log.close()
    fake_run(tmp_path, "r2", "6.12", {"t.py::a": "passed"}, 2.0, "2027-01-15T09:00:00")  # no event log
    page = render_html(compare([load_run(tmp_path / "r1"), load_run(tmp_path / "r2")]))
    assert page.count('<details class="timeline">') == 1
    assert "-&gt; device_add driver=edu id=tio0 bus=hp0" in page and "<script" not in page


# -- a real run -----------------------------------------------------------------------------------

def test_hotplug_run_timeline_shows_device_add_enumeration_and_result_in_order(cli: Cli) -> None:
    proc = cli("run", "--kernel", str(SAMPLE_KERNEL), "--profile", "tio-emulated", "--results", str(cli.results),
               "-k", "test_tio_workflow")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    assert meta(run_dir)["status"] == "passed"
    lines = (run_dir / "timeline.txt").read_text().splitlines()
    rows = [line for line in lines if not line.startswith("#")]
    assert any(line.startswith("# guest clock (main, boot 1)") for line in lines), lines[:6]

    def at(pattern: str) -> int:
        found = [i for i, row in enumerate(rows) if re.search(pattern, row)]
        assert found, f"no line matches {pattern!r} in\n" + "\n".join(rows[-60:])
        return found[0]

    add = at(r"  qmp +-> device_add driver=edu id=tio0 bus=hp0  -> ok")
    # The guest's enumeration of the new function, with its printk time.
    enum = at(r"  guest +\[ *\d+\.\d{6}\]  pci 0000:[0-9a-f]{2}:00\.0: \[1234:11e8\] type 00")
    bar = at(r"  guest +\[ *\d+\.\d{6}\]  pci 0000:[0-9a-f]{2}:00\.0: BAR 0 \[mem .*assigned")
    result = at(r"  harness +test end test_hotplug\.py::test_tio_workflow: PASSED")
    assert rows.index(rows[at("QEMU started")]) < at("boot detected") < add < enum < bar < result
    since = [float(row.split()[1]) for row in rows]
    assert since == sorted(since), "times must increase down the timeline"
    assert since[add] < since[enum] < since[result]
    day = datetime.now().astimezone().strftime("%Y-%m-%d")
    assert any(day in line for line in lines[:2])
    events, bad = read_events(run_dir / EVENTS)
    assert bad == 0 and any(e.kind == "event" and "DEVICE_DELETED" in e.text for e in events)
    assert any(e.source is Source.HOST for e in events)
    assert json.loads((run_dir / EVENTS).read_text().splitlines()[0])["t"] > 0
