"""Check a profile's command line against the installed QEMU's own parser.

The requested argv (as on a capable host, accel=kvm) is started with `-S`, so
no guest instruction runs, and QEMU's verdict is classified:

  accepted        QEMU built the machine (with TCG where KVM is unusable)
  needs-hardware  QEMU parsed everything and stopped at missing KVM/SEV/TDX
  unknown-object  this QEMU was built without the object or device
  rejected        QEMU refused the command line itself: a bug in the profile
  hang            QEMU neither started nor failed within the deadline
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from harness.errors import QemuStartError
from harness.kernel import Kernel
from harness.machine import Machine
from harness.plan import LaunchPlan, kernel_cmdline
from harness.probe import HostCaps, pvh_probe_image
from harness.profiles import Profile

_NEEDS_HARDWARE = re.compile(
    r"KVM required|not supported by KVM|failed to initialize kvm|Could not access KVM|"
    r"/dev/sev|SEV: |sev_snp|vm-type \S+ not supported|No such file or directory.*kvm|TDX|"
    r"requires KVM|target/i386/kvm/|kernel doesn't allow setting HyperV|"
    r"accelerator does not support confidential guest", re.I)
_UNKNOWN_OBJECT = re.compile(r"does not accept value '([\w-]+)'|'([\w-]+)' is not a valid device model name")


@dataclass(frozen=True)
class ArgvVerdict:
    profile: str
    verdict: str
    message: str


def classify_qemu_error(output: str) -> tuple[str, str]:
    lines = [x for x in output.strip().splitlines()
             if "warning: host doesn't support requested feature" not in x]
    message = lines[-1] if lines else ""
    if _UNKNOWN_OBJECT.search(output):
        return "unknown-object", message
    if _NEEDS_HARDWARE.search(output):
        return "needs-hardware", message
    return "rejected", message


def check_profile_argv(profile: Profile, caps: HostCaps, workdir: Path | None = None) -> ArgvVerdict:
    """Start QEMU with the profile's requested argv and `-S`; classify what it says."""
    # The capable host's CPU flags are part of what is checked; under TCG the
    # `host` model (KVM only) becomes `max` with the same flags.
    model, _, flags = profile.cpu_kvm.partition(",")
    cpu = ("max" if model == "host" and not caps.kvm_usable else model) + (f",{flags}" if flags else "")
    profile = replace(profile, cpu_tcg=cpu, cpu_kvm=cpu)
    with tempfile.TemporaryDirectory(prefix="harness-check-") as tmp:
        base = Path(tmp)
        # A stand-in kernel: confidential-guest set-up fails before any kernel is read.
        image = base / "kernel.elf"
        image.write_bytes(pvh_probe_image())
        initrd = base / "initrd.cpio"
        initrd.write_bytes(b"")
        kernel = Kernel(spec="check", image=image, release="check", sha256="")
        plan = LaunchPlan(
            requested=profile.name, profile=profile, reasons=(), requested_profile=profile,
            # Under TCG where KVM is unusable: KVM would fail before QEMU reaches the
            # confidential-guest objects, and say nothing about the command line.
            accel="kvm" if caps.kvm_usable else "tcg", accel_reason="argv check",
            qemu=str(caps.qemu.value),
            kernel=kernel, initrd=initrd, initrd_sha256="", cmdline=kernel_cmdline(profile),
            extra_args=("-S",), boot_timeout=5,
        )
        if profile.firmware and profile.firmware.startswith("<firmware:"):
            # A capable host has the firmware; here any readable image lets QEMU go on.
            fallback = caps.firmware.get("ovmf")
            plan = replace(plan, profile=replace(profile, firmware=str(fallback.value) if fallback and
                                                 fallback.value else None))
        try:
            with Machine(plan, workdir or base / "logs", name="harness-check", sock_parent=base / "s"):
                return ArgvVerdict(profile.name, "accepted", "QEMU built the machine")
        except QemuStartError as e:
            if not e.output.strip() and "did not connect" in str(e):
                return ArgvVerdict(profile.name, "hang", str(e))
            verdict, message = classify_qemu_error(e.output)
            return ArgvVerdict(profile.name, verdict, message or str(e))
