"""LaunchPlan: profile + host capabilities + kernel + initramfs -> exact argv."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.kernel import Kernel
from harness.probe import HostCaps
from harness.profiles import Profile, load_profile

# Placeholder used where a per-VM private directory goes, for dry runs.
SOCK_DIR_PLACEHOLDER = "<sockdir>"


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one VM, before any process exists."""

    requested: str
    profile: Profile
    reasons: tuple[str, ...]
    accel: str
    accel_reason: str
    qemu: str
    kernel: Kernel
    initrd: Path
    initrd_sha256: str
    cmdline: str
    extra_args: tuple[str, ...] = ()
    boot_timeout: float | None = None

    @property
    def boot_deadline(self) -> float:
        return self.boot_timeout if self.boot_timeout is not None else self.profile.timeouts.boot

    def argv(self, sock_dir: str | Path, name: str) -> list[str]:
        return build_argv(self.qemu, self.profile, self.accel, self.kernel.image, self.initrd,
                          self.cmdline, str(sock_dir), name, self.extra_args)

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "effective": self.profile.name,
            "reasons": list(self.reasons),
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "qemu": self.qemu,
            "kernel": self.kernel.to_json(),
            "initrd": str(self.initrd),
            "initrd_sha256": self.initrd_sha256,
            "cmdline": self.cmdline,
            "extra_args": list(self.extra_args),
            "boot_timeout": self.boot_timeout,
            "profile": self.profile.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchPlan:
        profile = load_profile(data["effective"])
        return cls(
            requested=data["requested"], profile=profile, reasons=tuple(data["reasons"]),
            accel=data["accel"], accel_reason=data["accel_reason"], qemu=data["qemu"],
            kernel=Kernel.from_json(data["kernel"]), initrd=Path(data["initrd"]),
            initrd_sha256=data["initrd_sha256"], cmdline=data["cmdline"],
            extra_args=tuple(data["extra_args"]), boot_timeout=data.get("boot_timeout"),
        )


def choose_accel(profile: Profile, caps: HostCaps) -> tuple[str, str]:
    if profile.accel == "tcg":
        return "tcg", "profile asks for tcg"
    if caps.kvm_usable:
        return "kvm", f"kvm {caps.kvm.evidence}"
    if profile.accel == "kvm":
        return "kvm", f"profile asks for kvm although kvm is {caps.kvm.evidence}"
    return "tcg", f"kvm {caps.kvm.evidence}"


def kernel_cmdline(profile: Profile, append: str = "") -> str:
    return " ".join([*profile.cmdline, *shlex.split(append)])


def build_argv(
    qemu: str, profile: Profile, accel: str, kernel: Path, initrd: Path, cmdline: str,
    sock_dir: str, name: str, extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The exact QEMU argv. Pure: same inputs, same list.

    The serial console, the command channel and QMP are unix sockets that the
    harness listens on before QEMU starts; QEMU connects as a client during
    start-up, before the guest runs a single instruction, so not one byte of
    console output can be lost to a connect race.
    """
    cpu = profile.cpu_kvm if accel == "kvm" else profile.cpu_tcg
    argv = [
        qemu, "-name", f"{name},debug-threads=on",
        "-machine", f"{profile.machine},accel={accel}",
        "-cpu", cpu, "-smp", str(profile.smp), "-m", f"{profile.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-chardev", f"socket,id=console,path={sock_dir}/console.sock",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=channel,path={sock_dir}/channel.sock",
        "-serial", "chardev:channel",
        "-chardev", f"socket,id=qmp,path={sock_dir}/qmp.sock",
        "-mon", "chardev=qmp,mode=control",
    ]
    for port in range(profile.hotplug_ports):
        argv += ["-device", f"pcie-root-port,id=hp{port},chassis={port + 1},slot={port + 1}"]
    for device in profile.devices:
        argv += ["-device", device]
    argv += [*profile.args, *extra_args]
    return argv
