"""`harness run`: plan, boot, run the guest tests, write results/<run-id>/.

The guest tests run in a pytest child process (its own process group, dying
with us through PDEATHSIG). The child boots the VM through the plugin, so
`-n N` gives one VM per xdist worker. This process owns the run directory:
meta.json before anything starts (status `incomplete`) and after the end.

Every run keeps an event log (events.jsonl: the VMs' console lines, QMP
traffic and the harness's steps, stamped as they happen; harness/events.py);
at the end this process adds the host kernel's lines of the run's window and
writes timeline.txt from it (harness/timeline.py), whatever the verdict.

`run()` takes the host prober and the launcher of the guest tests as
parameters, so the verdict (status, exit code, failure, what is printed) is
tested with fakes in seconds; the defaults are the real probe and pytest child.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.channel import channel_modules, choose_channel
from harness.diagnostics import REMOTE_CONFIG, diagnose, diagnose_image
from harness.errors import EXIT_BAD_INPUT, EXIT_INFRA, BadInput, InfraError, Terminated
from harness.events import EVENTS, EventLog, Source
from harness.hoststate import guard_for
from harness.initramfs import build_initramfs
from harness.kernel import file_sha256, resolve_kernel
from harness.labplan import LabRequest, is_lab_host
from harness.paths import GUEST_TESTS_DIR, atomic_write, default_kernel
from harness.plan import LaunchPlan, choose_accel, kernel_cmdline, plan_profile, print_dry_run
from harness.probe import HostCaps, probe_host
from harness.probe.kmsg import HostKernelLog
from harness.process import kill_machines, sweep_stale
from harness.profiles import load_profile
from harness.pytest_child import EarlyPytest, new_sock_parent, pytest_child, wait_pytest
from harness.results import read_records, write_records
from harness.rundir import (
    FileRecord,
    Invocation,
    KernelRecord,
    ProfileRecord,
    QemuRecord,
    RunRecord,
    new_run_id,
    read_machines,
    timestamp,
    write_run,
)
from harness.tools import build_tools
from harness.verdict import (
    Verdict,
    creating_run_dir,
    finish,
    judge,
    print_diagnostics,
    print_summary,
    write_final,
)

Prober = Callable[[], HostCaps]


class Launcher(Protocol):
    def __call__(self, req: RunRequest, run_dir: Path, sock_parent: Path) -> int:
        """Run the guest tests of `req`, recording into run_dir (tests.json, machines/) with the VMs'
        sockets under sock_parent. Returns pytest's exit status, or verdict.TIMED_OUT past req.timeout."""
        ...


@dataclass
class RunRequest:
    kernel: str | None
    profile: str
    append: str = ""
    results: Path = Path("results")
    tests: Path = GUEST_TESTS_DIR
    pytest_args: list[str] = field(default_factory=list)
    qemu_args: list[str] = field(default_factory=list)
    timeout: float = 1800.0
    boot_timeout: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    force: bool = False
    dry_run: bool = False
    json: bool = False
    reproduces: str | None = None
    channel: str = "auto"
    target: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    label: str | None = None              # --label: the kernel build's name for people

    def invocation(self) -> Invocation:
        """What meta.json records of this request (see `from_invocation`)."""
        return Invocation(tests=str(self.tests), pytest_args=list(self.pytest_args), kernel=self.kernel,
                          profile=self.profile, append=self.append, qemu_args=list(self.qemu_args),
                          timeout=self.timeout, boot_timeout=self.boot_timeout, params=dict(self.params),
                          strict=self.strict, force=self.force, channel=self.channel, target=self.target,
                          label=self.label)

    @classmethod
    def from_invocation(cls, inv: Invocation, kernel: str, results: Path, pytest_args: list[str],
                        reproduces: str) -> RunRequest:
        """A recorded request again, on the given kernel image, test selection and results root."""
        return cls(kernel=kernel, profile=inv.profile, append=inv.append, results=results, tests=Path(inv.tests),
                   pytest_args=pytest_args, qemu_args=list(inv.qemu_args), timeout=inv.timeout,
                   boot_timeout=inv.boot_timeout, params=dict(inv.params), strict=inv.strict, force=inv.force,
                   channel=inv.channel, reproduces=reproduces, label=inv.label)


