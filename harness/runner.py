"""`harness run`: plan, boot, run the guest tests, write results/<run-id>/.

The guest tests run in a pytest child process (its own process group, dying
with us through PDEATHSIG). The child boots the VM through the plugin, so
`-n N` gives one VM per xdist worker. This process owns the run directory:
meta.json before anything starts (status `incomplete`) and after the end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__
from harness.diagnostics import REMOTE_CONFIG, Diagnostics, diagnose, diagnose_image
from harness.errors import EXIT_BAD_INPUT, EXIT_INFRA, BadInput, InfraError, Terminated
from harness.hoststate import guard_for
from harness.initramfs import build_initramfs
from harness.kernel import file_sha256, resolve_kernel
from harness.labhost import LabRequest, is_lab_host
from harness.labhost import run as run_lab_host
from harness.machine import die_with_parent
from harness.paths import GUEST_TESTS_DIR, atomic_write, default_kernel
from harness.plan import SOCK_DIR_PLACEHOLDER, LaunchPlan, choose_accel, kernel_cmdline, plan_profile
from harness.probe import HostCaps, probe_host
from harness.profiles import load_profile
from harness.results import (
    TestRecord,
    counts,
    exit_code_for,
    new_run_id,
    read_records,
    summary_table,
    write_meta,
    write_records,
)
from harness.tools import build_tools

SOCK_PREFIX = "harness-"


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
    channel: str = "serial"
    target: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None


def make_plan(req: RunRequest, caps: HostCaps | None = None) -> tuple[LaunchPlan, HostCaps]:
    """Resolve profile, kernel and initramfs into a LaunchPlan. Raises BadInput/InfraError."""
    load_profile(req.profile)  # an unknown profile is bad input before any slow step
    if not req.tests.is_dir():
        raise BadInput(f"guest tests {req.tests}: no such directory")
    caps = caps or probe_host()
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
    # The initramfs carries the modules of both, so a forced or reproduced run
    # of the requested profile finds what it needs.
    modules = tuple(dict.fromkeys([*profile.modules, *choice.requested.modules]))
    initrd = build_initramfs(kernel, modules, extra_files=build_tools(), ssh=req.channel == "ssh")
    plan = LaunchPlan(
        requested=req.profile, profile=profile, reasons=choice.reasons, requested_profile=choice.requested,
        accel=accel, accel_reason=why,
        qemu=str(caps.qemu.value), kernel=kernel, initrd=initrd.path, initrd_sha256=initrd.sha256,
        cmdline=kernel_cmdline(profile, req.append, req.channel), extra_args=tuple(req.qemu_args),
        boot_timeout=req.boot_timeout, append=req.append, initrd_modules=initrd.modules, channel=req.channel,
        diagnostics=diagnostics,
    )
    if initrd.missing_modules:
        names = profile.name if profile.name == req.profile else f"{req.profile}/{profile.name}"
        if kernel.modules_dir is None:
            print(f"note: kernel {kernel.release} has no module tree: {', '.join(initrd.missing_modules)} "
                  f"(profile {names}) must be built in", file=sys.stderr)
        else:
            print(f"warning: kernel {kernel.release} has no module(s) {', '.join(initrd.missing_modules)} "
                  f"named by profile {names}", file=sys.stderr)
    return plan, caps


def dry_run_report(plan: LaunchPlan) -> dict[str, Any]:
    return {
        "requested": plan.requested,
        "effective": plan.profile.name,
        "reasons": list(plan.reasons),
        "accel": plan.accel,
        "accel_reason": plan.accel_reason,
        "cmdline": plan.cmdline,
        "argv": plan.argv(SOCK_DIR_PLACEHOLDER, "harness-main"),
        "requested_argv": plan.requested_argv(SOCK_DIR_PLACEHOLDER, "harness-main"),
        "params": dict(plan.requested_profile.params),
    }


def _firmware(plan: LaunchPlan, caps: HostCaps) -> dict[str, Any]:
    # With no -bios/-pflash in the argv QEMU loads its default SeaBIOS image.
    path = caps.firmware.get("seabios")
    if path is None or not path.value:
        return {}
    return {"seabios": {"path": path.value, "sha256": file_sha256(Path(str(path.value)))}}


def _reproduce_script(run_dir: Path) -> str:
    return (
        "#!/bin/sh\n"
        f"# Re-run {run_dir.name}: same kernel, initramfs, QEMU argv, kernel command line and tests.\n"
        f"exec {shlex.quote(sys.executable)} -m harness reproduce \"$(dirname \"$0\")\" \"$@\"\n"
    )


def sweep_stale(tmp: Path | None = None) -> None:
    """Remove socket directories of harness runs whose owner died (SIGKILL), and their QEMUs."""
    base = tmp or Path(tempfile.gettempdir())
    for d in base.glob(f"{SOCK_PREFIX}*"):
        try:
            if alive(int((d / "owner.pid").read_text())):
                continue
        except (OSError, ValueError):
            if time.time() - d.stat().st_mtime < 60:
                continue
        kill_machines(d.name)
        shutil.rmtree(d, ignore_errors=True)


def alive(pid: int) -> bool:
    """A running process. A zombie is dead: an owner killed with its parent may
    wait a while for a reaper, and kill(pid, 0) still succeeds on it."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process this user can see."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def kill_machines(prefix: str) -> list[int]:
    """SIGKILL every QEMU whose -name starts with `prefix-`. Returns the pids."""
    killed = []
    for pid, argv in processes():
        if b"-name" in argv:
            i = argv.index(b"-name")
            if i + 1 < len(argv) and argv[i + 1].startswith(prefix.encode() + b"-"):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
    return killed


