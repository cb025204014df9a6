"""LaunchPlan: profile + host capabilities + kernel + initramfs -> exact argv."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.channel import CHANNEL_PARAM, VIRTIO_PORT, virtio_channel_allowed
from harness.diagnostics import Diagnostics
from harness.errors import BadInput, InfraError
from harness.kernel import Kernel
from harness.profiles import Profile, apply_params, load_profile

if TYPE_CHECKING:
    from harness.probe import HostCaps

# Placeholder used where a per-VM private directory goes, for dry runs.
SOCK_DIR_PLACEHOLDER = "<sockdir>"


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one VM, before any process exists."""

    requested: str
    profile: Profile
    reasons: tuple[str, ...]
    requested_profile: Profile
    accel: str
    accel_reason: str
    qemu: str
    kernel: Kernel
    initrd: Path
    initrd_sha256: str
    cmdline: str
    extra_args: tuple[str, ...] = ()
    boot_timeout: float | None = None
    append: str = ""
    initrd_modules: tuple[str, ...] = ()
    channel: str = "serial"           # serial (ttyS1), virtio (a virtio-serial port) or ssh
    channel_reason: str = ""
    # What the kernel can report (WARN/BUG, KALLSYMS, sanitizers), from its config.
    diagnostics: Diagnostics = Diagnostics(None)

    @property
    def boot_deadline(self) -> float:
        return self.boot_timeout if self.boot_timeout is not None else self.profile.timeouts.boot

    @property
    def fell_back(self) -> bool:
        return self.profile.name != self.requested

    def argv(self, sock_dir: str | Path, name: str, ssh_port: int | None = None) -> list[str]:
        return build_argv(self.qemu, self.profile, self.accel, self.kernel.image, self.initrd,
                          self.cmdline, str(sock_dir), name, self.extra_args, ssh_port, self.channel)

    def requested_argv(self, sock_dir: str | Path, name: str) -> list[str]:
        """The argv the requested profile uses on a host that has what it needs."""
        prof = self.requested_profile
        # A confidential profile keeps the agent on the 16550 (virtio_channel_allowed).
        channel = "serial" if self.channel == "virtio" and virtio_channel_allowed(prof) else self.channel
        return build_argv(self.qemu, prof, "kvm", self.kernel.image, self.initrd,
                          kernel_cmdline(prof, self.append, channel), str(sock_dir), name, self.extra_args,
                          0 if channel == "ssh" else None, channel)

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
            "append": self.append,
            "initrd_modules": list(self.initrd_modules),
            "channel": self.channel,
            "channel_reason": self.channel_reason,
            "diagnostics": self.diagnostics.to_json(),
            "profile": self.profile.to_json(),
            "requested_profile": self.requested_profile.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchPlan:
        return cls(
            requested=data["requested"], profile=Profile.from_json(data["profile"]),
            requested_profile=Profile.from_json(data["requested_profile"]), reasons=tuple(data["reasons"]),
            accel=data["accel"], accel_reason=data["accel_reason"], qemu=data["qemu"],
            kernel=Kernel.from_json(data["kernel"]), initrd=Path(data["initrd"]),
            initrd_sha256=data["initrd_sha256"], cmdline=data["cmdline"],
            extra_args=tuple(data["extra_args"]), boot_timeout=data.get("boot_timeout"),
            append=data.get("append", ""), initrd_modules=tuple(data.get("initrd_modules", ())),
            channel=data.get("channel", "serial"), channel_reason=data.get("channel_reason", ""),
            diagnostics=Diagnostics.from_json(data.get("diagnostics") or {}),
        )


@dataclass(frozen=True)
class ProfileChoice:
    """Which profile runs here, and why."""

    requested: Profile
    effective: Profile
    reasons: tuple[str, ...]
    verdict: str  # "runs" | "falls back" | "cannot run"


def _resolve_firmware(profile: Profile, caps: HostCaps) -> tuple[Profile, str | None]:
    """Replace a firmware name by its path; returns the problem when there is none."""
    if profile.firmware is None:
        return profile, None
    path, why = caps.firmware_path(profile.firmware)
    if path is None:
        return replace(profile, firmware=f"<firmware:{profile.firmware}>"), why
    return replace(profile, firmware=path), None


