"""The lab-host twin's plan: L1's launch plan and the harness command it runs inside.

L1 (qemu_cmdlines/lab-host.yaml) has devices named `lab-<name>` to assign; the
`assign` parameter picks them, and the inner `harness run --profile vfio`
gets their BDFs in L1 as `host_bdf`. This module resolves both kernels, L1's
initramfs and argv, and the inner command; harness/labhost.py runs them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import BadInput, InfraError
from harness.initramfs import GUESTFS, build_initramfs
from harness.kernel import Kernel, resolve_kernel
from harness.paths import REPO, atomic_write, cache_dir, default_kernel
from harness.plan import SOCK_DIR_PLACEHOLDER, LaunchPlan, choose_accel, kernel_cmdline, plan_profile
from harness.probe import Fact, HostCaps, probe_host
from harness.profiles import Profile

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
    from harness.plan import dry_run_report as inner_report
    from harness.runner import RunRequest, make_plan

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