def make_plan(req: RunRequest, prober: Prober = probe_host) -> tuple[LaunchPlan, HostCaps]:
    """Resolve profile, kernel and initramfs into a LaunchPlan, on the host `prober` describes.

    Raises BadInput/InfraError."""
    load_profile(req.profile)  # an unknown profile is bad input before any slow step
    if not req.tests.is_dir():
        raise BadInput(f"guest tests {req.tests}: no such directory")
    caps = prober()
    if not caps.qemu.value:
        raise InfraError("QEMU not found: install qemu-system-x86 (or set HARNESS_QEMU)")
    choice = plan_profile(req.profile, req.params, caps, req.strict, req.force)
    profile = choice.effective
    kernel = resolve_kernel(req.kernel or default_kernel())
    diagnostics = diagnose_image(kernel.image, kernel.release)
    if req.strict and diagnostics.problems():
        # A kernel that cannot report a failure makes every test on it unable to fail.
        raise BadInput(f"kernel {kernel.spec}: {diagnostics.problems()[0]} (--strict)")
    accel, why = choose_accel(profile, caps)
    channel, channel_reason = choose_channel(req.channel, profile, kernel, diagnostics)
    # The initramfs carries the modules of both, so a forced or reproduced run
    # of the requested profile finds what it needs; and the channel's drivers.
    modules = tuple(dict.fromkeys([*profile.modules, *choice.requested.modules,
                                   *(("virtio_net",) if channel == "ssh" else ()),
                                   *channel_modules(channel, diagnostics)]))
    initrd = build_initramfs(kernel, modules, extra_files=build_tools(), ssh=channel == "ssh")
    if channel == "virtio" and "virtio_console" in initrd.missing_modules:
        if req.channel == "virtio":
            raise BadInput(f"--channel virtio: kernel {kernel.release} has no virtio_console module in its tree")
        channel, channel_reason = "serial", f"kernel {kernel.release}: no virtio_console module in its tree"
    plan = LaunchPlan(
        requested=req.profile, profile=profile, reasons=choice.reasons, requested_profile=choice.requested,
        accel=accel, accel_reason=why,
        qemu=str(caps.qemu.value), kernel=kernel, initrd=initrd.path, initrd_sha256=initrd.sha256,
        cmdline=kernel_cmdline(profile, req.append, channel), extra_args=tuple(req.qemu_args),
        boot_timeout=req.boot_timeout, append=req.append, initrd_modules=initrd.modules, channel=channel,
        channel_reason=channel_reason, diagnostics=diagnostics,
    )
    missing = [m for m in initrd.missing_modules if m in profile.modules or m in choice.requested.modules]
    if missing:
        names = profile.name if profile.name == req.profile else f"{req.profile}/{profile.name}"
        if kernel.modules_dir is None:
            print(f"note: kernel {kernel.release} has no module tree: {', '.join(missing)} "
                  f"(profile {names}) must be built in", file=sys.stderr)
        else:
            print(f"warning: kernel {kernel.release} has no module(s) {', '.join(missing)} "
                  f"named by profile {names}", file=sys.stderr)
    return plan, caps


def _results_root(req: RunRequest) -> Path:
    """--results, which must be (or become) a directory; BadInput naming it otherwise."""
    root = req.results.resolve()
    if root.exists() and not root.is_dir():
        raise BadInput(f"--results {req.results}: not a directory")
    return root


def _firmware(caps: HostCaps) -> dict[str, FileRecord]:
    # With no -bios/-pflash in the argv QEMU loads its default SeaBIOS image.
    path = caps.firmware.get("seabios")
    if path is None or not path.value:
        return {}
    return {"seabios": FileRecord(str(path.value), file_sha256(Path(str(path.value))))}


def _reproduce_script(run_dir: Path) -> str:
    return (
        "#!/bin/sh\n"
        f"# Re-run {run_dir.name}: same kernel, initramfs, QEMU argv, kernel command line and tests.\n"
        f"exec {shlex.quote(sys.executable)} -m harness reproduce \"$(dirname \"$0\")\" \"$@\"\n"
    )