def prepare(name: str, params: dict[str, str], caps: HostCaps, strict_params: bool = True) -> tuple[Profile, list[str]]:
    """Load a profile, fill its parameters, resolve firmware; returns it and its unmet needs.

    A parameter set to something the probed QEMU cannot do (an object property
    it lacks, IGVM without igvm-cfg) is BadInput naming the parameter and the
    QEMU version: the user asked for it, so falling back would hide that.
    """
    raw = load_profile(name)
    if raw.param("tio_flag") == "auto" and "tio_flag" not in params:
        params = {**params, "tio_flag": f"{caps.vfio_tio.value or 'x-tio'}=on"}
    profile = apply_params(raw, params, strict=strict_params)
    if strict_params:
        check_qemu_params(profile, caps)
    profile, firmware_problem = _resolve_firmware(profile, caps)
    unmet = []
    for need in profile.needs:
        if need == "firmware":
            if firmware_problem:
                unmet.append(firmware_problem)
            continue
        ok, evidence = caps.check(need)
        if not ok:
            unmet.append(evidence)
    if profile.param("vfio_backend") == "iommufd" and profile.hotplug:
        for need in ("qemu:iommufd", "qemu:vfio-iommufd"):
            ok, evidence = caps.check(need)
            if not ok:
                unmet.append(f"{evidence} (or --param vfio_backend=container)")
    return profile, unmet


def check_qemu_params(profile: Profile, caps: HostCaps) -> None:
    """BadInput for a set parameter that the probed QEMU cannot put on its command line."""
    values = dict(profile.params)
    if profile.coco_object:
        qom_type = profile.coco_object[0][1]
        for param, prop in profile.object_params:
            if values.get(param):
                ok, why = caps.qemu_has_property(qom_type, prop)
                if not ok:
                    raise BadInput(f"profile {profile.name}: parameter '{param}' needs {qom_type} property "
                                   f"'{prop}': {why}")
    if values.get("igvm"):
        ok, why = caps.check("qemu:igvm-cfg")
        if not ok:
            raise BadInput(f"profile {profile.name}: parameter 'igvm' needs the igvm-cfg object (QEMU 10.1+, "
                           f"built with IGVM): {why}")


def choose_profile(name: str, params: dict[str, str], caps: HostCaps) -> ProfileChoice:
    """The requested profile if the host has what it needs, else its emulated twin."""
    requested, unmet = prepare(name, params, caps)
    if not unmet:
        if requested.param("host_bdf") == "" and requested.hotplug:
            raise BadInput(f"profile {name}: needs --param host_bdf=<domain:bus:dev.fn of a vfio-pci function>")
        return ProfileChoice(requested, requested, (), "runs")
    if requested.twin is None:
        return ProfileChoice(requested, requested, tuple(unmet), "cannot run")
    # A twin that cannot run either hands over to its own twin: tio -> vfio (a host with an
    # IOMMU and vfio-pci but no SNP) -> tio-emulated (neither).
    reasons, seen = list(unmet), {name}
    name_next: str | None = requested.twin
    twin = requested
    while name_next is not None and name_next not in seen:
        seen.add(name_next)
        twin, twin_unmet = prepare(name_next, params, caps, strict_params=False)
        if not twin_unmet:
            return ProfileChoice(requested, twin, tuple(reasons), "falls back")
        reasons += [f"twin {twin.name}: {r}" for r in twin_unmet if r not in reasons]
        name_next = twin.twin
    return ProfileChoice(requested, twin, tuple(reasons), "cannot run")


def plan_profile(name: str, params: dict[str, str], caps: HostCaps, strict: bool, force: bool) -> ProfileChoice:
    """choose_profile() with the user's policy. Raises InfraError (exit 3) with one line."""
    choice = choose_profile(name, params, caps)
    if choice.verdict == "runs":
        return choice
    missing = "; ".join(choice.reasons)
    if force:
        return ProfileChoice(choice.requested, choice.requested, choice.reasons, "forced")
    if strict:
        raise InfraError(f"profile {name} cannot run on this host (--strict): {missing}")
    if choice.verdict == "cannot run":
        raise InfraError(f"profile {name} cannot run on this host and has no runnable twin: {missing}")
    twin = choice.effective
    if twin.param("host_bdf") == "" and any(d.startswith("vfio-pci,") for d in twin.hotplug):
        raise BadInput(f"profile {name} falls back to {twin.name}, which needs --param host_bdf=<domain:bus:dev.fn>")
    return choice


def choose_accel(profile: Profile, caps: HostCaps) -> tuple[str, str]:
    if profile.accel == "tcg":
        return "tcg", "profile asks for tcg"
    if caps.kvm_usable:
        return "kvm", f"kvm {caps.kvm.evidence}"
    if profile.accel == "kvm":
        return "kvm", f"profile asks for kvm although kvm is {caps.kvm.evidence}"
    return "tcg", f"kvm {caps.kvm.evidence}"


