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
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from harness import __version__
from harness.errors import BadInput, HarnessError, InfraError, KernelFault, Terminated
from harness.initramfs import GUESTFS, build_initramfs
from harness.kernel import Kernel, resolve_kernel
from harness.paths import REPO, atomic_write, cache_dir, default_kernel
from harness.plan import SOCK_DIR_PLACEHOLDER, LaunchPlan, choose_accel, kernel_cmdline, plan_profile
from harness.probe import Fact, HostCaps, probe_host
from harness.profiles import Profile, load_profile
from harness.rundir import new_run_id
from harness.tools import build_tools

if TYPE_CHECKING:
    # `harness run` imports this module for is_lab_host: the machine (QMP, asyncio, the console)
    # is loaded only when a lab-host run starts one.
    from harness.guest import CommandResult, GuestChannel

PROFILE = "lab-host"
ROOT = "/lab/root"
SETUP = "/bin/lab-host-setup"
RESULTS_TAG = "results"
RUN_LOG = "harness-run.log"
_ADDR = re.compile(r"addr=(0x[0-9a-fA-F]+)(?:\.([0-7]))?")
# What the inner run needs beyond its own deadline: probe, plan, L2 boot, shutdown, in an emulated L1.
INNER_MARGIN = 600.0
L2_BOOT_TIMEOUT = 300.0


def is_lab_host(profile: Profile) -> bool:
    """The lab-host profile, or one that extends it."""
    return any(Path(s).name == f"{PROFILE}.yaml" for s in profile.source)


def assignable(profile: Profile) -> dict[str, str]:
    """L1's assignable devices: `edu,id=lab-edu,addr=0x10` -> {"edu": "0000:00:10.0"}."""
    found = {}
    for dev in profile.devices:
        props = dict(p.partition("=")[::2] for p in dev.split(",")[1:])
        name = props.get("id", "")
        m = _ADDR.search(dev)
        if name.startswith("lab-") and m:
            found[name[4:]] = f"0000:00:{int(m.group(1), 16):02x}.{m.group(2) or 0}"
    return found


def chosen_bdfs(profile: Profile) -> list[str]:
    """The BDFs (in L1) of the devices named by the `assign` parameter. Raises BadInput."""
    table = assignable(profile)
    names = [n.strip() for n in (profile.param("assign") or "").split(",") if n.strip()]
    if not names:
        raise BadInput(f"profile {profile.name}: parameter assign names no device; L1 has {', '.join(table)}")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise BadInput(f"profile {profile.name}: assign={','.join(names)}: no L1 device {unknown[0]!r}; "
                       f"L1 has {', '.join(table)}")
    return [table[n] for n in names]


def _kernel_arg(kernel: Kernel) -> str:
    """How the inner run names the same kernel: the artifact directory or the image path."""
    if (kernel.image.parent / "harness-build.json").is_file():
        return str(kernel.image.parent)
    return str(kernel.image)


@dataclass(frozen=True)
class LabRequest:
    """What the outer `harness run --profile lab-host` was asked."""

    kernel: str | None
    params: dict[str, str]
    results: Path
    tests: Path
    pytest_args: list[str] = field(default_factory=list)
    append: str = ""
    boot_timeout: float | None = None
    timeout: float = 1800.0
    strict: bool = False
    qemu_args: list[str] = field(default_factory=list)


def inner_command(profile: Profile, kernel: Kernel, req: LabRequest, results: str) -> list[str]:
    """The argv of the harness run inside L1 (paths are the same there: / is shared)."""
    inner = profile.param("inner_profile") or "vfio"
    argv = [sys.executable, "-m", "harness", "run", "--profile", inner, "--kernel", _kernel_arg(kernel),
            "--param", f"host_bdf={','.join(chosen_bdfs(profile))}",
            "--param", f"vfio_backend={profile.param('vfio_backend') or 'iommufd'}",
            "--results", results, "--tests", str(req.tests.resolve()), "--timeout", f"{req.timeout:g}"]
    if req.append:
        argv += ["--append", req.append]
    # L2's exits are handled by L1's KVM, which itself runs under TCG: a Debian kernel took 26-70 s
    # to reach userspace here, past the profiles' 60 s made for hosts with real KVM.
    argv += ["--boot-timeout", f"{req.boot_timeout if req.boot_timeout is not None else L2_BOOT_TIMEOUT:g}"]
    if req.strict:
        argv.append("--strict")
    return [*argv, *req.pytest_args]