def run(req: RunRequest, argv: list[str]) -> int:
    start = time.monotonic()
    if req.target is not None:
        return _run_remote(req, argv, start)
    if is_lab_host(load_profile(req.profile)):
        return run_lab_host(LabRequest(
            kernel=req.kernel, params=req.params, results=req.results, tests=req.tests,
            pytest_args=req.pytest_args, append=req.append, boot_timeout=req.boot_timeout, timeout=req.timeout,
            strict=req.strict, qemu_args=req.qemu_args), argv, req.dry_run, req.json)
    plan, caps = make_plan(req)
    if req.dry_run:
        report = dry_run_report(plan)
        if req.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"profile: {report['requested']} -> {report['effective']}")
            for reason in report["reasons"]:
                print(f"  fallback: {reason}")
            print(f"accel: {plan.accel} ({plan.accel_reason})")
            print(f"argv: {shlex.join(report['argv'])}")
            if report["requested_argv"] != report["argv"]:
                print(f"requested argv (capable host): {shlex.join(report['requested_argv'])}")
        return 0
    sweep_stale()
    # Host functions the profile assigns go to vfio-pci before the run directory exists (a group
    # holding a function not given is bad input), and come back however the run ends.
    with guard_for(plan.profile, say=lambda text: print(text, flush=True)) as guard:
        run_id = new_run_id(plan.kernel.release, plan.profile.name)
        run_dir = req.results.resolve() / run_id
        run_dir.mkdir(parents=True)
        guard.attach(run_dir)
        meta = _initial_meta(run_id, plan, caps, req, argv)
        write_meta(run_dir, meta)
        atomic_write(run_dir / "plan.json", json.dumps(plan.to_json(), indent=1) + "\n")
        atomic_write(run_dir / "reproduce.sh", _reproduce_script(run_dir), mode=0o755)
        write_records(run_dir, [])
        print(f"run {run_id}: kernel {plan.kernel.release}, profile {plan.profile.name}, "
              f"accel {plan.accel} ({plan.accel_reason}), channel {plan.channel}", flush=True)
        if plan.fell_back:
            print(f"profile {plan.requested} FELL BACK to {plan.profile.name}: {'; '.join(plan.reasons)}",
                  flush=True)
        _print_diagnostics(meta)
        return _execute(req, run_dir, meta, start)


def _print_diagnostics(meta: dict[str, Any]) -> None:
    """What the kernel can report; a kernel whose tests cannot fail is said loudly."""
    diag = meta["kernel"].get("diagnostics")
    if not diag:
        return
    for problem in diag["problems"]:
        print(f"WARNING: {problem}: no test on it can fail on a WARN or BUG it hits", flush=True)
    for note in diag["notes"]:
        print(f"note: {note}", flush=True)