def kernel_cmdline(profile: Profile, append: str = "", channel: str = "serial") -> str:
    """The profile's words, the channel's, then `append` as the user wrote it.

    `append` is kernel command-line syntax, not shell: the kernel keeps double
    quotes (`b="x y"` is one parameter whose value has a space), so it is passed
    on verbatim; an unclosed quote would swallow every parameter after it and
    is BadInput."""
    if append.count('"') % 2:
        raise BadInput(f"--append {append!r}: unclosed double quote (the kernel would take the rest of the "
                       "command line as its value)")
    words = list(profile.cmdline)
    if channel == "virtio":
        # The agent's port: the profile's `harness.channel=ttyS1` names the 16550 it replaces.
        words = [w for w in words if not w.startswith(f"{CHANNEL_PARAM}=")] + [f"{CHANNEL_PARAM}=virtio"]
    ssh = ["harness.ssh=1"] if channel == "ssh" else []
    return " ".join([*words, *ssh, *([append.strip()] if append.strip() else [])])


def build_argv(
    qemu: str, profile: Profile, accel: str, kernel: Path, initrd: Path, cmdline: str,
    sock_dir: str, name: str, extra_args: tuple[str, ...] = (), ssh_port: int | None = None,
    channel: str = "serial",
) -> list[str]:
    """The exact QEMU argv. Pure: same inputs, same list.

    The serial console, the command channel and QMP are unix sockets that the
    harness listens on before QEMU starts; QEMU connects as a client during
    start-up, before the guest runs a single instruction, so not one byte of
    console output can be lost to a connect race. The command channel's front
    end is the second 16550 (ttyS1), or with `channel` "virtio" a named port of a
    virtio-serial device of its own, after the profile's devices (so they keep
    their slots).
    """
    cpu = profile.cpu_kvm if accel == "kvm" else profile.cpu_tcg
    firmware = ["-bios", profile.firmware] if profile.firmware else []
    argv = [
        qemu, "-name", f"{name},debug-threads=on",
        "-machine", f"{profile.machine},accel={accel}",
        "-cpu", cpu, "-smp", str(profile.smp), "-m", f"{profile.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", *firmware,
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-chardev", f"socket,id=console,path={sock_dir}/console.sock",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=channel,path={sock_dir}/channel.sock",
        *([] if channel == "virtio" else ["-serial", "chardev:channel"]),
        "-chardev", f"socket,id=qmp,path={sock_dir}/qmp.sock",
        "-mon", "chardev=qmp,mode=control",
    ]
    for disk in profile.scratch_disks:
        # Sparse files in the VM's private directory, gone with it.
        node = disk.split(":", 1)[0]
        argv += ["-blockdev", f"driver=file,node-name={node},filename={sock_dir}/{node}.img,cache.direct=off"]
    for port in range(profile.hotplug_ports):
        argv += ["-device", f"pcie-root-port,id=hp{port},chassis={port + 1},slot={port + 1}"]
    for device in profile.devices:
        argv += ["-device", device]
    if channel == "virtio":
        argv += ["-device", "virtio-serial-pci,id=hchan0,max_ports=2",
                 "-device", f"virtserialport,bus=hchan0.0,nr=1,chardev=channel,name={VIRTIO_PORT}"]
    if ssh_port is not None:
        # SSH channel: user networking, the guest's port 22 on a loopback port of ours.
        nic = "virtio-net-pci,netdev=hnet0,id=hnic0"
        if profile.coco != "none" or "swiotlb=force" in cmdline.split():
            nic += ",disable-legacy=on,iommu_platform=on"
        argv += ["-netdev", f"user,id=hnet0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22", "-device", nic]
    argv += [*profile.object_argv(), *profile.args, *extra_args]
    return argv


def dry_run_report(plan: LaunchPlan) -> dict[str, Any]:
    return {
        "requested": plan.requested,
        "effective": plan.profile.name,
        "reasons": list(plan.reasons),
        "accel": plan.accel,
        "accel_reason": plan.accel_reason,
        "cmdline": plan.cmdline,
        "channel": plan.channel,
        "channel_reason": plan.channel_reason,
        "argv": plan.argv(SOCK_DIR_PLACEHOLDER, "harness-main"),
        "requested_argv": plan.requested_argv(SOCK_DIR_PLACEHOLDER, "harness-main"),
        # Devices the tests hot-plug over QMP after boot (`device_add` specs): never on
        # the command line, since a TIO device cold-plugged with SNP fails.
        "hotplug": list(plan.profile.hotplug),
        "requested_hotplug": list(plan.requested_profile.hotplug),
        "params": dict(plan.requested_profile.params),
    }


def print_dry_run(plan: LaunchPlan, as_json: bool) -> None:
    report = dry_run_report(plan)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"profile: {report['requested']} -> {report['effective']}")
    for reason in report["reasons"]:
        print(f"  fallback: {reason}")
    print(f"accel: {plan.accel} ({plan.accel_reason})")
    print(f"channel: {plan.channel} ({plan.channel_reason})")
    print(f"argv: {shlex.join(report['argv'])}")
    if report["requested_argv"] != report["argv"]:
        print(f"requested argv (capable host): {shlex.join(report['requested_argv'])}")
