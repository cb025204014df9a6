"""Faults from outside the kernel under test, on real runs: each gets the exit
code of infrastructure (3), a final meta.json and a well-formed junit.xml, and
leaves no QEMU, socket or temp file behind (the `cli` fixture checks those).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from junitparser import JUnitXml

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


def test_qemu_killed_from_outside_is_infrastructure_not_a_kernel_failure(cli: Cli) -> None:
    proc = subprocess.Popen(cli.argv("run", "--results", str(cli.results), "-k", "dma_stress"), env=cli.env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not _booted(cli.results):
        assert time.monotonic() < deadline and proc.poll() is None, "the guest never booted"
        time.sleep(0.1)
    time.sleep(1.0)  # into the first DMA test
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