def inner_env() -> dict[str, str]:
    """The inner run's environment: a clean one, with the same cache (read through the overlay)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "TMPDIR": "/tmp", "HARNESS_CACHE": str(cache_dir()), "PYTHONDONTWRITEBYTECODE": "1",
           # QEMU starts in L1 under TCG: its start-up alone took 1.3-1.5 s of the probe's default 2 s here.
           "HARNESS_KVM_PROBE_DEADLINE": "10"}
    if os.environ.get("HARNESS_QEMU"):
        env["HARNESS_QEMU"] = os.environ["HARNESS_QEMU"]
    return env


def twin_caps(caps: HostCaps) -> HostCaps:
    """What the inner probe is expected to find in L1, for the dry run's inner plan (the real
    run probes inside L1 and records what it found)."""
    expected = "expected in the lab-host L1; the real run probes there"
    return replace(caps, kvm=Fact(True, f"usable ({expected}: TCG's -cpu max offers SVM, kvm_amd in L1)"),
                   iommu=Fact(True, f"intel-iommu ({expected})"), vfio_pci=Fact(True, f"vfio-pci ({expected})"),
                   sev=Fact(False, "no SEV in L1"), sev_es=Fact(False, "no SEV-ES in L1"),
                   sev_snp=Fact(False, "no SEV-SNP in L1"), tdx=Fact(False, "no TDX in L1"))


@dataclass(frozen=True)
class LabPlan:
    """Both levels: L1's launch plan and the inner run's command."""

    l1: LaunchPlan
    l2_kernel: Kernel
    inner_argv: list[str]
    bdfs: list[str]

    def l1_argv(self, sock_dir: str | Path, name: str) -> list[str]:
        return self.l1.argv(sock_dir, name)


def make_lab_plan(req: LabRequest, share: Path, caps: HostCaps | None = None) -> tuple[LabPlan, HostCaps]:
    """Resolve the L1 and L2 kernels (building them if needed), L1's initramfs and argv.

    Raises BadInput (unknown parameter or device, missing kernel) or InfraError.
    """
    caps = caps or probe_host()
    if not caps.qemu.value:
        raise InfraError("QEMU not found: install qemu-system-x86 (or set HARNESS_QEMU)")
    if not req.tests.is_dir():
        raise BadInput(f"guest tests {req.tests}: no such directory")
    choice = plan_profile(PROFILE, req.params, caps, req.strict, force=False)
    profile = choice.effective
    bdfs = chosen_bdfs(profile)
    l2_kernel = resolve_kernel(req.kernel or default_kernel())
    spec = profile.param("l1_kernel") or "kernels/lab-host.yaml"
    path = Path(spec)
    l1_kernel = resolve_kernel(str(REPO / path) if not path.is_absolute() and (REPO / path).exists() else spec)
    l1_initrd = build_initramfs(l1_kernel, (), extra_files=((SETUP, GUESTFS / "lab-host-setup"),))
    accel, why = choose_accel(profile, caps)
    l1 = LaunchPlan(
        requested=PROFILE, profile=profile, reasons=choice.reasons, requested_profile=choice.requested,
        accel=accel, accel_reason=why, qemu=str(caps.qemu.value), kernel=l1_kernel, initrd=l1_initrd.path,
        initrd_sha256=l1_initrd.sha256, cmdline=kernel_cmdline(profile),
    )
    return with_share(LabPlan(l1, l2_kernel, [], bdfs), req, share), caps


def with_share(plan: LabPlan, req: LabRequest, share: Path) -> LabPlan:
    """The plan with `share` (the outer run's inner/ directory) as L1's writable results share."""
    share_arg = f"local,path={share},mount_tag={RESULTS_TAG},security_model=none"
    l1 = replace(plan.l1, extra_args=("-virtfs", share_arg, *req.qemu_args))
    return replace(plan, l1=l1, inner_argv=inner_command(l1.profile, plan.l2_kernel, req, str(share)))


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """The outer (L1) run's meta.json: the lab-host's own record, the inner run's is under inner/."""
    atomic_write(run_dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def dry_run_report(req: LabRequest, plan: LabPlan, caps: HostCaps) -> dict[str, Any]:
    """Both plans: L1's argv here, and the inner run's plan as L1 is expected to make it."""
    from harness.runner import RunRequest, make_plan
    from harness.runner import dry_run_report as inner_report

    inner_profile = plan.l1.profile.param("inner_profile") or "vfio"
    params = {"host_bdf": ",".join(plan.bdfs), "vfio_backend": plan.l1.profile.param("vfio_backend") or "iommufd"}
    inner_req = RunRequest(kernel=_kernel_arg(plan.l2_kernel), profile=inner_profile, append=req.append,
                           tests=req.tests, pytest_args=req.pytest_args, boot_timeout=req.boot_timeout,
                           params=params, dry_run=True)
    inner_plan, _ = make_plan(inner_req, lambda: twin_caps(caps))
    l1 = plan.l1
    return {
        "requested": PROFILE, "effective": l1.profile.name, "reasons": list(l1.reasons),
        "accel": l1.accel, "accel_reason": l1.accel_reason, "cmdline": l1.cmdline,
        "argv": l1.argv(SOCK_DIR_PLACEHOLDER, "harness-l1"),
        # L1 runs under TCG by design (its -cpu max is what offers SVM): the same argv everywhere.
        "requested_argv": l1.argv(SOCK_DIR_PLACEHOLDER, "harness-l1"),
        "params": dict(l1.profile.params),
        "l1_kernel": l1.kernel.to_json(),
        "inner": {"command": plan.inner_argv, "assign": plan.bdfs, **inner_report(inner_plan)},
    }


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
        return self.agent.run("dmesg", timeout=30).stdout

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
