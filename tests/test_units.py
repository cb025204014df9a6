"""Pure pieces: cpio, profiles, console and dmesg parsers, the console reader and boot
verdicts (over a socket pair and stand-in processes), module resolution, results."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.console import BootScanner, Console, split_lines
from harness.cpio import CpioWriter
from harness.errors import BadInput, BootFailure, GuestUnreachable, QemuStartError
from harness.guest import CommandFailed, CommandResult, GuestChannel
from harness.initramfs import resolve_modules
from harness.kernel import bzimage_release
from harness.machine import boot_error, boot_timeout
from harness.profiles import load_profile
from harness.pytest_boot import single_process
from harness.pytest_record import classify
from harness.qemuproc import QemuProcess
from harness.results import TestRecord, exit_code_for, write_junit

DATA = Path(__file__).parent / "data"


def console_text(name: str) -> list[str]:
    return (DATA / "console" / name).read_text().splitlines()


def test_cpio_is_readable_by_the_cpio_tool(tmp_path: Path) -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("bin")
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.symlink("bin/sh", "/bin/busybox")
    w.char_device("console", 5, 1)
    w.finish()
    data = buf.getvalue()
    assert len(data) % 512 == 0
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True).stdout.decode()
    assert "bin/hello" in listing and "bin/sh -> /bin/busybox" in listing
    assert "-rwxr-xr-x" in listing and "crw-------" in listing
    out = subprocess.run(["cpio", "-i", "--to-stdout", "bin/hello"], input=data, capture_output=True,
                         check=True).stdout
    assert out == b"#!/bin/sh\necho hi\n"


def _write(d: Path, name: str, text: str) -> None:
    (d / f"{name}.yaml").write_text(text)


def test_profiles_compose_and_append(tmp_path: Path) -> None:
    _write(tmp_path, "base", "cmdline: [console=ttyS0]\nsmp: 2\nmemory: 2G\ntimeouts: {boot: 30}\n")
    _write(tmp_path, "child", "extends: base\n+cmdline: [swiotlb=force]\nsmp: 1\ntimeouts: {command: 5}\n")
    p = load_profile("child", tmp_path)
    assert p.cmdline == ("console=ttyS0", "swiotlb=force")
    assert (p.smp, p.memory_mib, p.timeouts.boot, p.timeouts.command) == (1, 2048, 30.0, 5.0)
    assert isinstance(p.cmdline, tuple)
    with pytest.raises(AttributeError):
        p.smp = 4  # type: ignore[misc]


@pytest.mark.parametrize(("text", "expected"), [
    ("smpp: 2\n", "unknown key 'smpp'"),
    ("smp: two\n", "key 'smp': expected int, got str"),
    ("cmdline: console=ttyS0\n", "key 'cmdline': expected a list of strings"),
    ("smp: [1\n", "malformed YAML"),
    ("extends: bad\n", "'extends' loop: bad -> bad"),
    ("accel: hvf\n", "key 'accel' must be auto, kvm or tcg"),
    ("timeouts: {boot: -1}\n", "timeouts.boot"),
])
def test_bad_profiles_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    _write(tmp_path, "bad", text)
    with pytest.raises(BadInput, match="profile bad") as e:
        load_profile("bad", tmp_path)
    assert expected in str(e.value)


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(BadInput) as e:
        load_profile("emulatd")
    assert str(e.value).startswith("unknown profile 'emulatd'; available: ")
    assert "emulated" in str(e.value)


@pytest.mark.parametrize(("log", "kind"), [
    ("panic-no-init.log", "panic"),
    ("oops-null-deref.log", "oops"),
    ("reset-second-banner.log", "reset"),
    ("clean-boot.log", None),
    ("warning-splat.log", None),  # a WARN does not end the boot; the dmesg rules judge it
])
def test_boot_scanner(log: str, kind: str | None) -> None:
    scanner = BootScanner()
    faults = [f for f in map(scanner.feed, console_text(log)) if f]
    assert (faults[0].kind if faults else None) == kind


def test_split_lines_keeps_the_unfinished_rest() -> None:
    lines, rest = split_lines(b"one\r\ntwo\npartial")
    assert (lines, rest) == (["one", "two"], b"partial")



def _fed_console(tmp_path: Path, data: bytes, sink: list[bytes] | None = None) -> Console:
    """A Console that has read `data` and then seen QEMU close its side."""
    ours, qemus = socket.socketpair()
    console = Console(ours, tmp_path / "console.log", sink.append if sink is not None else None)
    console.start("console-test")
    qemus.sendall(data)
    qemus.close()
    console.wait_closed(5)
    return console


def test_console_tees_every_byte_then_scans_the_lines(tmp_path: Path) -> None:
    data = (DATA / "console" / "panic-no-init.log").read_bytes().replace(b"\n", b"\r\n") + b"cut off"
    sink: list[bytes] = []
    console = _fed_console(tmp_path, data, sink)
    assert (tmp_path / "console.log").read_bytes() == data == b"".join(sink)
    assert console.bytes_read == len(data)
    assert console.lines() == [*console_text("panic-no-init.log"), "cut off"]
    assert console.fault is not None and console.fault.kind == "panic"
    console.close()
    console.close()


def test_console_close_wakes_and_joins_its_reader(tmp_path: Path) -> None:
    ours, qemus = socket.socketpair()
    console = Console(ours, tmp_path / "console.log")
    console.start("console-join-test")
    console.close()  # QEMU's side is still open: the reader sits in recv()
    assert "console-join-test" not in [t.name for t in threading.enumerate()]
    qemus.close()


@pytest.fixture
def exited_qemu(tmp_path: Path) -> QemuProcess:
    """A stand-in for a QEMU that printed to its log and exited with status 3."""
    qemu = QemuProcess(["sh", "-c", "echo 'qemu: cannot set up guest memory' >&2; exit 3"], tmp_path / "qemu.log")
    qemu.wait(10)
    return qemu


@pytest.fixture
def running_qemu(tmp_path: Path) -> Iterator[QemuProcess]:
    qemu = QemuProcess(["sleep", "60"], tmp_path / "qemu.log")
    yield qemu
    assert qemu.stop(term_wait=None)


@pytest.mark.parametrize(("log", "verdict"), [
    ("panic-no-init.log", "kernel panic during boot: "),          # the fault wins over QEMU's exit
    ("clean-boot.log", "QEMU exited with status 3 during boot (guest reset or powered off)"),
    ("", "QEMU exited with status 3 before any console output"),
])
def test_boot_verdict_once_qemu_exited(tmp_path: Path, exited_qemu: QemuProcess, log: str, verdict: str) -> None:
    console = _fed_console(tmp_path, (DATA / "console" / log).read_bytes() if log else b"")
    error = boot_error(console, exited_qemu)
    assert error is not None and str(error).startswith(verdict)
    if log:
        assert isinstance(error, BootFailure) and error.lines
    else:
        assert isinstance(error, QemuStartError) and "cannot set up guest memory" in str(error)


def test_boot_verdict_while_qemu_runs(tmp_path: Path, running_qemu: QemuProcess) -> None:
    assert boot_error(_fed_console(tmp_path, b"Linux version 6.1.0\n"), running_qemu) is None
    oops = _fed_console(tmp_path, (DATA / "console" / "oops-null-deref.log").read_bytes())
    assert str(boot_error(oops, running_qemu)).startswith("kernel oops during boot: ")


def test_boot_verdict_at_the_deadline(tmp_path: Path) -> None:
    silent = boot_timeout(_fed_console(tmp_path, b""), 4)
    assert isinstance(silent, GuestUnreachable) and "no console output" in str(silent)
    printed = boot_timeout(_fed_console(tmp_path, (DATA / "console" / "clean-boot.log").read_bytes()), 8)
    assert isinstance(printed, BootFailure) and str(printed).startswith("no userspace within 8 s")
    assert printed.lines

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


def test_modules_resolve_dependencies_first() -> None:
    order, missing = resolve_modules(("virtio-pci", "virtio_blk", "nvme", "no_such"), MODULES_DEP,
                                     "kernel/drivers/nvme/host/nvme.ko\n")
    assert order == ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
                     "kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/block/virtio_blk.ko.xz"]
    assert missing == ["no_such"]  # nvme is built in: needs nothing


def test_bzimage_release_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 4096)
    with pytest.raises(BadInput, match="not a bzImage"):
        bzimage_release(tmp_path / "vmlinux")


def test_bzimage_release_of_a_real_kernel(debian_kernel) -> None:  # type: ignore[no-untyped-def]
    assert bzimage_release(debian_kernel.image) == debian_kernel.release


@pytest.mark.parametrize(("when", "outcome", "kind", "status"), [
    ("call", "failed", None, "failed"),
    ("setup", "failed", None, "error"),
    ("setup", "failed", "kernel", "failed"),   # a panic at boot surfaces in fixture setup
    ("call", "failed", "infra", "error"),
    ("setup", "skipped", None, "skipped"),
    ("call", "passed", None, "passed"),
])
def test_classify(when: str, outcome: str, kind: str | None, status: str) -> None:
    assert classify(when, outcome, kind) == status


def test_junit_keeps_failures_errors_and_skips_apart(tmp_path: Path) -> None:
    records = [TestRecord("a.py::t1"), TestRecord("a.py::t2", "failed", "boom"),
               TestRecord("a.py::t3", "error", "qemu"), TestRecord("a.py::t4", "skipped", "no SNP")]
    write_junit(tmp_path / "j.xml", records, "suite")
    xml = JUnitXml.fromfile(str(tmp_path / "j.xml"))
    assert (xml.tests, xml.failures, xml.errors, xml.skipped) == (4, 1, 1, 1)
    assert exit_code_for(records) == 1
    assert exit_code_for(records[2:]) == 3
    assert exit_code_for([records[0], records[3]]) == 0


def test_device_args_follow_qemu_property_types() -> None:
    from harness.hotplug import device_args

    types = {"disable-legacy": "OnOffAuto", "iommu_platform": "bool", "num-queues": "uint16", "serial": "str"}
    args = device_args("virtio-blk-pci,id=d0,serial=0123,disable-legacy=on,iommu_platform=on,num-queues=2", types)
    assert args == {"driver": "virtio-blk-pci", "id": "d0", "serial": "0123", "disable-legacy": "on",
                    "iommu_platform": True, "num-queues": 2}


def test_sysfs_parsers() -> None:
    from harness.sysfs import bar_sizes, parse_pci_listing

    resource = ("0x00000000fe800000 0x00000000fe8fffff 0x0000000000040200\n"
                + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 6)
    assert bar_sizes(resource) == {0: 1 << 20}
    devs = parse_pci_listing("0000:00:03.0 0x1234 0x11e8 - 0\n0000:00:04.0 0x1b36 0x0010 nvme 1\nbad line\n")
    assert [(d.bdf, d.driver, d.enabled) for d in devs] == [("0000:00:03.0", None, False),
                                                             ("0000:00:04.0", "nvme", True)]


def test_a_corrupt_meta_json_is_bad_input_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main
    from harness.rundir import read_run

    run_dir = tmp_path / "20261101-000000-emulated-6.12-abcd"
    run_dir.mkdir()
    for text, problem in (('{"run_id": "x", "status": "pas', "not valid JSON"),
                          ('{"run_id": "x", "profile": {"requested": "emulated"}}', "profile.effective: missing"),
                          ('{"run_id": "x", "profile": {"requested": "a", "effective": "a"}, "status": "done"}',
                           "status: 'done' is not one of incomplete, passed")):
        (run_dir / "meta.json").write_text(text)
        with pytest.raises(BadInput, match=problem) as e:
            read_run(run_dir)
        assert str(e.value).startswith(f"{run_dir / 'meta.json'}: ")
        for command in (["compare", str(run_dir)], ["reproduce", str(run_dir)]):
            assert main(command) == 2
            assert capsys.readouterr().err.startswith(f"harness: {run_dir / 'meta.json'}: ")


def test_run_and_machine_records_read_back_as_written(tmp_path: Path) -> None:
    from harness.diagnostics import Diagnostics
    from harness.rundir import (
        Failure,
        FileRecord,
        Invocation,
        KernelRecord,
        MachineRecord,
        MachineStatus,
        ProfileRecord,
        RunRecord,
        RunStatus,
        Timings,
        read_machines,
        read_run,
        write_machine,
        write_run,
    )

    machine = MachineRecord("harness-gw1", "gw1", "console-gw1.log", MachineStatus.BOOT_FAILED, argv=["qemu"],
                            exit_status=-9, error="no userspace within 8 s", error_type="BootFailure", lines=["x"])
    record = RunRecord(
        run_id="r", profile=ProfileRecord("snp", "coco-emulated", ["sev_snp: no"], "tcg", "kvm unusable", {}, {}),
        status=RunStatus.FAILED, invocation=Invocation(tests="guest_tests", params={"memory": "1G"}),
        kernel=KernelRecord("6.12", "k.yaml", "/k/bzImage", "00" * 32, None, None, ["a patch"],
                            Diagnostics("config", {"printk": True, "warn_bug": True})),
        initramfs=FileRecord("/i.cpio", "11" * 32), exit_code=1, timings=Timings(None, 1.0, 2.5),
        machines=[machine], tests={"failed": 1}, failure=Failure("boom", kind="BootFailure", lines=["x"]))
    write_run(tmp_path, record)
    write_machine(tmp_path, machine)
    assert read_run(tmp_path) == record and read_machines(tmp_path) == [machine]
    meta = json.loads((tmp_path / "meta.json").read_text())
    # Keys whose presence means something are absent while unknown: not a remote run, no host probed yet.
    assert "target" not in meta and "host" not in meta and "target" not in meta["invocation"]
    assert meta["kernel"]["diagnostics"]["problems"] == [] and meta["profile"]["effective"] == "coco-emulated"
    (tmp_path / "machines" / "gw2.json").write_text("{")
    assert read_machines(tmp_path) == [machine]  # named on stderr, left out


def test_guest_deadlines_stretch_as_the_run_stretched_its_boot_deadline(tmp_path: Path) -> None:
    from harness.kernel import Kernel
    from harness.plan import LaunchPlan
    from harness.pytest_plugin import RunInfo

    profile = load_profile("emulated")   # timeouts.boot: 60
    kernel = Kernel("bzImage", tmp_path / "bzImage", "6.12", "")
    plan = LaunchPlan("emulated", profile, (), profile, "tcg", "", "qemu", kernel, tmp_path / "initrd", "", "")
    assert RunInfo(tmp_path, plan, "main").deadline(60) == 60
    assert RunInfo(tmp_path, replace(plan, boot_timeout=300), "main").deadline(60) == 300
    assert RunInfo(tmp_path, replace(plan, boot_timeout=10), "main").deadline(60) == 60   # never shorter
    assert RunInfo(tmp_path, None, "main", {"url": "ssh://lab"}).deadline(60) == 60


@pytest.mark.parametrize("argv, addopts, single", [
    (["-q", "guest_tests", "-k", "test_reached_userspace"], "", True),
    (["-k", "dma or hotplug", "--tb=short"], "-p no:cacheprovider", True),
    (["-n", "2", "guest_tests"], "", False),
    (["-n2"], "", False),
    (["--numprocesses=auto"], "", False),
    (["--dist", "load"], "", False),
    (["-q"], "-n 4", False),
    (["-q"], "'unbalanced", False),   # unparsable: assume the worst
])
def test_early_boot_only_where_pytest_runs_the_tests_itself(argv: list[str], addopts: str, single: bool) -> None:
    assert single_process(argv, addopts) is single


class _HostShell(GuestChannel):
    """A channel whose commands run in this host's /bin/sh with only `bin` on PATH: for the
    channel's helpers, not for a kernel."""

    def __init__(self, bin_dir: Path) -> None:
        self.env = {"PATH": str(bin_dir)}

    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        proc = subprocess.run(["/bin/sh", "-c", command], env=self.env, capture_output=True, timeout=30)
        result = CommandResult(command, proc.returncode, proc.stdout.decode(errors="replace"),
                               proc.stderr.decode(errors="replace"), 0.0)
        if check and result.exit_code:
            raise CommandFailed(result)
        return result


