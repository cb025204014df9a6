"""The first guest suite: the kernel booted, is the one asked for, and is healthy."""

from __future__ import annotations

import re

import pytest

from harness.dmesg import Allow, describe, errors, scan
from harness.guest import GuestChannel
from harness.pytest_plugin import RunInfo


def test_reached_userspace(guest: GuestChannel) -> None:
    result = guest.run("echo hello; echo oops >&2; test -d /proc/1")
    assert result.exit_code == 0
    assert result.stdout == "hello\n"
    assert result.stderr == "oops\n"


def test_booted_release_matches_kernel(guest: GuestChannel, run_info: RunInfo) -> None:
    if run_info.kernel_release is None:
        pytest.skip("remote target: no --kernel named the release to expect")
    assert guest.check("uname -r").strip() == run_info.kernel_release


def test_kernel_cmdline_is_the_planned_one(guest: GuestChannel, run_info: RunInfo) -> None:
    plan = run_info.require_plan("kernel command line")
    assert guest.read_text("/proc/cmdline").strip() == plan.cmdline


def test_boot_log_is_clean(dmesg_lines: list[str], dmesg_allowlist: tuple[Allow, ...]) -> None:
    """The whole boot, judged by the rule engine (allowlist applied)."""
    bad = errors(scan(dmesg_lines, allow=dmesg_allowlist))
    assert not bad, f"boot dmesg: {describe(bad)}"


def test_proc_is_sane(guest: GuestChannel, run_info: RunInfo) -> None:
    meminfo = guest.read_text("/proc/meminfo")
    total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))  # type: ignore[union-attr]
    cpus = guest.read_text("/proc/cpuinfo").count("processor\t:")
    assert total_kib > 0 and cpus > 0
    assert "proc /proc proc" in guest.read_text("/proc/mounts")
    plan = run_info.require_plan("memory and CPUs against the profile")
    asked_kib = plan.profile.memory_mib * 1024
    # The kernel keeps some memory for itself; anything under half is wrong.
    assert asked_kib // 2 < total_kib <= asked_kib
    assert cpus == plan.profile.smp
    assert guest.check("cat /proc/1/comm").strip() in ("init", "sh")
    assert "/sys/kernel/debug" in guest.read_text("/proc/mounts")


def test_sys_is_sane(guest: GuestChannel, run_info: RunInfo) -> None:
    assert guest.run("test -d /sys/bus/pci/devices && test -d /sys/class/tty").ok
    plan = run_info.require_plan("devices against the profile")
    assert guest.run("test -e /sys/class/tty/ttyS0 && test -e /sys/class/tty/ttyS1").ok
    online = guest.read_text("/sys/devices/system/cpu/online").strip()
    expected = "0" if plan.profile.smp == 1 else f"0-{plan.profile.smp - 1}"
    assert online == expected
    # pcie-root-port is 1b36:000c; the profile's free hotplug slots must all be there.
    ports = guest.check(
        "for d in /sys/bus/pci/devices/*; do read v < $d/vendor; read dv < $d/device; echo $v:$dv; done"
    ).split()
    assert ports.count("0x1b36:0x000c") == plan.profile.hotplug_ports


def test_initramfs_modules_are_loaded(guest: GuestChannel, run_info: RunInfo) -> None:
    plan = run_info.require_plan("initramfs modules")
    names = [path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for path in plan.initrd_modules]
    if not names:
        pytest.skip(f"the initramfs loads no modules for kernel {plan.kernel.release} (built in or absent)")
    loaded = {line.split()[0] for line in guest.read_text("/proc/modules").splitlines()}
    missing = [n for n in names if n not in loaded]
    assert not missing, f"modules the initramfs loads are not loaded: {missing}"
