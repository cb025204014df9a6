"""The command channel's transport: which port the guest's agent talks on.

The agent (harness/guestfs/harness-agent.c) runs on the second 16550 (ttyS1) or
on a virtio-serial port of its own. Under TCG the 16550 moves about 250 KB/s,
16 bytes an interrupt: the guest's kernel log (tens of KB, read at every test's
window) took 60-110 ms of each run; the virtio port moves it in a few. The
16550 stays where virtio would be in the way: confidential guests and guests
with swiotlb=force, whose DMA the tests count, and kernels without the driver.
`--channel serial` keeps it for a kernel whose virtio is the thing under test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.errors import BadInput

if TYPE_CHECKING:
    from harness.diagnostics import Diagnostics
    from harness.kernel import Kernel
    from harness.profiles import Profile

# The kernel parameter that tells the guest's /init where the agent runs (ttyS1, or virtio:
# the virtio-serial port named VIRTIO_PORT, which the agent finds in /sys/class/virtio-ports).
CHANNEL_PARAM = "harness.channel"
VIRTIO_PORT = "org.coco-harness.channel"


def virtio_channel_allowed(profile: Profile) -> str | None:
    """None if the profile lets the command channel be a virtio-serial port, else why not.

    A confidential guest's virtio devices bounce their DMA through swiotlb, as do all of a
    guest booted with swiotlb=force: the channel's traffic would land in the counters and
    the bounce pool that the DMA tests judge. Those guests keep the agent on the 16550,
    which is port I/O."""
    if profile.coco != "none":
        return f"profile {profile.name} is confidential ({profile.coco})"
    if "swiotlb=force" in profile.cmdline:
        return f"profile {profile.name} forces swiotlb"
    return None


def choose_channel(requested: str, profile: Profile, kernel: Kernel, diagnostics: Diagnostics) -> tuple[str, str]:
    """The channel a run uses, and why: `auto` is the virtio-serial port where the profile
    allows it and the kernel has the driver (built in, or a module of its tree), else the
    serial port (ttyS1). `serial`, `virtio` and `ssh` are taken as they are."""
    if requested == "virtio" and diagnostics.known and diagnostics.option("CONFIG_VIRTIO_CONSOLE") is None:
        raise BadInput(f"--channel virtio: kernel {kernel.release} has no virtio console driver "
                       f"(CONFIG_VIRTIO_CONSOLE is off in {diagnostics.source})")
    if requested != "auto":
        return requested, "asked for"
    not_allowed = virtio_channel_allowed(profile)
    if not_allowed:
        return "serial", not_allowed
    console = diagnostics.option("CONFIG_VIRTIO_CONSOLE")
    if console is None:
        why = "not in its configuration" if diagnostics.known else "its configuration is unknown"
        return "serial", f"kernel {kernel.release}: virtio console driver {why}"
    if console == "m" and kernel.modules_dir is None:
        return "serial", f"kernel {kernel.release}: virtio console is a module and the kernel has no module tree"
    how = "built in" if console == "y" else "a module"
    return "virtio", f"kernel {kernel.release} has the virtio console driver ({how})"


def channel_modules(channel: str, diagnostics: Diagnostics) -> tuple[str, ...]:
    """Modules the initramfs loads for the channel: the virtio console's, where they are modules."""
    if channel != "virtio":
        return ()
    return tuple(name for name, option in (("virtio_pci", "CONFIG_VIRTIO_PCI"),
                                           ("virtio_console", "CONFIG_VIRTIO_CONSOLE"))
                 if diagnostics.option(option) == "m")
