"""`harness boot` on a real terminal (a pty), and a harness killed with SIGKILL."""

from __future__ import annotations

import json
import sys

import pexpect
from junitparser import JUnitXml

from tests.conftest import REPO, Cli, meta


def test_boot_gives_a_shell_and_ctrl_bracket_leaves(cli: Cli, debian_kernel) -> None:  # type: ignore[no-untyped-def]
    child = pexpect.spawn(sys.executable, ["-m", "harness", "boot", "--results", str(cli.results)],
                          cwd=str(REPO), env=cli.env(), timeout=90, encoding="utf-8")
    try:
        child.expect("Ctrl-] leaves")
        child.expect("guest:/# ")
        child.send("uname -r; echo $((6*7))\r")
        child.expect(debian_kernel.release)
        child.expect("42")
        child.send("\x1d")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    logs = list(cli.results.glob("boot-*/console.log"))
    assert len(logs) == 1 and b"Linux version" in logs[0].read_bytes()


def test_sigkill_leaves_a_readable_run_and_no_qemu(cli: Cli) -> None:
    # QEMU dies with its parent (PDEATHSIG), whatever state the harness was in.
    cli.sigkill_once_booting("run", "--results", str(cli.results), console_glob="*/console.log")
    run_dir = cli.only_run()
    assert meta(run_dir)["status"] == "incomplete"
    JUnitXml.fromfile(str(run_dir / "junit.xml"))
    # The killed run's private socket directory is swept by the next run.
    assert any(p.name.startswith("harness-") for p in cli.tmp.iterdir())
    follow = cli("run", "--results", str(cli.results), "-k", "release")
    assert follow.returncode == 0, follow.stdout + follow.stderr


def test_reproduce_one_test_and_reproduce_with_a_shell(cli: Cli) -> None:
    first = cli("run", "--results", str(cli.results), "--append", "quiet_marker=1", "-k", "test_boot")
    assert first.returncode == 0, first.stdout[-2000:]
    original = cli.only_run()
    one = original / "tests" / "test_boot.test_booted_release_matches_kernel"
    proc = cli("reproduce", str(one))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = [d for d in cli.run_dirs() if d != original][0]
    records = json.loads((again / "tests.json").read_text())
    assert [r["nodeid"] for r in records] == ["test_boot.py::test_booted_release_matches_kernel"]
    assert meta(again)["reproduces"] == meta(original)["run_id"]
    # --shell: the recorded kernel, initramfs and command line, on the console.
    child = pexpect.spawn(sys.executable, ["-m", "harness", "reproduce", str(original), "--shell"],
                          cwd=str(REPO), env=cli.env(), timeout=90, encoding="utf-8")
    try:
        child.expect("Ctrl-] leaves")
        child.expect("guest:/# ")
        child.send("cat /proc/cmdline\r")
        child.expect("quiet_marker=1")
        child.send("\x1d")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
