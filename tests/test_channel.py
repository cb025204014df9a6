"""The command channel's port: a virtio-serial port where the kernel and profile allow it,
the 16550 (ttyS1) elsewhere, and both carrying the same agent protocol in real guests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.channel import channel_modules, choose_channel
from harness.diagnostics import Diagnostics, diagnose
from harness.errors import BadInput
from harness.kernel import Kernel
from harness.plan import build_argv, kernel_cmdline
from harness.profiles import apply_params, load_profile
from tests.conftest import Cli, check_golden, meta

GOLDEN = Path(__file__).parent / "golden" / "emulated-virtio-channel-tcg.argv.json"
BUILT_IN = diagnose("CONFIG_PRINTK=y\nCONFIG_BUG=y\nCONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_CONSOLE=y\n", "config")
MODULE = diagnose("CONFIG_PRINTK=y\nCONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_CONSOLE=m\n", "config")
WITHOUT = diagnose("CONFIG_PRINTK=y\n# CONFIG_VIRTIO_CONSOLE is not set\n", "config")


def _kernel(modules: Path | None = None) -> Kernel:
    return Kernel("bzImage", Path("/k/bzImage"), "6.12.1", "", modules_dir=modules)


def test_auto_takes_the_virtio_port_only_where_kernel_and_profile_allow_it(tmp_path: Path) -> None:
    emulated = apply_params(load_profile("emulated"), {})
    assert choose_channel("auto", emulated, _kernel(), BUILT_IN) == (
        "virtio", "kernel 6.12.1 has the virtio console driver (built in)")
    assert choose_channel("auto", emulated, _kernel(tmp_path), MODULE)[0] == "virtio"
    assert channel_modules("virtio", MODULE) == ("virtio_pci", "virtio_console")
    assert channel_modules("virtio", BUILT_IN) == () and channel_modules("serial", MODULE) == ()
    # What keeps the 16550, each with its reason.
    assert choose_channel("auto", emulated, _kernel(), MODULE) == (
        "serial", "kernel 6.12.1: virtio console is a module and the kernel has no module tree")
    assert choose_channel("auto", emulated, _kernel(), WITHOUT) == (
        "serial", "kernel 6.12.1: virtio console driver not in its configuration")
    assert choose_channel("auto", emulated, _kernel(), Diagnostics(None)) == (
        "serial", "kernel 6.12.1: virtio console driver its configuration is unknown")
    snp = apply_params(load_profile("snp"), {})
    assert choose_channel("auto", snp, _kernel(), BUILT_IN) == ("serial", "profile snp is confidential (snp)")
    twin = apply_params(load_profile("coco-emulated"), {})
    assert choose_channel("auto", twin, _kernel(), BUILT_IN) == ("serial", "profile coco-emulated forces swiotlb")
    # What the user asks for is taken, except a driver the kernel's config says it lacks.
    assert choose_channel("serial", emulated, _kernel(), BUILT_IN) == ("serial", "asked for")
    assert choose_channel("virtio", emulated, _kernel(), Diagnostics(None)) == ("virtio", "asked for")
    with pytest.raises(BadInput, match="--channel virtio: kernel 6.12.1 has no virtio console driver"):
        choose_channel("virtio", emulated, _kernel(), WITHOUT)


def test_virtio_channel_argv_and_cmdline_match_golden() -> None:
    """The channel's chardev gets a virtio-serial port instead of ttyS1, after the profile's devices
    (which keep their slots); the guest's /init reads harness.channel=virtio."""
    profile = apply_params(load_profile("emulated"), {})
    cmdline = kernel_cmdline(profile, "quiet", "virtio")
    assert cmdline.split() == ["console=ttyS0,115200", "panic=-1", "printk.time=1", "harness.channel=virtio",
                               "quiet"]
    argv = build_argv("qemu-system-x86_64", profile, "tcg", Path("/k/bzImage"), Path("/k/initrd.cpio"),
                      cmdline, "/sock", "harness-main", channel="virtio")
    check_golden(argv, GOLDEN)
    serial = build_argv("qemu-system-x86_64", profile, "tcg", Path("/k/bzImage"), Path("/k/initrd.cpio"),
                        cmdline, "/sock", "harness-main")
    # The same VM otherwise: ttyS1's `-serial chardev:channel` out, the port's two devices in.
    i = serial.index("chardev:channel")
    j = argv.index("virtio-serial-pci,id=hchan0,max_ports=2")
    assert serial[:i - 1] + serial[i + 1:] == argv[:j - 1] + argv[j + 3:]


@pytest.mark.parametrize("channel", ["auto", "serial"])
def test_both_ports_run_the_guest_tests_on_a_real_kernel(cli: Cli, channel: str) -> None:
    """The Debian cloud kernel has virtio_console as a module: auto loads it and runs the agent on
    the virtio port; `--channel serial` keeps ttyS1. Same tests, same verdict, the port on record."""
    proc = cli("run", "--channel", channel, "--results", str(cli.results),
               "-k", "test_reached_userspace or test_boot_log_is_clean or test_kernel_cmdline_is_the_planned_one")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = cli.only_run()
    plan = json.loads((run / "plan.json").read_text())
    expected = "virtio" if channel == "auto" else "serial"
    assert plan["channel"] == expected, plan["channel_reason"]
    assert f"harness.channel={'virtio' if expected == 'virtio' else 'ttyS1'}" in plan["cmdline"].split()
    loaded = [Path(m).name for m in plan["initrd_modules"]]
    assert ("virtio_console.ko" in loaded) == (expected == "virtio"), loaded
    argv = json.loads((run / "qemu-argv.json").read_text())
    assert ("chardev:channel" in argv) == (expected == "serial")
    assert any(a.startswith("virtserialport,") for a in argv) == (expected == "virtio")
    assert meta(run)["status"] == "passed"
    assert f"channel {expected}" in proc.stdout
