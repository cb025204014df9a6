"""The verdict of `harness run` (status, exit code, failure, what it prints, what
meta.json says) and reproduce's request, in seconds and without QEMU.

These tests pass `runner.run` FAKES for its two slow collaborators:
- `fake_host` stands in for `probe.probe_host`: a host with usable KVM and no
  CoCo hardware (so `snp` falls back), whose QEMU path does not even exist;
- `FakeLauncher` stands in for the pytest child that boots the VM and runs the
  guest tests: it writes what the plugin would (tests.json, machines/<worker>.json)
  and returns the exit status pytest would, or raises what a signal would.
The kernel is a fake bzImage (a setup header and a version string) with a
config beside it. Everything else is real: the plan, the initramfs (built into
a private cache), the run directory, the index. test_run.py covers the same
verdicts end to end with real kernels in real QEMU.
"""

from __future__ import annotations

import json
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.diagnostics import REMOTE_CONFIG
from harness.errors import BadInput, InfraError, Terminated
from harness.events import EVENTS, EventLog, Source
from harness.probe import Fact, HostCaps
from harness.reproduce import request_for
from harness.results import TestRecord, write_records
from harness.rundir import MachineRecord, MachineStatus, RunStatus, read_run, write_machine
from harness.runindex import history
from harness.runner import RunRequest, run
from harness.verdict import TIMED_OUT

RELEASE = "6.12.0-fake"
CAN_REPORT = "CONFIG_PRINTK=y\nCONFIG_BUG=y\nCONFIG_KALLSYMS=y\n"
# The keys of a finished run's meta.json (the documented results layout).
META_KEYS = {"run_id", "status", "harness_version", "started", "command", "invocation", "reproduces", "host",
             "qemu", "firmware", "kernel", "series", "initramfs", "profile", "cmdline", "exit_code", "finished",
             "timings", "machines", "tests"}


def fake_host() -> HostCaps:
    absent = Fact(False, "absent on this fake host")
    return HostCaps(kvm=Fact(True, "usable (fake)"), qemu=Fact("/nonexistent/qemu-system-x86_64", "fake"),
                    qemu_version=Fact("10.0.0", "fake"), qemu_objects=Fact("sev-guest,sev-snp-guest", "fake"),
                    sev=absent, sev_es=absent, sev_snp=absent, tdx=absent, iommu=absent, vfio_pci=absent,
                    firmware={"seabios": Fact(None, "absent"), "ovmf": Fact(None, "absent")})


def fake_kernel(folder: Path, config: str = CAN_REPORT) -> Path:
    """A file `bzimage_release` reads as a bzImage of RELEASE, and its config."""
    folder.mkdir(parents=True, exist_ok=True)
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    version = f"{RELEASE} (tests@harness) #1 SMP".encode()
    image[0x300:0x300 + len(version)] = version
    (folder / "bzImage").write_bytes(bytes(image))
    (folder / "config").write_text(config)
    return folder / "bzImage"


@dataclass
class FakeLauncher:
    rc: int = 0
    tests: list[TestRecord] = field(default_factory=list)
    machines: list[MachineRecord] = field(default_factory=list)
    raises: BaseException | None = None
    files: dict[str, str] = field(default_factory=dict)
    status_while_running: RunStatus | None = None
    events: list[str] = field(default_factory=list)   # harness steps a VM would log before it returns

    def __call__(self, req: RunRequest, run_dir: Path, sock_parent: Path) -> int:
        self.status_while_running = read_run(run_dir).status
        log = EventLog(run_dir / EVENTS, "main")
        for text in self.events:
            log.emit(Source.HARNESS, "step", text)
        log.close()
        assert sock_parent.is_dir() and (sock_parent / "owner.pid").is_file()
        for machine in self.machines:
            write_machine(run_dir, machine)
        write_records(run_dir, self.tests)
        for name, text in self.files.items():
            (run_dir / name).write_text(text)
        if self.raises is not None:
            raise self.raises
        return self.rc


def booted(worker: str = "main", seconds: float = 1.5) -> MachineRecord:
    return MachineRecord(f"harness-{worker}", worker, "console.log", MachineStatus.STOPPED, boot_seconds=seconds,
                         channel="serial", release=RELEASE, exit_status=0)