def run(req: RunRequest, argv: list[str], prober: Prober = probe_host, launcher: Launcher | None = None) -> int:
    """Run the guest tests as `req` asks; returns the exit code. Raises BadInput/InfraError before
    a run directory exists (a selection of no tests removes the one it made).

    `prober` reads the host's capabilities; `launcher` runs the guest tests (None: a pytest
    child, started before the plan: see `EarlyPytest`; the command line may pass one it
    started itself, even earlier).
    """
    start = time.monotonic()
    early = launcher if isinstance(launcher, EarlyPytest) else None
    launch: Launcher = _run_pytest if launcher is None or early is not None else launcher
    try:
        if not req.dry_run:
            _results_root(req)  # a bad --results is named before any build or boot
        local = req.target is None and not is_lab_host(load_profile(req.profile))
        if early is not None and not (local and not req.dry_run and early.runs(req.tests, req.pytest_args)):
            early.stop()  # the command line started it before it knew
            early = None
        if req.target is not None:
            return _run_remote(req, argv, start, launch)
        if not local:
            from harness.labhost import run as run_lab_host

            return run_lab_host(LabRequest(
                kernel=req.kernel, params=req.params, results=req.results, tests=req.tests,
                pytest_args=req.pytest_args, append=req.append, boot_timeout=req.boot_timeout,
                timeout=req.timeout, strict=req.strict, qemu_args=req.qemu_args), argv, req.dry_run, req.json)
        if early is None and launch is _run_pytest and not req.dry_run and req.tests.is_dir():
            early = EarlyPytest(req.tests, req.pytest_args)
        return _run_local(req, argv, start, prober, early or launch)
    finally:
        if early is not None:
            early.stop()


def _run_local(req: RunRequest, argv: list[str], start: float, prober: Prober, launch: Launcher) -> int:
    plan, caps = make_plan(req, prober)
    if req.dry_run:
        print_dry_run(plan, req.json)
        return 0
    sweep_stale()
    # Host functions the profile assigns go to vfio-pci before the run directory exists (a group
    # holding a function not given is bad input), and come back however the run ends.
    with guard_for(plan.profile, say=lambda text: print(text, flush=True)) as guard:
        run_id = new_run_id(plan.kernel.release, plan.profile.name)
        run_dir = _results_root(req) / run_id
        record = _start_record(run_id, plan, caps, req, argv)
        with creating_run_dir(run_dir):
            guard.attach(run_dir)
            write_run(run_dir, record)
            atomic_write(run_dir / "plan.json", json.dumps(plan.to_json(), indent=1) + "\n")
            atomic_write(run_dir / "reproduce.sh", _reproduce_script(run_dir), mode=0o755)
            write_records(run_dir, [])
        print(f"run {run_id}: kernel {req.label or plan.kernel.identity.name()} "
              f"({plan.kernel.identity.short_key}), profile {plan.profile.name}, "
              f"accel {plan.accel} ({plan.accel_reason}), channel {plan.channel}", flush=True)
        if plan.fell_back:
            print(f"profile {plan.requested} FELL BACK to {plan.profile.name}: {'; '.join(plan.reasons)}",
                  flush=True)
        print_diagnostics(plan.diagnostics)
        return _execute(req, run_dir, record, start, launch,
                        sock_parent=launch.sock_parent if isinstance(launch, EarlyPytest) else None)


def _start_record(run_id: str, plan: LaunchPlan, caps: HostCaps, req: RunRequest, argv: list[str]) -> RunRecord:
    version = caps.qemu_version.value
    return RunRecord(
        run_id=run_id, started=timestamp(), command=["harness", *argv], invocation=req.invocation(),
        reproduces=req.reproduces, host=caps.to_json(),
        qemu=QemuRecord(plan.qemu, str(version) if version is not None else None), firmware=_firmware(caps),
        kernel=KernelRecord.of(plan.kernel, plan.diagnostics, req.label), series=list(plan.kernel.series),
        initramfs=FileRecord(str(plan.initrd), plan.initrd_sha256),
        profile=ProfileRecord(plan.requested, plan.profile.name, list(plan.reasons), plan.accel, plan.accel_reason,
                              params=dict(plan.profile.params),
                              requested_params=dict(plan.requested_profile.params)),
        cmdline=plan.cmdline,
    )