def test_kernel_log_is_dmesg_compressed_for_the_trip_or_plain_dmesg(tmp_path: Path) -> None:
    import shutil

    log = "".join(f"[{i:5d}.000000] line {i}: caf\u00e9 \u00fcber\n" for i in range(3000))
    (tmp_path / "log").write_text(log)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dmesg").write_text(f"#!/bin/sh\nexec cat {tmp_path / 'log'}\n")
    (bin_dir / "dmesg").chmod(0o755)
    (bin_dir / "cat").symlink_to(shutil.which("cat") or "/bin/cat")
    (bin_dir / "base64").symlink_to(shutil.which("base64") or "/usr/bin/base64")
    shell = _HostShell(bin_dir)
    # No gzip here: plain dmesg.
    plain = shell.kernel_log()
    assert plain.ok and plain.stdout == log and plain.command == "dmesg"
    (bin_dir / "gzip").symlink_to(shutil.which("gzip") or "/bin/gzip")
    packed = shell.kernel_log()
    assert packed.ok and packed.stdout == log and packed.command == "dmesg"
    assert "gzip" in shell.run('log=$(dmesg) && printf "%s\\n" "$log" | gzip -1 | base64 | head -c 0; '
                               'command -v gzip').stdout
    # A dmesg that fails is plain dmesg's failure, never an empty log that passes.
    (bin_dir / "dmesg").write_text("#!/bin/sh\necho 'dmesg: read kernel buffer failed: Operation not permitted' >&2\n"
                                   "exit 1\n")
    failed = shell.kernel_log()
    assert failed.exit_code == 1 and "not permitted" in failed.stderr and failed.stdout == ""
    with pytest.raises(CommandFailed, match="not permitted"):
        shell.kernel_log(check=True)