@pytest.fixture(scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def request_for_fake(tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunRequest]:
    # The fake kernel's initramfs goes to a private cache, and the runner's socket
    # directories (and the sweep of stale ones) to this test's own temporary directory.
    monkeypatch.setenv("HARNESS_CACHE", str(private_cache))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    kernel = fake_kernel(tmp_path / "kernel").resolve()
    yield RunRequest(kernel=str(kernel), profile="emulated", results=tmp_path / "results", timeout=60)
    assert list((tmp_path / "tmp").iterdir()) == [], "the run left its socket directory behind"


def only_run(req: RunRequest) -> Path:
    dirs = [p for p in req.results.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_a_passing_run_is_incomplete_until_the_end_then_passed(request_for_fake: RunRequest,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    launcher = FakeLauncher(0, [TestRecord("test_boot.py::test_a", seconds=0.5),
                                TestRecord("test_coco.py::test_b", "skipped", "no SNP")], [booted()])
    assert run(request_for_fake, ["run"], fake_host, launcher) == 0
    assert launcher.status_while_running is RunStatus.INCOMPLETE
    run_dir = only_run(request_for_fake)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert set(meta) == META_KEYS
    assert (meta["status"], meta["exit_code"]) == ("passed", 0)
    assert meta["tests"] == {"passed": 1, "failed": 0, "error": 0, "skipped": 1}
    assert meta["timings"]["boot"] == 1.5 and meta["machines"][0]["status"] == "stopped"
    assert meta["kernel"]["release"] == RELEASE and meta["kernel"]["diagnostics"]["problems"] == []
    assert meta["invocation"]["timeout"] == 60 and "target" not in meta["invocation"]
    out = capsys.readouterr().out
    assert f"status passed (exit 0); results: {run_dir}" in out and "SKIPPED" in out
    assert history(request_for_fake.results, 5, "test_a")[0]["test_status"] == "passed"


@pytest.mark.parametrize(("rc", "tests", "code", "status", "message"), [
    (1, [TestRecord("t.py::ok"), TestRecord("t.py::bad", "failed", "assert 1 == 2")], 1, "failed", "assert 1 == 2"),
    (1, [TestRecord("t.py::ok"), TestRecord("t.py::infra", "error", "QEMU went away")], 3, "error", "QEMU went away"),
    (TIMED_OUT, [], 3, "error", "internal timeout: guest tests exceeded --timeout 60 s"),
    (2, [], 130, "interrupted", "guest tests interrupted"),
    (3, [], 3, "error", "pytest exited with status 3"),
], ids=["kernel-failure", "infra-error", "timeout", "pytest-interrupted", "pytest-broke"])
def test_verdicts(request_for_fake: RunRequest, capsys: pytest.CaptureFixture[str], rc: int,
                  tests: list[TestRecord], code: int, status: str, message: str) -> None:
    assert run(request_for_fake, ["run"], fake_host, FakeLauncher(rc, tests, [booted()])) == code
    meta = json.loads((only_run(request_for_fake) / "meta.json").read_text())
    assert (meta["status"], meta["exit_code"], meta["failure"]["message"]) == (status, code, message)
    if tests:
        assert meta["failure"]["test"] == tests[1].nodeid and meta["failure"]["kind"] == tests[1].status
    assert f"{status.upper()}: {message}" in capsys.readouterr().out


@pytest.mark.parametrize(("rc", "message"), [(5, "no guest tests selected in "), (4, "pytest rejected the arguments")])
def test_bad_selection_is_bad_input_and_leaves_no_run(request_for_fake: RunRequest, rc: int, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        run(request_for_fake, ["run"], fake_host, FakeLauncher(rc))
    assert list(request_for_fake.results.iterdir()) == []


def test_a_boot_failure_is_the_failure_with_the_last_console_lines(request_for_fake: RunRequest,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lines = [f"[    {i}.000000] console line {i}" for i in range(30)]
    machine = MachineRecord("harness-main", "main", "console.log", MachineStatus.BOOT_FAILED,
                            error="kernel panic during boot: Kernel panic - not syncing", error_type="BootFailure",
                            lines=lines)
    tests = [TestRecord("test_boot.py::test_a", "failed", "BootFailure: kernel panic during boot")]
    assert run(request_for_fake, ["run"], fake_host, FakeLauncher(1, tests, [machine])) == 1
    meta = json.loads((only_run(request_for_fake) / "meta.json").read_text())
    assert meta["failure"] == {"message": machine.error, "kind": "BootFailure", "lines": lines[-20:]}
    assert meta["timings"]["boot"] is None
    out = capsys.readouterr().out
    assert f"FAILED: {machine.error}" in out
    assert [line for line in out.splitlines() if line.startswith("  | ")] == [f"  | {x}" for x in lines[-8:]]


@pytest.mark.parametrize(("raised", "code"), [(KeyboardInterrupt(), 130), (Terminated(signal.SIGTERM), 143)])
def test_a_signal_during_the_tests_is_an_interrupted_run(request_for_fake: RunRequest, raised: BaseException,
                                                         code: int) -> None:
    launcher = FakeLauncher(raises=raised, events=["QEMU started", "test start t.py::slow"])
    assert run(request_for_fake, ["run"], fake_host, launcher) == code
    run_dir = only_run(request_for_fake)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["status"], meta["exit_code"]) == ("interrupted", code)
    assert meta["failure"]["message"] == f"interrupted by signal {code - 128}"
    # The timeline is written on this path too, with what the VM logged before the signal.
    texts = [line.split("  ")[-1] for line in (run_dir / "timeline.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert texts[:3] == ["guest tests started (pytest)", "QEMU started", "test start t.py::slow"]
    assert texts[3] == f"guest tests ended: interrupted (exit {code}): interrupted by signal {code - 128}"
    assert texts[-1] == f"run ended: interrupted (exit {code})"


def test_a_fallback_is_printed_and_recorded(request_for_fake: RunRequest, capsys: pytest.CaptureFixture[str]) -> None:
    request_for_fake.profile = "snp"
    assert run(request_for_fake, ["run"], fake_host, FakeLauncher(0, [TestRecord("t.py::ok")], [booted()])) == 0
    profile = json.loads((only_run(request_for_fake) / "meta.json").read_text())["profile"]
    assert (profile["requested"], profile["effective"]) == ("snp", "coco-emulated")
    assert "sev_snp: absent on this fake host" in profile["reasons"]
    out = capsys.readouterr().out
    assert "profile snp FELL BACK to coco-emulated: sev_snp: absent on this fake host" in out
    assert "profile snp -> coco-emulated (fallback)" in out and "  because: sev_snp: absent" in out


def test_strict_refuses_a_fallback_and_force_runs_it_anyway(request_for_fake: RunRequest,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    request_for_fake.profile, request_for_fake.strict = "snp", True
    with pytest.raises(InfraError, match=r"profile snp cannot run on this host \(--strict\): sev_snp"):
        run(request_for_fake, ["run"], fake_host, FakeLauncher())
    assert not request_for_fake.results.exists()
    request_for_fake.strict, request_for_fake.force = False, True
    assert run(request_for_fake, ["run"], fake_host, FakeLauncher(0, [TestRecord("t.py::ok")], [booted()])) == 0
    assert "  forced despite: sev_snp: absent on this fake host" in capsys.readouterr().out


def test_a_kernel_that_cannot_warn_is_said_at_the_start_and_in_the_summary(
        request_for_fake: RunRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request_for_fake.kernel = str(fake_kernel(tmp_path / "nobug", "CONFIG_PRINTK=y\n# CONFIG_BUG is not set\n"))
    assert run(request_for_fake, ["run"], fake_host, FakeLauncher(0, [TestRecord("t.py::ok")], [booted()])) == 0
    out = capsys.readouterr().out
    warning = "WARNING: this kernel cannot report WARN/BUG: CONFIG_BUG is off"
    assert out.count(warning) == 2 and out.rindex(warning) > out.index("PASSED")
    diagnostics = read_run(only_run(request_for_fake)).kernel.diagnostics
    assert diagnostics is not None
    assert diagnostics.problems() == ["this kernel cannot report WARN/BUG: CONFIG_BUG is off"]


def test_a_remote_run_records_its_target_and_its_kernel_config(request_for_fake: RunRequest, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "key").write_text("not a real key: the fake launcher never connects\n")
    request_for_fake.target, request_for_fake.identity = "ssh://root@192.0.2.1:2222", tmp_path / "key"
    launcher = FakeLauncher(0, [TestRecord("t.py::ok")], files={REMOTE_CONFIG: CAN_REPORT})
    assert run(request_for_fake, ["run"], fake_host, launcher) == 0
    meta = json.loads((only_run(request_for_fake) / "meta.json").read_text())
    assert meta["target"] == meta["invocation"]["target"] == "ssh://root@192.0.2.1:2222"
    assert meta["profile"] == {"requested": "remote", "effective": "remote", "reasons": [], "accel": None}
    assert meta["kernel"]["diagnostics"]["source"].startswith("ssh://root@192.0.2.1:2222: ")
    assert not {"host", "qemu", "initramfs", "cmdline", "failure"} & set(meta)
    assert "remote target ssh://root@192.0.2.1:2222" in capsys.readouterr().out


def test_reproduce_rebuilds_the_request_from_the_record(request_for_fake: RunRequest) -> None:
    request_for_fake.append, request_for_fake.params = "quiet", {"memory": "1G"}
    request_for_fake.pytest_args, request_for_fake.qemu_args = ["-k", "boot"], ["-S"]
    run(request_for_fake, ["run"], fake_host, FakeLauncher(0, [TestRecord("t.py::ok")], [booted()]))
    run_dir = only_run(request_for_fake)
    record = read_run(run_dir)
    again = request_for(record, run_dir, [], None)
    assert again.invocation() == request_for_fake.invocation()
    assert (again.reproduces, again.results) == (record.run_id, run_dir.parent)
    one = request_for(record, run_dir, ["t.py::ok"], None)
    assert one.pytest_args == [str(request_for_fake.tests / "t.py::ok")]
    assert request_for_fake.kernel is not None
    Path(request_for_fake.kernel).write_bytes(Path(request_for_fake.kernel).read_bytes() + b"changed")
    with pytest.raises(BadInput, match="missing or changed since"):
        request_for(record, run_dir, [], None)
