"""harness.process on real processes: liveness, sweeping, group stop, SIGTERM, the
subprocess door; and Machine's shutdown when its soft path fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.errors import InfraError, Terminated
from harness.machine import Machine
from harness.process import SOCK_PREFIX, alive, raise_on_sigterm, run, stop_group, sweep_stale, version_line
from harness.runner import RunRequest, make_plan
from harness.sysfs import wait_until
from tests.conftest import qemu_processes_mentioning

# A stand-in for QEMU: kill_machines finds a VM by the `-name` in its argv.
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"]


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not alive(pid)


def test_a_zombie_owner_counts_as_dead() -> None:
    assert alive(os.getpid())
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while alive(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped: a zombie
        time.sleep(0.01)
    assert not alive(child.pid)
    child.wait()
    assert not alive(child.pid)


def test_sweep_removes_a_dead_runs_directory_and_its_machines(tmp_path: Path) -> None:
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    stale = tmp_path / f"{SOCK_PREFIX}stale"
    stale.mkdir()
    (stale / "owner.pid").write_text(str(dead_owner.pid))
    live = tmp_path / f"{SOCK_PREFIX}live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    orphan = subprocess.Popen([*SLEEPER, "-name", f"{stale.name}-gw0"])
    kept = subprocess.Popen([*SLEEPER, "-name", f"{live.name}-gw0"])
    try:
        # The sweep finds QEMUs by their command line: wait until both have exec'd (a loaded host).
        for cmdline in (Path(f"/proc/{p.pid}/cmdline") for p in (orphan, kept)):
            assert wait_until(lambda c=cmdline: b"-name" in c.read_bytes(), 30), "the stand-in never started"
        sweep_stale(tmp_path)
        assert orphan.wait(5) == -signal.SIGKILL
        assert not stale.exists()
        assert live.is_dir() and kept.poll() is None
    finally:
        for p in (orphan, kept):
            p.kill()
            p.wait()


def test_stop_group_ends_with_sigterm_when_that_is_enough() -> None:
    proc = subprocess.Popen(SLEEPER, start_new_session=True)
    assert stop_group(proc, term_wait=5.0)
    assert proc.returncode == -signal.SIGTERM


def test_stop_group_escalates_to_sigkill() -> None:
    proc = subprocess.Popen(STUBBORN, start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    start = time.monotonic()
    assert stop_group(proc, term_wait=0.3)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 5


def test_stop_group_reaches_the_whole_group() -> None:
    # The leader forks a child in its group, as pytest forks its xdist workers.
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             f"c = subprocess.Popen({SLEEPER!r}); print(c.pid, flush=True); time.sleep(60)"],
                            start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    assert stop_group(proc, term_wait=None)
    assert proc.returncode == -signal.SIGKILL
    assert _wait_gone(grandchild)


def test_sigterm_raises_terminated_until_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    restore = raise_on_sigterm()
    try:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with pytest.raises(Terminated) as e:
            handler(signal.SIGTERM, None)
        assert e.value.signum == signal.SIGTERM
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_captures_output_as_bytes_and_text() -> None:
    proc = run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (proc.status, proc.out, proc.err, proc.ok) == (3, "out\n", "err\n", False)
    assert run(["cat"], input=b"\x00\xff").stdout == b"\x00\xff"


@pytest.mark.parametrize(("argv", "kwargs", "message"), [
    (["no-such-program-here"], {}, "no-such-program-here: not found"),
    (["sleep", "10"], {"timeout": 0.2}, "sleep 10: still running after 0s, killed"),
])
def test_run_failures_are_infrastructure_errors(argv: list[str], kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InfraError) as e:
        run(argv, **kwargs)
    assert str(e.value) == message


def test_check_names_what_failed_with_the_end_of_its_stderr() -> None:
    with pytest.raises(InfraError) as e:
        run(["sh", "-c", "echo one >&2; echo two >&2; exit 4"]).check("helper")
    assert str(e.value) == "helper failed: one\ntwo"
    with pytest.raises(InfraError, match="^quiet failed: exit status 5$"):
        run(["sh", "-c", "exit 5"]).check("quiet")


def test_a_failed_qmp_quit_is_noted_and_qemu_still_stops(debian_kernel) -> None:  # type: ignore[no-untyped-def]
    plan, _ = make_plan(RunRequest(kernel=str(debian_kernel.image), profile="emulated"))
    with tempfile.TemporaryDirectory(prefix="ht-quit-", dir="/tmp") as tmp:
        m = Machine(plan, Path(tmp) / "logs", name="quit", sock_parent=Path(tmp) / "s")
        m.launch()
        assert m.qemu is not None
        # A hung QEMU: QMP never answers and SIGTERM stays pending; only SIGKILL ends it.
        os.kill(m.qemu.popen.pid, signal.SIGSTOP)
        m.shutdown(timeout=1)
        assert m.shutdown_notes == ["QMP quit failed (InfraError: QMP: no answer within 1 s); "
                                    "stopping QEMU with signals"]
        assert m.exit_status == -signal.SIGKILL and m.sock_dir is None
        assert not qemu_processes_mentioning(tmp)


def test_version_line_asks_a_program_once_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    count = tmp_path / "count"
    prog = tmp_path / "prog"
    prog.write_text(f"#!/bin/sh\necho x >> {count}\necho 'prog 1.0'\necho 'more text'\n")
    prog.chmod(0o755)
    assert version_line(str(prog)) == version_line(str(prog)) == "prog 1.0"
    assert count.read_text() == "x\n", "asked twice"
    # An upgrade replaces the file: a new size or mtime asks again.
    prog.write_text(f"#!/bin/sh\necho x >> {count}\necho 'prog 2.0 upgraded'\n")
    assert version_line(str(prog)) == "prog 2.0 upgraded" and count.read_text() == "x\nx\n"
    # An unreadable memo is asked around, never an error.
    (tmp_path / "cache" / "tools" / "versions.json").write_text("{not json")
    assert version_line(str(prog)) == "prog 2.0 upgraded"
    with pytest.raises(InfraError, match="not found"):
        version_line(str(tmp_path / "no-such-program"))
