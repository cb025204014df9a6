"""Faults from outside the kernel under test, on real runs: each gets the exit
code of infrastructure (3), a final meta.json and a well-formed junit.xml, and
leaves no QEMU, socket or temp file behind (the `cli` fixture checks those).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.errors import GuestUnresponsive
from harness.guest import AgentSession
from harness.process import processes
from tests.conftest import REPO, Cli, meta


def _qemu_pid(cli: Cli) -> int | None:
    for pid, argv in processes():
        line = b" ".join(argv).decode(errors="replace")
        if "qemu-system" in line and str(cli.tmp) in line:
            return pid
    return None


def _booted(results: Path) -> bool:
    for path in results.glob("*/machines/*.json"):
        try:
            if json.loads(path.read_text()).get("status") == "booted":
                return True
        except ValueError:
            continue
    return False


def _run_until_booted(cli: Cli, selection: str) -> subprocess.Popen[str]:
    """`harness run -k SELECTION` in the background, returned once its guest has booted."""
    proc = subprocess.Popen(cli.argv("run", "--results", str(cli.results), "-k", selection), env=cli.env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not _booted(cli.results):
        assert time.monotonic() < deadline and proc.poll() is None, "the guest never booted"
        time.sleep(0.05)
    return proc


def _wait_test_started(cli: Cli, proc: subprocess.Popen[str], name: str) -> None:
    """Until the run's event log says a test whose node id has `name` in it has started."""
    deadline = time.monotonic() + 60
    while True:
        for path in cli.results.glob("*/events.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if event.get("kind") == "test-start" and name in event.get("data", {}).get("nodeid", ""):
                    return
        assert time.monotonic() < deadline and proc.poll() is None, f"no test {name!r} started"
        time.sleep(0.02)


def test_qemu_killed_from_outside_is_infrastructure_not_a_kernel_failure(cli: Cli) -> None:
    proc = _run_until_booted(cli, "dma_stress")
    # Into the first DMA test (a fixed sleep missed them all once the four took under a second).
    _wait_test_started(cli, proc, "test_dma_stress_verifies")
    pid = _qemu_pid(cli)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # as the OOM killer or a user would
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-2000:] + err[-2000:]
    run_dir = cli.only_run()
    m = meta(run_dir)
    assert m["status"] == "error" and m["exit_code"] == 3
    records = json.loads((run_dir / "tests.json").read_text())
    assert records and not [r for r in records if r["status"] == "failed"], records
    errors = [r for r in records if r["status"] == "error"]
    assert errors and "QEMU died of signal SIGKILL that the harness did not send" in errors[0]["message"]
    cases = [c for suite in JUnitXml.fromfile(str(run_dir / "junit.xml")) for c in suite]
    assert len(cases) == len(records)
    assert "QEMU died of signal SIGKILL" in out


@contextlib.contextmanager
def _tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs of our own: a results disk that really fills up (root only)."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("mode=0755", *options)), "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full results disk: {proc.stderr.strip()} (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _no_temp_files(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"temp files left: {left}"


def test_a_read_only_results_disk_is_one_line_exit_3_and_nothing_left(cli: Cli) -> None:
    with _tmpfs(cli.tmp.parent / "ro", "size=1m", "ro") as ro:
        proc = cli("run", "--results", str(ro), "-k", "userspace")
        assert proc.returncode == 3, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"harness: results directory {ro}: Read-only file system"


def test_a_results_disk_that_fills_up_during_the_run_finishes_meta_json(cli: Cli) -> None:
    # Room for the run's first files, not for a whole run's console logs and records.
    with _tmpfs(cli.tmp.parent / "full", "size=192k") as full:
        proc = cli("run", "--results", str(full), "-k", "test_boot or test_dma", timeout=600)
        assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Task was destroyed" not in proc.stderr
        (run_dir,) = [p for p in full.iterdir() if (p / "meta.json").exists()]
        m = meta(run_dir)
        assert m["status"] == "error" and m["exit_code"] == 3, m
        assert m["failure"]["kind"] == "results-full", m["failure"]
        JUnitXml.fromfile(str(run_dir / "junit.xml"))  # well-formed: the last complete write
        _no_temp_files(full)


def test_a_results_disk_full_before_the_run_is_one_line_exit_3_and_nothing_left(cli: Cli) -> None:
    with _tmpfs(cli.tmp.parent / "full", "size=64k") as full:
        with open(full / "filler", "wb") as f:
            with contextlib.suppress(OSError):
                f.write(b"\0" * (1 << 20))
        proc = cli("run", "--results", str(full), "-k", "userspace")
        assert proc.returncode == 3, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"harness: results directory {full}: No space left on device"
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_qemu_stopped_from_outside_is_infrastructure_at_the_command_deadline(cli: Cli) -> None:
    """SIGSTOP: QEMU neither runs nor exits. The next command waits out its deadline
    (the profile's 60 s), and the verdict names the stopped QEMU, not the kernel."""
    proc = _run_until_booted(cli, "test_boot")
    pid = _qemu_pid(cli)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 3, out[-2000:] + err[-2000:]
    records = json.loads((cli.only_run() / "tests.json").read_text())
    assert not [r for r in records if r["status"] == "failed"], records
    assert any("QEMU is stopped (SIGSTOP from outside the harness)" in r["message"] for r in records), records


@pytest.mark.parametrize("when", ["before the command", "while it runs"])
def test_a_reset_command_channel_is_a_dead_guest_not_a_traceback(when: str) -> None:
    """A QEMU killed with bytes unread on its channel socket resets the connection: EPIPE on
    the next send, ECONNRESET on a read in progress (seen in CI: the SIGKILL test above got a
    raw ConnectionResetError, exit 1). Both are the guest gone, as a clean EOF is."""
    ours, qemu = socket.socketpair()
    agent = AgentSession(ours, default_timeout=5)
    ours.sendall(b"bytes QEMU never read\n")
    if when == "before the command":
        qemu.close()
    else:
        threading.Timer(0.3, qemu.close).start()
    with pytest.raises(GuestUnresponsive, match=r"command channel closed while running 'true' \(guest died\?\)"):
        agent.run("true", timeout=5)
    with pytest.raises(GuestUnresponsive):
        agent.run("true")
    agent.close()