def test_kernel_lines_are_read_a_part_at_a_time_and_whole_again_when_the_log_shrank(tmp_path: Path) -> None:
    import shutil

    log = tmp_path / "log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dmesg").write_text(f"#!/bin/sh\nexec cat {log}\n")
    (bin_dir / "dmesg").chmod(0o755)
    for tool in ("cat", "gzip", "base64"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    shell = _HostShell(bin_dir)
    # A form feed inside a message does not end its line (dmesg | wc -l counts newlines).
    log.write_text("[    0.1] one\n[    0.2] two\fstill two\n")
    assert shell.kernel_lines() == ["[    0.1] one", "[    0.2] two\fstill two"]
    log.write_text(log.read_text() + "[    0.3] three\n")
    lines = shell.kernel_lines()
    assert lines[2:] == ["[    0.3] three"] and len(lines) == 3
    lines.append("not the channel's")  # a copy
    log.write_text("[    9.0] after dmesg -c\n")  # shorter than what was read: read whole again
    assert shell.kernel_lines() == ["[    9.0] after dmesg -c"]
    (bin_dir / "dmesg").write_text("#!/bin/sh\necho 'dmesg: Operation not permitted' >&2\nexit 1\n")
    with pytest.raises(CommandFailed, match="not permitted"):
        shell.kernel_lines(check=True)


def test_the_empty_junit_a_run_starts_with_is_what_junitparser_writes(tmp_path: Path) -> None:
    from junitparser import JUnitXml, TestSuite

    from harness.results import write_junit, write_junit_xml

    for suite in ("20261121-230056-emulated-6.12.117+-fe4a", "a\"b<c>&d'e"):  # run ids, and XML's own
        write_junit(tmp_path / "fast.xml", [], suite)
        xml = JUnitXml()
        xml.add_testsuite(TestSuite(suite))
        write_junit_xml(tmp_path / "junitparser.xml", xml)
        assert (tmp_path / "fast.xml").read_text() == (tmp_path / "junitparser.xml").read_text()
        assert JUnitXml.fromfile(str(tmp_path / "fast.xml")).tests == 0


def test_a_profile_is_parsed_once_per_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiles come from the cache's copy of what their text parsed to; an edit of the same
    size within the same clock tick is still an edit, a malformed one still named."""
    from harness import paths
    from harness.errors import BadInput
    from harness.profiles import load_profile

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    parsed: list[str] = []
    real = paths.parse_yaml
    monkeypatch.setattr("harness.profiles.load.parse_yaml", lambda text: parsed.append(text) or real(text))
    (tmp_path / "p.yaml").write_text("machine: q35\nsmp: 2\n")
    assert load_profile("p", tmp_path).smp == 2
    assert load_profile("p", tmp_path).smp == 2
    assert len(parsed) == 1
    (tmp_path / "p.yaml").write_text("machine: q35\nsmp: 4\n")
    assert load_profile("p", tmp_path).smp == 4 and len(parsed) == 2
    (tmp_path / "p.yaml").write_text("machine: [q35\n")
    with pytest.raises(BadInput, match=r"profile p \(.*p\.yaml line \d+\): malformed YAML"):
        load_profile("p", tmp_path)


def test_a_build_spec_is_parsed_once_per_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `harness run` reads the default build spec: after the first parse it comes from the
    cache's memo without PyYAML; an edit is parsed again, a malformed one still named."""
    from harness import paths
    from harness.build import load_spec

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    parsed: list[str] = []
    real = paths.parse_yaml
    monkeypatch.setattr(paths, "parse_yaml", lambda text: parsed.append(text) or real(text))
    spec = tmp_path / "k.yaml"
    spec.write_text("source: /src/linux.tar.xz\nconfigs: [base]\n")
    assert load_spec(spec).configs == ["base"] and load_spec(spec).source == "/src/linux.tar.xz"
    assert len(parsed) == 1
    spec.write_text("source: /src/linux.tar.xz\nconfigs: [base, debug]\n")
    assert load_spec(spec).configs == ["base", "debug"] and len(parsed) == 2
    spec.write_text("source: [x\n")
    with pytest.raises(BadInput, match=r"build spec .*k\.yaml: malformed YAML"):
        load_spec(spec)