def _run_remote(req: RunRequest, argv: list[str], start: float) -> int:
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
    run_dir = req.results.resolve() / run_id
    run_dir.mkdir(parents=True)
    info = {"url": target.url, "identity": str(req.identity.resolve()),
            "known_hosts": str(req.known_hosts.resolve()) if req.known_hosts else None, "release": release}
    atomic_write(run_dir / "target.json", json.dumps(info, indent=1) + "\n")
    meta: dict[str, Any] = {
        "run_id": run_id, "status": "incomplete", "harness_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": ["harness", *argv],
        "target": target.url, "kernel": {"release": release, "spec": req.kernel},
        "profile": {"requested": "remote", "effective": "remote", "reasons": [], "accel": None},
        "invocation": {"target": target.url, "pytest_args": req.pytest_args, "tests": str(req.tests)},
    }
    write_meta(run_dir, meta)
    write_records(run_dir, [])
    print(f"run {run_id}: remote target {target.url}", flush=True)
    return _execute(req, run_dir, meta, start)


def _execute(req: RunRequest, run_dir: Path, meta: dict[str, Any], start: float) -> int:
    sock_parent = Path(tempfile.mkdtemp(prefix=SOCK_PREFIX))
    (sock_parent / "owner.pid").write_text(str(os.getpid()))
    status, code, note = "error", EXIT_INFRA, ""
    tests_start = time.monotonic()
    try:
        rc = _run_pytest(req, run_dir, sock_parent)
        status, code, note = _judge(rc, read_records(run_dir), req)
    except (KeyboardInterrupt, Terminated) as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        status, code, note = "interrupted", 128 + signum, f"interrupted by signal {signum}"
    finally:
        kill_machines(sock_parent.name)
        shutil.rmtree(sock_parent, ignore_errors=True)
        if code == EXIT_BAD_INPUT:
            shutil.rmtree(run_dir, ignore_errors=True)
    if code == EXIT_BAD_INPUT:
        raise BadInput(note)
    records = read_records(run_dir)
    machines = _machines(run_dir)
    remote_config = run_dir / REMOTE_CONFIG
    if remote_config.is_file():
        meta["kernel"]["diagnostics"] = diagnose(remote_config.read_text(errors="replace"),
                                                 f"{meta.get('target')}: /proc/config.gz or /boot/config-*").to_json()
    _finish_meta(meta, run_dir, status, code, note, records, machines,
                 tests=time.monotonic() - tests_start, total=time.monotonic() - start)
    _print_summary(run_dir, meta, records, machines)
    _index(run_dir)
    return code


def _initial_meta(run_id: str, plan: LaunchPlan, caps: HostCaps, req: RunRequest,
                  argv: list[str]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "status": "incomplete",
        "harness_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["harness", *argv],
        "invocation": {
            "kernel": req.kernel, "profile": req.profile, "append": req.append,
            "pytest_args": req.pytest_args, "qemu_args": req.qemu_args, "tests": str(req.tests),
            "timeout": req.timeout, "boot_timeout": req.boot_timeout, "params": req.params,
            "strict": req.strict, "force": req.force, "channel": req.channel,
        },
        "reproduces": req.reproduces,
        "host": caps.to_json(),
        "qemu": {"path": plan.qemu, "version": caps.qemu_version.value},
        "firmware": _firmware(plan, caps),
        "kernel": {**plan.kernel.to_json(), "diagnostics": plan.diagnostics.to_json()},
        "series": list(plan.kernel.series),
        "initramfs": {"path": str(plan.initrd), "sha256": plan.initrd_sha256},
        "profile": {"requested": plan.requested, "effective": plan.profile.name,
                    "reasons": list(plan.reasons), "accel": plan.accel, "params": dict(plan.profile.params),
                    "requested_params": dict(plan.requested_profile.params),
                    "accel_reason": plan.accel_reason},
        "cmdline": plan.cmdline,
    }


