"""The lab-host twin: device assignment for real, one level down.

`harness run --profile lab-host [--kernel K] [pytest args]` boots an L1 under
TCG with an emulated IOMMU, devices to assign and KVM inside (qemu_cmdlines/
lab-host.yaml), shares this machine's / into it read-only over 9p with a
tmpfs overlay for writes (guestfs/lab-host-setup) and the outer run's
`inner/` directory writable, and runs, chrooted in L1,

    harness run --profile vfio --kernel K --param host_bdf=<L1's edu,nvme> [pytest args]

The inner run is the real host-side workflow: its probe sees L1's IOMMU,
groups and vfio-pci and runs its KVM probe guest; the host-state guard binds
and restores; L2 boots under KVM without the devices; QMP hot-plugs them;
pcimem and dmastress run on them. Its exit code is the outer run's. The
outer run directory holds:

    meta.json, junit.xml (the inner run's tests), console.log (L1's console),
    dmesg.txt (L1's kernel log: vfio, DMAR), lab-host.json (both plans, each
    step's time, the assigned functions before and after), inner/<run-id>/
    (the inner run directory) and inner/harness-run.log (its output).

What the outer run prepares on this machine first, so that L1 (software
emulated, slow) does not redo it: the L1 and L2 kernels (built and cached),
the guest tools and L2's initramfs (cached; the inner run finds them in the
shared cache).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from harness import __version__
from harness.errors import HarnessError, InfraError, KernelFault, Terminated
from harness.initramfs import build_initramfs
from harness.labplan import (
    INNER_MARGIN,
    PROFILE,
    ROOT,
    RUN_LOG,
    SETUP,
    LabRequest,
    dry_run_report,
    inner_env,
    make_lab_plan,
    with_share,
    write_meta,
)
from harness.paths import REPO, atomic_write
from harness.plan import LaunchPlan
from harness.profiles import load_profile
from harness.rundir import new_run_id
from harness.tools import build_tools

if TYPE_CHECKING:
    # `harness run` imports this module: the machine (QMP, asyncio, the console) is loaded only
    # when a lab-host run starts one.
    from harness.guest import CommandResult, GuestChannel


class LabHost:
    """Owns the L1 machine: boot, set-up, commands in its chroot, dmesg, shutdown.

    A context manager; shutdown always runs (QMP quit, then the process group).
    """

    def __init__(self, plan: LaunchPlan, run_dir: Path, share: Path, sock_parent: Path,
                 name: str = "harness-l1", echo: bool = False) -> None:
        self.plan = plan
        self.share = share
        from harness.machine import Machine

        self.machine = Machine(plan, run_dir, name=name, sock_parent=sock_parent)
        self.echo = echo
        self.times: dict[str, float] = {}

    def __enter__(self) -> LabHost:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def agent(self) -> GuestChannel:
        assert self.machine.guest is not None
        return self.machine.guest

    def boot(self) -> None:
        """Boot L1 and make its chroot. Raises InfraError: L1 is the test bench, not the kernel
        under test, so its failures are the infrastructure's."""
        start = time.monotonic()
        try:
            self.machine.launch()
            self.machine.wait_boot()
        except KernelFault as e:
            raise InfraError(f"lab-host L1 did not boot: {e}") from None
        self.times["l1_boot"] = time.monotonic() - start
        start = time.monotonic()
        out = self.agent.run(f"{SETUP} {shlex.quote(str(self.share))}", timeout=self.plan.profile.timeouts.command)
        if not out.ok or "lab-host ready" not in out.stdout:
            raise InfraError(f"lab-host L1 set-up failed (exit {out.exit_code}): "
                             + " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:]))
        self.times["l1_setup"] = time.monotonic() - start

    def sh(self, command: str, timeout: float | None = None, env: dict[str, str] | None = None) -> CommandResult:
        """A shell command in L1's chroot (this machine's /, with L1's kernel, sysfs and devices)."""
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or inner_env()).items())
        wrapped = f"chroot {ROOT} /usr/bin/env -i {envs} /bin/sh -c {shlex.quote(command)}"
        return self.agent.run(wrapped, timeout=timeout)

    def harness(self, args: list[str], timeout: float, log: Path | None = None) -> CommandResult:
        """`python -m harness ARGS` in L1 from the repository, output to `log` (under the share) when given."""
        command = f"cd {shlex.quote(str(REPO))} && exec {shlex.join([sys.executable, '-m', 'harness', *args])}"
        if log is not None:
            command = f"({command}) >> {shlex.quote(str(log))} 2>&1"
        return self.sh(command, timeout=timeout)

    def functions(self, bdfs: list[str]) -> dict[str, dict[str, str | None]]:
        """Driver and driver_override of L1's functions, read in L1."""
        script = "; ".join(
            f"d=/sys/bus/pci/devices/{b}; drv=-; [ -e $d/driver ] && drv=$(basename $(readlink $d/driver)); "
            f"echo {b} $drv $(cat $d/driver_override)" for b in bdfs)
        out = self.agent.run(script, timeout=30).stdout
        table: dict[str, dict[str, str | None]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                table[parts[0]] = {"driver": None if parts[1] == "-" else parts[1],
                                   "driver_override": None if parts[2] == "(null)" else parts[2]}
        return table

    def dmesg(self) -> str:
        return self.agent.kernel_log(timeout=30).stdout

    def close(self) -> None:
        self.machine.shutdown()


class _Tail:
    """Print the inner run's log as it grows (its progress lines), until stopped."""

    def __init__(self, path: Path, prefix: str = "  L1| ") -> None:
        self.path = path
        self.prefix = prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-host-tail", daemon=True)

    def __enter__(self) -> _Tail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        offset = 0
        pending = b""
        while True:
            stopping = self._stop.wait(0.5)
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                data = b""
            offset += len(data)
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                print(self.prefix + line.decode(errors="replace"), flush=True)
            if stopping:
                if pending:
                    print(self.prefix + pending.decode(errors="replace"), flush=True)
                return


def _inner_run_dir(share: Path) -> Path | None:
    runs = sorted(p for p in share.iterdir() if (p / "meta.json").is_file()) if share.is_dir() else []
    return runs[-1] if runs else None


def run(req: LabRequest, argv: list[str], dry_run: bool = False, as_json: bool = False) -> int:
    """`harness run --profile lab-host`: returns the inner run's exit code (or 3, 128+N)."""
    from harness.process import SOCK_PREFIX, kill_machines, sweep_stale

    start = time.monotonic()
    load_profile(PROFILE)
    if dry_run:
        plan, caps = make_lab_plan(req, Path("<results>/<run-id>/inner"))
        report = dry_run_report(req, plan, caps)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            print(f"profile: {PROFILE} (L1 under {report['accel']}: {report['accel_reason']})")
            print(f"L1 argv: {shlex.join(report['argv'])}")
            print(f"inside L1: {shlex.join(report['inner']['command'])}")
            print(f"  L2 profile {report['inner']['effective']}, accel {report['inner']['accel']}")
            print(f"  L2 argv: {shlex.join(report['inner']['argv'])}")
        return 0
    sweep_stale()
    # Everything that can be bad input is decided before the run directory exists.
    plan, caps = make_lab_plan(req, Path("inner"))
    run_id = new_run_id(plan.l2_kernel.release, PROFILE)
    run_dir = req.results.resolve() / run_id
    share = run_dir / "inner"
    plan = with_share(plan, req, share)
    # The inner run finds these in the shared cache instead of building them under emulation.
    build_initramfs(plan.l2_kernel, load_profile(plan.l1.profile.param("inner_profile") or "vfio").modules,
                    extra_files=build_tools())
    share.mkdir(parents=True)
    meta: dict[str, Any] = {
        "run_id": run_id, "status": "incomplete", "harness_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": ["harness", *argv],
        "host": caps.to_json(), "qemu": {"path": plan.l1.qemu, "version": caps.qemu_version.value},
        "kernel": plan.l2_kernel.to_json(), "l1_kernel": plan.l1.kernel.to_json(),
        "profile": {"requested": PROFILE, "effective": PROFILE, "reasons": list(plan.l1.reasons),
                    "accel": plan.l1.accel, "accel_reason": plan.l1.accel_reason,
                    "params": dict(plan.l1.profile.params)},
        "cmdline": plan.l1.cmdline, "inner": {"command": plan.inner_argv, "assign": plan.bdfs},
    }
    write_meta(run_dir, meta)
    atomic_write(run_dir / "reproduce.sh", "#!/bin/sh\n# Re-run this lab-host run's command.\n"
                 f"exec {shlex.join([sys.executable, '-m', 'harness', *argv])}\n", mode=0o755)
    print(f"run {run_id}: lab-host L1 {plan.l1.kernel.release} ({plan.l1.accel}), inner "
          f"{plan.l1.profile.param('inner_profile')} with {plan.l2_kernel.release} on {', '.join(plan.bdfs)}",
          flush=True)
    sock_parent = Path(tempfile.mkdtemp(prefix=SOCK_PREFIX))
    (sock_parent / "owner.pid").write_text(str(os.getpid()))
    record: dict[str, Any] = {"l1_plan": plan.l1.to_json(), "inner_command": plan.inner_argv, "assign": plan.bdfs}
    status, code, note = "error", 3, ""
    try:
        with LabHost(plan.l1, run_dir, share, sock_parent, name=f"{sock_parent.name}-l1") as lab:
            lab.boot()
            print(f"lab-host: L1 up in {lab.times['l1_boot']:.1f} s, chroot ready in {lab.times['l1_setup']:.1f} s",
                  flush=True)
            record["before"] = lab.functions(plan.bdfs)
            t0 = time.monotonic()
            with _Tail(share / RUN_LOG):
                result = lab.harness(plan.inner_argv[3:], timeout=req.timeout + INNER_MARGIN, log=share / RUN_LOG)
            lab.times["inner"] = time.monotonic() - t0
            record["after"] = lab.functions(plan.bdfs)
            (run_dir / "dmesg.txt").write_text(lab.dmesg())
            code = result.exit_code
            record["times"] = {k: round(v, 3) for k, v in lab.times.items()}
            status, note = _judge(code, share)
    except (KeyboardInterrupt, Terminated) as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        status, code, note = "interrupted", 128 + signum, f"interrupted by signal {signum}"
    except HarnessError as e:
        status, code, note = "error", 3, str(e)
    finally:
        kill_machines(sock_parent.name)
        shutil.rmtree(sock_parent, ignore_errors=True)
    atomic_write(run_dir / "lab-host.json", json.dumps(record, indent=1) + "\n")
    _finish(run_dir, share, meta, status, code, note, record, time.monotonic() - start)
    return code


def _judge(code: int, share: Path) -> tuple[str, str]:
    inner = _inner_run_dir(share)
    if inner is None:
        return ("error" if code else "passed"), f"the inner run left no run directory (exit {code})"
    data = json.loads((inner / "meta.json").read_text())
    failure = data.get("failure") or {}
    return str(data.get("status", "error")), str(failure.get("message", ""))


def _finish(run_dir: Path, share: Path, meta: dict[str, Any], status: str, code: int, note: str,
            record: dict[str, Any], total: float) -> None:
    inner = _inner_run_dir(share)
    inner_meta: dict[str, Any] = json.loads((inner / "meta.json").read_text()) if inner else {}
    if inner is not None and (inner / "junit.xml").is_file():
        shutil.copy2(inner / "junit.xml", run_dir / "junit.xml")
    times = record.get("times", {})
    meta.update(status=status, exit_code=code, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                timings={"l1_boot": times.get("l1_boot"), "l1_setup": times.get("l1_setup"),
                         "inner": times.get("inner"), "total": round(total, 3)},
                tests=inner_meta.get("tests"))
    meta["inner"].update(run_dir=str(inner.relative_to(run_dir)) if inner else None, exit_code=code,
                         accel=(inner_meta.get("profile") or {}).get("accel"))
    if note:
        meta["failure"] = {"message": note}
    write_meta(run_dir, meta)
    print(f"lab-host: inner run {meta['inner']['run_dir'] or '(none)'} exited {code}; "
          f"L2 accel {meta['inner']['accel'] or '-'}")
    if note and status != "passed":
        print(f"{status.upper()}: {note}")
    print(f"status {status} (exit {code}); results: {run_dir}")
