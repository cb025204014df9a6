"""`harness run` end to end: a real Debian kernel in real QEMU, and its faults.

Every test goes through the `cli` fixture, which fails the test if a QEMU
process or a socket directory outlives the command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.errors import InfraError
from harness.kernel import PREBUILT_KERNEL
from harness.probe import HostCaps
from harness.process import alive, processes
from harness.profiles import available
from harness.runner import RunRequest, run
from tests.conftest import REPO, Cli, meta

GUEST_TESTS = REPO / "guest_tests"
BOOT_SUITE = (GUEST_TESTS / "test_boot.py").read_text().count("\ndef test_")
COCO_SUITE = (GUEST_TESTS / "test_coco.py").read_text().count("\ndef test_")
ALL_SUITES = sum(p.read_text().count("\ndef test_") for p in GUEST_TESTS.glob("test_*.py"))


def junit_counts(run_dir) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    xml = JUnitXml.fromfile(str(run_dir / "junit.xml"))
    return xml.tests, xml.failures, xml.errors, xml.skipped


def test_default_run_passes_and_writes_the_results_layout(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    for name in ("meta.json", "junit.xml", "console.log", "dmesg.txt", "qemu-argv.json", "reproduce.sh"):
        assert (run_dir / name).is_file(), name
    m = meta(run_dir)
    assert m["status"] == "passed" and m["exit_code"] == 0
    assert m["profile"]["requested"] == m["profile"]["effective"] == "emulated"
    assert m["kernel"]["release"] and len(m["kernel"]["sha256"]) == 64
    assert m["timings"]["boot"] > 0 and m["timings"]["total"] >= m["timings"]["boot"]
    assert m["host"]["kvm"]["evidence"] and m["qemu"]["version"]
    tests, failures, errors, skipped = junit_counts(run_dir)
    assert (failures, errors) == (0, 0) and tests >= ALL_SUITES
    assert skipped == m["tests"]["skipped"] and m["tests"]["passed"] == tests - skipped
    assert b"Linux version " + m["kernel"]["release"].encode() in (run_dir / "console.log").read_bytes()
    argv = json.loads((run_dir / "qemu-argv.json").read_text())
    assert argv[0].endswith("qemu-system-x86_64") and "-kernel" in argv
    assert os.access(run_dir / "reproduce.sh", os.X_OK)
    assert "PASSED" in proc.stdout and str(run_dir) in proc.stdout


def test_panic_at_boot_is_a_fast_named_kernel_failure(cli: Cli) -> None:
    start = time.monotonic()
    proc = cli("run", "--results", str(cli.results), "--append", "rdinit=/does-not-exist", "-k", "test_boot")
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    m = meta(run_dir)
    assert m["status"] == "failed"
    assert "kernel panic during boot" in m["failure"]["message"]
    assert "Kernel panic - not syncing" in m["failure"]["message"]
    # Kernel failures are failures, not errors, in the JUnit file.
    assert junit_counts(run_dir) == (BOOT_SUITE, BOOT_SUITE, 0, 0)
    assert "Kernel panic" in proc.stdout
    assert elapsed < 30, "a panic must end the boot wait at once, not at the boot timeout"


def test_guest_that_never_answers_is_a_kernel_failure_at_the_deadline(cli: Cli) -> None:
    # /bin/cat as init: the kernel boots and prints, userspace never answers.
    proc = cli("run", "--results", str(cli.results), "--append", "rdinit=/bin/cat", "--boot-timeout", "8")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    m = meta(cli.only_run())
    assert "no userspace within 8 s" in m["failure"]["message"]
    assert m["failure"]["lines"], "the last console lines belong in meta.json"


def test_guest_with_no_output_at_all_is_infrastructure(cli: Cli) -> None:
    # -S: QEMU starts with the CPU stopped, so not one instruction runs.
    proc = cli("run", "--results", str(cli.results), "--qemu-arg=-S", "--boot-timeout", "4", "-k", "test_boot")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    m = meta(run_dir)
    assert m["status"] == "error" and "guest unreachable" in m["failure"]["message"]
    assert junit_counts(run_dir) == (BOOT_SUITE, 0, BOOT_SUITE, 0)


def test_qemu_that_fails_to_start_is_infrastructure_with_its_message(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "--qemu-arg=-device", "--qemu-arg=no-such-device")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    m = meta(cli.only_run())
    assert m["failure"]["kind"] == "QemuStartError"
    assert "no-such-device" in m["failure"]["message"]  # QEMU's own words are carried through


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_boot_stops_everything(cli: Cli, sig: int) -> None:
    proc = subprocess.Popen(cli.argv("run", "--results", str(cli.results)), env=cli.env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            dirs = cli.run_dirs()
            if dirs and (dirs[0] / "console.log").exists():
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it was signalled: {proc.communicate()[0]}")
            time.sleep(0.05)
        else:
            pytest.fail("the run never started booting")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out
    run_dir = cli.only_run()
    m = meta(run_dir)
    assert m["status"] == "interrupted"
    JUnitXml.fromfile(str(run_dir / "junit.xml"))  # well-formed


def test_bad_input_exits_2_with_one_line(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "--profile", "snpp")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"harness: unknown profile 'snpp'; available: {', '.join(available())}"
    proc = cli("run", "--results", str(cli.results), "--kernel", "/no/such/bzImage")
    assert (proc.returncode, proc.stderr.strip()) == (2, "harness: kernel /no/such/bzImage: no such file")
    proc = cli("run", "--results", str(cli.results), "--kernel", str(REPO / "pyproject.toml"))
    assert proc.returncode == 2 and "not a bzImage" in proc.stderr
    proc = cli("run", "--bogus-flag-for-pytest-too", "--results", str(cli.results))
    assert proc.returncode == 2
    assert cli.run_dirs() == [], "bad input must leave no half-written results"


def test_selecting_no_guest_test_is_bad_input_and_leaves_nothing(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "-k", "no_test_has_this_name")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no guest tests selected" in proc.stderr
    assert cli.run_dirs() == []


def test_pytest_selection_passes_through(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "-k", "release or cmdline")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert junit_counts(cli.only_run()) == (2, 0, 0, 0)


def test_the_vm_starts_before_the_tests_are_collected(cli: Cli) -> None:
    """A single pytest child starts QEMU as soon as it has the plan (harness.pytest_boot): the
    first test starts after QEMU did, where the fixture used to start it inside that test."""
    proc = cli("run", "--results", str(cli.results), "-k", "test_reached_userspace")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = [json.loads(line)["kind"] for line in (cli.only_run() / "events.jsonl").read_text().splitlines()]
    assert kinds.index("qemu-started") < kinds.index("test-start") < kinds.index("boot-detected"), kinds
    assert [m["worker"] for m in meta(cli.only_run())["machines"]] == ["main"]


def test_dry_run_prints_the_plan_and_starts_nothing(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "--dry-run", "--json", "--append", "foo=bar")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"requested", "effective", "reasons", "argv", "requested_argv"} <= set(plan)
    assert plan["requested"] == plan["effective"] == "emulated"
    argv = plan["argv"]
    assert argv[argv.index("-append") + 1].endswith(" foo=bar")
    assert plan["requested_argv"][plan["requested_argv"].index("-machine") + 1] == "q35,accel=kvm"
    assert not cli.results.exists()


def test_two_workers_boot_two_vms(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "-n", "2", "-k", "test_boot")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    machines = meta(run_dir)["machines"]
    assert sorted(m["worker"] for m in machines) == ["gw0", "gw1"]
    assert all(m["status"] == "stopped" and m["boot_seconds"] > 0 for m in machines)
    assert (run_dir / "console.log").is_file() and (run_dir / "console-gw1.log").is_file()
    assert junit_counts(run_dir) == (BOOT_SUITE, 0, 0, 0)


def test_reproduce_of_a_failing_run_fails_the_same_way(cli: Cli) -> None:
    first = cli("run", "--results", str(cli.results), "--append", "rdinit=/does-not-exist",
                "-k", "userspace")
    assert first.returncode == 1
    original = cli.only_run()
    proc = subprocess.run([str(original / "reproduce.sh")], env=cli.env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    again = [d for d in cli.run_dirs() if d != original]
    assert len(again) == 1
    m0, m1 = meta(original), meta(again[0])
    assert m1["reproduces"] == m0["run_id"]
    def without_timestamps(text: str) -> str:
        return re.sub(r"\[\s*\d+\.\d+\]", "[]", text)

    assert "Kernel panic" in m1["failure"]["message"]
    assert without_timestamps(m1["failure"]["message"]) == without_timestamps(m0["failure"]["message"])
    assert m1["cmdline"] == m0["cmdline"] and m1["kernel"]["sha256"] == m0["kernel"]["sha256"]
    assert junit_counts(again[0]) == junit_counts(original) == (1, 1, 0, 0)


def test_probe_command(cli: Cli) -> None:
    proc = cli("probe")
    assert proc.returncode == 0
    kvm_line = next(line for line in proc.stdout.splitlines() if line.startswith("kvm "))
    assert "usable (" in kvm_line
    data = json.loads(cli("probe", "--json").stdout)
    assert {"kvm", "qemu", "qemu_version", "sev_snp", "tdx", "iommu", "vfio_pci", "firmware"} <= set(data)


def _children_waiting_for_a_plan() -> list[int]:
    """This process's pytest children started before their run was planned."""
    found = []
    for pid, argv in processes():
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"--harness-plan-fd" in argv:
            found.append(pid)
    return found


def test_pytest_starts_while_the_run_is_planned_and_stops_when_the_plan_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # The child's private directory goes to this test's TMPDIR.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    during: list[list[int]] = []

    def prober() -> HostCaps:
        during.append(_children_waiting_for_a_plan())
        raise InfraError("the probe failed on purpose")

    req = RunRequest(kernel=PREBUILT_KERNEL, profile="emulated", results=tmp_path / "results",
                     pytest_args=["-k", "test_reached_userspace"])
    with pytest.raises(InfraError, match="on purpose"):
        run(req, [], prober=prober)
    assert len(during) == 1 and len(during[0]) == 1, "the pytest child was not started before the probe"
    assert _children_waiting_for_a_plan() == []
    assert not alive(during[0][0])
    assert list((tmp_path / "t").iterdir()) == [] and not (tmp_path / "results").exists()
    # Stopped before it could read the closed pipe: nothing of it on the terminal.
    assert capfd.readouterr().err == ""
