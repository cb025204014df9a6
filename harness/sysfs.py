"""sysfs and debugfs helpers for guest tests.

Parsers are pure functions over the text the kernel prints; the `*_of`/`find_*`
functions fetch that text through a GuestChannel with one command each.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Annotations only: `harness run`'s own process (hoststate's wait_until) never loads pexpect.
    from harness.guest import GuestChannel

PCI = "/sys/bus/pci/devices"
SWIOTLB = "/sys/kernel/debug/swiotlb"


@dataclass(frozen=True)
class PciDevice:
    bdf: str
    vendor: str      # "0x1234"
    device: str      # "0x11e8"
    driver: str | None
    enabled: bool

    @property
    def path(self) -> str:
        return f"{PCI}/{self.bdf}"

    def resource(self, n: int, enc: bool = False) -> str:
        return f"{self.path}/resource{n}{'_enc' if enc else ''}"


def parse_pci_listing(text: str) -> list[PciDevice]:
    """Lines of `<bdf> <vendor> <device> <driver or -> <enable>` (see `pci_devices`)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5:
            bdf, vendor, device, driver, enable = parts
            out.append(PciDevice(bdf, vendor, device, None if driver == "-" else driver, enable == "1"))
    return out


def parse_resource(text: str) -> list[tuple[int, int, int]]:
    """A PCI device's `resource` file: one `start end flags` line (hex) per BAR/region."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((int(parts[0], 16), int(parts[1], 16), int(parts[2], 16)))
    return rows


def bar_sizes(text: str) -> dict[int, int]:
    """Sizes of the non-empty BARs 0-5 from a `resource` file."""
    return {i: end - start + 1 for i, (start, end, _) in enumerate(parse_resource(text)[:6]) if end > start}


# The guest-side loops below use shell builtins only (`read` from a file, `${x##*/}`,
# globs): under TCG every fork+exec in the guest costs 10-40 ms, and the old
# `$(cat ...)`/`$(basename ...)` per attribute made one listing of twenty PCI
# functions take 0.5-1.7 s (plug polls it).
def pci_devices(guest: GuestChannel) -> list[PciDevice]:
    # A bound function's driver is the directory under /sys/bus/pci/drivers/ holding a link named by its BDF.
    listing = guest.check(
        f"for d in {PCI}/*; do [ -e $d/vendor ] || continue; b=${{d##*/}}; drv=-; "
        "for l in /sys/bus/pci/drivers/*/$b; do [ -e \"$l\" ] && { drv=${l%/*}; drv=${drv##*/}; }; done; "
        "read v < $d/vendor; read dv < $d/device; read en < $d/enable; echo $b $v $dv $drv $en; done")
    return parse_pci_listing(listing)


def find_pci(guest: GuestChannel, vendor: str, device: str) -> list[PciDevice]:
    return [d for d in pci_devices(guest) if (d.vendor, d.device) == (vendor, device)]


def block_devices_of(guest: GuestChannel, bdf: str) -> list[str]:
    """Block devices (nvme0n1, vda) of a PCI function.

    With NVMe multipath the namespace head (nvme0n1) hangs off the nvme
    subsystem, not the PCI function; the function only has the hidden per-path
    node (nvme0c0n1), which maps to the head by dropping the controller part.
    """
    out = guest.run(
        f"for b in /sys/block/*; do h=; read h 2>/dev/null < $b/hidden; [ \"$h\" = 1 ] && continue; "
        f"case $(readlink -f $b) in */{bdf}/*) basename $b;; esac; done; "
        f"ls -d {PCI}/{bdf}/nvme/nvme*/nvme*c*n* 2>/dev/null").stdout
    names = set()
    for item in out.split():
        name = item.rsplit("/", 1)[-1]
        m = re.fullmatch(r"(nvme\d+)c\d+(n\d+)", name)
        names.add(m.group(1) + m.group(2) if m else name)
    return sorted(names)


def swiotlb_stats(guest: GuestChannel) -> dict[str, int]:
    """debugfs swiotlb counters that this kernel has (io_tlb_nslabs, io_tlb_used, ..._hiwater)."""
    out = guest.run(f"cd {SWIOTLB} 2>/dev/null && for f in *; do v=; read v 2>/dev/null < $f; echo $f $v; done").stdout
    stats = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            stats[name] = int(value)
    return stats


def slots(guest: GuestChannel) -> dict[str, dict[str, str]]:
    """/sys/bus/pci/slots/<name>/{address,power,...}: hotplug slot state."""
    out = guest.run("cd /sys/bus/pci/slots 2>/dev/null && for s in *; do for f in address power adapter "
                    "attention latch; do [ -r $s/$f ] || continue; v=; read v 2>/dev/null < $s/$f; echo $s $f $v; "
                    "done; done").stdout
    table: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3:
            table.setdefault(parts[0], {})[parts[1]] = parts[2]
    return table


def wait_until(probe: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `probe` until it is true or the deadline passes. Returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def path_exists(guest: GuestChannel, path: str) -> bool:
    return guest.run(f"test -e {shlex.quote(path)}").ok