def _run_pytest(req: RunRequest, run_dir: Path, sock_parent: Path) -> int:
    # Node ids under the test directory (a reproduced single test) replace the directory.
    targets = [] if any(a.startswith(str(req.tests) + os.sep) for a in req.pytest_args) else [str(req.tests)]
    cmd = [sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
           "--harness-run-dir", str(run_dir), "-q", "--tb=short", "--no-header",
           "--rootdir", str(req.tests), *targets, *req.pytest_args]
    # The child's TMPDIR is the run's private directory, removed at the end,
    # so nothing pytest or xdist create there outlives the run.
    env = dict(os.environ, HARNESS_SOCK_DIR=str(sock_parent), HARNESS_MACHINE_PREFIX=sock_parent.name,
               TMPDIR=str(sock_parent), PYTHONDONTWRITEBYTECODE="1")
    # Called from inside a pytest-xdist worker (a CI job's own tests), the
    # worker's identity must not leak into our pytest: it names the consoles.
    for var in [v for v in env if v.startswith("PYTEST_XDIST_") or v == "PYTEST_CURRENT_TEST"]:
        del env[var]
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent,
                             stdin=subprocess.DEVNULL)
    try:
        return child.wait(timeout=req.timeout)
    except subprocess.TimeoutExpired:
        _stop_group(child)
        (run_dir / "timeout.txt").write_text(f"guest tests exceeded --timeout {req.timeout:.0f} s\n")
        return -1
    except BaseException:
        _stop_group(child)
        raise


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the pytest process group (fixtures stop their VMs), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _judge(rc: int, records: list[TestRecord], req: RunRequest) -> tuple[str, int, str]:
    if rc == -1:
        return "error", EXIT_INFRA, f"internal timeout: guest tests exceeded --timeout {req.timeout:.0f} s"
    if rc == 5:
        selection = shlex.join(req.pytest_args)
        return "error", EXIT_BAD_INPUT, f"no guest tests selected in {req.tests} by {selection}"
    if rc == 4:
        return "error", EXIT_BAD_INPUT, f"pytest rejected the arguments {shlex.join(req.pytest_args)}"
    if rc == 2:
        return "interrupted", 128 + signal.SIGINT, "guest tests interrupted"
    if rc not in (0, 1):
        return "error", EXIT_INFRA, f"pytest exited with status {rc}"
    code = exit_code_for(records)
    return {0: "passed", 1: "failed", 3: "error"}[code], code, ""


def _machines(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((run_dir / "machines").glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return out


def _finish_meta(meta: dict[str, Any], run_dir: Path, status: str, code: int, note: str,
                 records: list[TestRecord], machines: list[dict[str, Any]], tests: float,
                 total: float) -> None:
    boots = [m["boot_seconds"] for m in sorted(machines, key=lambda m: m.get("worker", ""))
             if m.get("boot_seconds") is not None]
    failures = [m for m in machines if m.get("status") == "boot-failed"]
    meta.update(
        status=status, exit_code=code, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        timings={"boot": boots[0] if boots else None, "tests": round(tests, 3), "total": round(total, 3)},
        machines=machines, tests=counts(records),
    )
    first_bad = next((r for r in records if r.status in ("failed", "error")), None)
    if failures:
        meta["failure"] = {"message": failures[0].get("error"), "kind": failures[0].get("error_type"),
                           "lines": failures[0].get("lines", [])[-20:]}
    elif note:
        meta["failure"] = {"message": note}
    elif first_bad is not None:
        meta["failure"] = {"message": first_bad.message, "test": first_bad.nodeid, "kind": first_bad.status}
    write_meta(run_dir, meta)


def _index(run_dir: Path) -> None:
    # The index serves `harness compare --last N --test NAME`; a run never fails over it.
    from harness.compare import index_run, load_run

    try:
        index_run(run_dir.parent, load_run(run_dir))
    except Exception as e:  # noqa: BLE001
        print(f"warning: run not added to {run_dir.parent}/index.sqlite: {e}", file=sys.stderr)


def _print_summary(run_dir: Path, meta: dict[str, Any], records: list[TestRecord],
                   machines: list[dict[str, Any]]) -> None:
    print()
    print(summary_table(records))
    prof = meta["profile"]
    if meta.get("target"):
        print(f"remote target {meta['target']}")
    print(f"kernel {meta['kernel']['release']}  profile {prof['requested']}"
          + (f" -> {prof['effective']} (fallback)" if prof["effective"] != prof["requested"] else "")
          + f"  accel {prof['accel']}")
    for reason in prof["reasons"]:
        print(f"  {'forced despite' if prof['effective'] == prof['requested'] else 'because'}: {reason}")
    diag = meta["kernel"].get("diagnostics")
    if diag:
        print(f"kernel {Diagnostics.from_json(diag).summary()}")
        _print_diagnostics(meta)
    t = meta["timings"]
    boot = f"{t['boot']:.2f}s" if t["boot"] is not None else "-"
    print(f"boot {boot}  tests {t['tests']:.2f}s  total {t['total']:.2f}s")
    failure = meta.get("failure")
    if failure:
        print(f"{meta['status'].upper()}: {failure['message']}")
        for line in failure.get("lines", [])[-8:]:
            print(f"  | {line}")
    print(f"status {meta['status']} (exit {meta['exit_code']}); results: {run_dir}")