def _run_remote(req: RunRequest, argv: list[str], start: float, launch: Launcher) -> int:
    """Run the guest tests on an existing machine over SSH: no QEMU, same tests."""
    from harness.ssh import parse_target

    target = parse_target(req.target or "")
    if req.identity is None or not req.identity.is_file():
        raise BadInput(f"--identity {req.identity}: a private key file is needed for {target.url}")
    if req.known_hosts is not None and not req.known_hosts.is_file():
        raise BadInput(f"--known-hosts {req.known_hosts}: no such file")
    if not req.tests.is_dir():
        raise BadInput(f"guest tests {req.tests}: no such directory")
    release = resolve_kernel(req.kernel).release if req.kernel else None
    run_id = new_run_id(release or "unknown", "remote")
    run_dir = _results_root(req) / run_id
    info = {"url": target.url, "identity": str(req.identity.resolve()),
            "known_hosts": str(req.known_hosts.resolve()) if req.known_hosts else None, "release": release}
    record = RunRecord(run_id=run_id, started=timestamp(), command=["harness", *argv], target=target.url,
                       kernel=KernelRecord(release=release, spec=req.kernel, label=req.label),
                       profile=ProfileRecord("remote", "remote"), invocation=req.invocation())
    with creating_run_dir(run_dir):
        atomic_write(run_dir / "target.json", json.dumps(info, indent=1) + "\n")
        write_run(run_dir, record)
        write_records(run_dir, [])
    print(f"run {run_id}: remote target {target.url}", flush=True)
    return _execute(req, run_dir, record, start, launch, local=False)


def _execute(req: RunRequest, run_dir: Path, record: RunRecord, start: float, launch: Launcher,
             local: bool = True, sock_parent: Path | None = None) -> int:
    """Run the guest tests and finish the run directory; `local`: the VMs run on this host,
    whose kernel log belongs in the timeline; `sock_parent`: the VMs' socket directory, when the
    early pytest child already made it."""
    events = EventLog(run_dir / EVENTS)
    try:
        return _execute_logged(req, run_dir, record, start, launch, events,
                               HostKernelLog() if local else None, sock_parent)
    finally:
        events.close()


def _execute_logged(req: RunRequest, run_dir: Path, record: RunRecord, start: float, launch: Launcher,
                    events: EventLog, host_log: HostKernelLog | None, sock_parent: Path | None) -> int:
    sock_parent = sock_parent or new_sock_parent()
    verdict = Verdict.infra("")
    tests_start = time.monotonic()
    events.emit(Source.HARNESS, "tests-started", "guest tests started (pytest)")
    try:
        rc = launch(req, run_dir, sock_parent)
        verdict = judge(rc, read_records(run_dir), req.invocation())
    except (KeyboardInterrupt, Terminated) as e:
        verdict = Verdict.interrupted(e.signum if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        kill_machines(sock_parent.name)
        shutil.rmtree(sock_parent, ignore_errors=True)
        if verdict.exit_code == EXIT_BAD_INPUT:
            shutil.rmtree(run_dir, ignore_errors=True)
        if host_log is not None and verdict.exit_code == EXIT_BAD_INPUT:
            host_log.close()
    if verdict.exit_code == EXIT_BAD_INPUT:
        raise BadInput(verdict.note)
    events.emit(Source.HARNESS, "tests-ended", f"guest tests ended: {verdict.status} (exit {verdict.exit_code})"
                + (f": {verdict.note}" if verdict.note else ""))
    if host_log is not None:
        from harness.timeline import host_events

        events.write(host_events(host_log.read(), events))
    records = read_records(run_dir)
    remote_config = run_dir / REMOTE_CONFIG
    if remote_config.is_file():
        record.kernel.diagnostics = diagnose(remote_config.read_text(errors="replace"),
                                             f"{record.target}: /proc/config.gz or /boot/config-*")
    finish(record, verdict, records, read_machines(run_dir),
           tests=time.monotonic() - tests_start, total=time.monotonic() - start)
    events.emit(Source.HARNESS, "run-ended", f"run ended: {record.status} (exit {record.exit_code})")
    if not write_final(run_dir, record):
        return EXIT_INFRA
    try:
        # After meta.json: on a full disk the run's own record comes first.
        from harness.timeline import write_timeline

        write_timeline(run_dir, record.run_id)
    except OSError as e:
        print(f"warning: {run_dir / 'timeline.txt'}: {e.strerror}", file=sys.stderr)
    print_summary(run_dir, record, records)
    try:
        # The index serves `harness compare --last N --test NAME`; a run never fails over it.
        from harness.runindex import index_run  # here: it loads compare, sqlite3

        index_run(run_dir)
    except Exception as e:  # noqa: BLE001
        print(f"warning: run not added to {run_dir.parent}/index.sqlite: {e}", file=sys.stderr)
    return record.exit_code if record.exit_code is not None else verdict.exit_code


def _run_pytest(req: RunRequest, run_dir: Path, sock_parent: Path) -> int:
    child = pytest_child(req.tests, req.pytest_args, ["--harness-run-dir", str(run_dir)], sock_parent)
    return wait_pytest(child, req.timeout, run_dir)
