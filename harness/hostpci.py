"""A host's PCI functions as sysfs shows them, and the writes that move one to vfio-pci and back.

Everything goes through a `Sysfs` (the real one reads and writes under a root
directory), so the same code runs on this host, on recorded trees with a model of
the kernel's bind rules (tests/data/hoststate/), and inside the lab-host twin.

The sequence, per function (what the lab-host prototype learnt): unbind it
from its current driver first (an NVMe still bound to nvme makes QEMU's
device_add fail with "vfio-dev: couldn't open directory"), then
`driver_override` = vfio-pci, then `drivers_probe`. Restore: wait until no
process holds its vfio nodes (unbinding a function that is still open blocks
in the kernel until it is released), unbind from vfio-pci, write back the old
override (a newline clears it), bind the old driver.

An IOMMU group is refused (BadInput, exit 2) when it holds a function the user
did not name: vfio hands userspace the whole group, so taking one function
silently takes its neighbours from their drivers too. PCI bridges in a group are
left alone, as vfio itself does (pcieport manages its own DMA).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.errors import BadInput, InfraError
from harness.sysfs import wait_until

VFIO_DRIVER = "vfio-pci"
_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
PCI_DEVICES = "sys/bus/pci/devices"
PCI_DRIVERS = "sys/bus/pci/drivers"
_BRIDGE_CLASS = 0x0604


def normalise_bdf(text: str) -> str:
    """`00:03.0` or `0000:00:03.0` -> `0000:00:03.0`. Raises BadInput."""
    m = _BDF.match(text.strip())
    if not m:
        raise BadInput(f"PCI address {text!r}: expected [domain:]bus:device.function, e.g. 0000:00:03.0")
    domain, bus, dev, fn = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


def parse_bdfs(text: str) -> list[str]:
    """A comma-separated list of PCI addresses (the `host_bdf` parameter), normalised, in order."""
    out: list[str] = []
    for item in text.split(","):
        if item.strip():
            bdf = normalise_bdf(item)
            if bdf not in out:
                out.append(bdf)
    return out


def parse_module_params(text: str) -> list[tuple[str, str, str]]:
    """`vfio_iommu_type1.allow_unsafe_interrupts=1,...` -> [(module, parameter, value)]. Raises BadInput."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        module, dot, param = name.partition(".")
        if not sep or not dot or not module or not param or "/" in name:
            raise BadInput(f"module parameter {item!r}: expected module.parameter=value")
        out.append((module.replace("-", "_"), param, value))
    return out


class Sysfs(Protocol):
    """The part of sysfs (and /proc) the guard touches; paths are relative to the root."""

    root: Path

    def read(self, rel: str) -> str | None: ...
    def write(self, rel: str, value: str) -> None: ...
    def link_name(self, rel: str) -> str | None: ...
    def listdir(self, rel: str) -> list[str]: ...
    def exists(self, rel: str) -> bool: ...
    def holders(self, nodes: list[str]) -> list[int]: ...


class RealSysfs:
    """sysfs under `root` (`/` on a host). Writes are plain writes; the kernel answers
    a refused bind or unbind with an errno, which is raised as OSError."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def read(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text().strip()
        except OSError:
            return None

    def write(self, rel: str, value: str) -> None:
        # One write() call: sysfs attributes take the whole value at once.
        fd = os.open(self.root / rel, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def link_name(self, rel: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self.root / rel))
        except OSError:
            return None

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.root / rel))
        except OSError:
            return []

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.root / rel)

    def holders(self, nodes: list[str]) -> list[int]:
        """PIDs with one of the device nodes (`dev/vfio/12`) open, from /proc/*/fd."""
        wanted = {str(self.root / n) for n in nodes} | {"/" + n for n in nodes}
        found = []
        proc = self.root / "proc"
        for entry in (os.listdir(proc) if proc.is_dir() else []):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                fds = os.listdir(proc / entry / "fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(proc / entry / "fd" / fd) in wanted:
                        found.append(int(entry))
                        break
                except OSError:
                    continue
        return found


@dataclass(frozen=True)
class FunctionState:
    """One PCI function as the host has it: what a run must give back."""

    bdf: str
    vendor: str
    device: str
    pci_class: str
    driver: str | None
    driver_override: str | None
    iommu_group: str | None
    group_members: tuple[str, ...]

    @property
    def is_bridge(self) -> bool:
        try:
            return int(self.pci_class, 16) >> 8 == _BRIDGE_CLASS
        except ValueError:
            return False

    def describe(self) -> str:
        return (f"{self.bdf} [{self.vendor[2:]}:{self.device[2:]}] driver {self.driver or 'none'}, "
                f"driver_override {self.driver_override or 'none'}, IOMMU group {self.iommu_group or 'none'}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FunctionState:
        return cls(**{**data, "group_members": tuple(data["group_members"])})


def inspect(sysfs: Sysfs, bdf: str) -> FunctionState:
    """Read one function's driver, override and IOMMU group. Raises BadInput if there is none."""
    dev = f"{PCI_DEVICES}/{bdf}"
    if not sysfs.exists(dev):
        raise BadInput(f"PCI function {bdf}: not on this host (no /{dev})")
    override = sysfs.read(f"{dev}/driver_override")
    group = sysfs.link_name(f"{dev}/iommu_group")
    members = tuple(sysfs.listdir(f"sys/kernel/iommu_groups/{group}/devices")) if group else ()
    return FunctionState(
        bdf=bdf, vendor=sysfs.read(f"{dev}/vendor") or "?", device=sysfs.read(f"{dev}/device") or "?",
        pci_class=sysfs.read(f"{dev}/class") or "?", driver=sysfs.link_name(f"{dev}/driver"),
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=group, group_members=members)


def vfio_nodes(sysfs: Sysfs, state: FunctionState) -> list[str]:
    """The device nodes through which userspace holds a vfio-bound function."""
    nodes = [f"dev/vfio/{state.iommu_group}"] if state.iommu_group else []
    nodes += [f"dev/vfio/devices/{n}" for n in sysfs.listdir(f"{PCI_DEVICES}/{state.bdf}/vfio-dev")]
    return nodes


def check_groups(sysfs: Sysfs, states: list[FunctionState]) -> None:
    """Refuse a function without an IOMMU group, or whose group holds a function not asked for."""
    taken = {s.bdf for s in states}
    for s in states:
        if s.iommu_group is None:
            raise BadInput(f"PCI function {s.bdf}: in no IOMMU group (is the IOMMU on? intel_iommu=on / "
                           "amd_iommu=on): vfio-pci cannot assign it")
        others = [m for m in s.group_members if m not in taken]
        extra = [m for m in others if not inspect(sysfs, m).is_bridge]
        if extra:
            raise BadInput(f"PCI function {s.bdf}: IOMMU group {s.iommu_group} also holds "
                           f"{', '.join(extra)}, which was not given to take (vfio assigns whole groups; "
                           f"add them to host_bdf to take them too)")


def _wait(probe: Callable[[], bool], deadline: float, interval: float = 0.05) -> bool:
    """wait_until() against an absolute deadline shared by several steps."""
    return wait_until(probe, max(0.0, deadline - time.monotonic()), interval)


def bind_vfio(sysfs: Sysfs, state: FunctionState, deadline: float) -> None:
    """Hand one function to vfio-pci. Raises InfraError naming the step that failed."""
    dev = f"{PCI_DEVICES}/{state.bdf}"
    if not sysfs.exists(f"{PCI_DRIVERS}/{VFIO_DRIVER}"):
        raise InfraError(f"no {VFIO_DRIVER} driver on this host (/{PCI_DRIVERS}/{VFIO_DRIVER}): "
                         "modprobe vfio-pci, or a kernel with CONFIG_VFIO_PCI")
    current = sysfs.link_name(f"{dev}/driver")
    step = ""
    try:
        if current not in (None, VFIO_DRIVER):
            step = f"unbind from {current}"
            sysfs.write(f"{dev}/driver/unbind", state.bdf)
        step = "driver_override"
        sysfs.write(f"{dev}/driver_override", VFIO_DRIVER)
        if current != VFIO_DRIVER:
            step = "drivers_probe"
            sysfs.write("sys/bus/pci/drivers_probe", state.bdf)
    except OSError as e:
        raise InfraError(f"PCI function {state.bdf}: {step} failed: {e.strerror}") from None
    if not _wait(lambda: sysfs.link_name(f"{dev}/driver") == VFIO_DRIVER, deadline):
        raise InfraError(f"PCI function {state.bdf}: not bound to {VFIO_DRIVER} after drivers_probe "
                         f"(driver now {sysfs.link_name(f'{dev}/driver') or 'none'})")
    group = f"dev/vfio/{state.iommu_group}"
    if not _wait(lambda: sysfs.exists(group) or bool(sysfs.listdir(f"{dev}/vfio-dev")), deadline):
        raise InfraError(f"PCI function {state.bdf}: bound to {VFIO_DRIVER}, but neither /{group} "
                         "nor a vfio device cdev appeared")


def restore_function(sysfs: Sysfs, before: FunctionState, deadline: float) -> str | None:
    """Put one function back as `before` recorded it. Returns a problem, or None."""
    dev = f"{PCI_DEVICES}/{before.bdf}"
    if not sysfs.exists(dev):
        return f"{before.bdf}: gone from the host (removed or hot-unplugged), nothing to restore"
    now = inspect(sysfs, before.bdf)
    if now.driver == VFIO_DRIVER:
        nodes = vfio_nodes(sysfs, now)
        if not _wait(lambda: not sysfs.holders(nodes), deadline, 0.2):
            pids = sysfs.holders(nodes)
            return (f"{before.bdf}: still held by pid(s) {', '.join(map(str, pids))} through "
                    f"{', '.join('/' + n for n in nodes)}; not unbinding a device in use")
    try:
        if now.driver is not None and now.driver != before.driver:
            sysfs.write(f"{dev}/driver/unbind", before.bdf)
        if now.driver_override != before.driver_override:
            sysfs.write(f"{dev}/driver_override", before.driver_override or "\n")
        if before.driver is not None and sysfs.link_name(f"{dev}/driver") != before.driver:
            if sysfs.exists(f"{PCI_DRIVERS}/{before.driver}/bind"):
                sysfs.write(f"{PCI_DRIVERS}/{before.driver}/bind", before.bdf)
            else:
                sysfs.write("sys/bus/pci/drivers_probe", before.bdf)
    except OSError as e:
        return f"{before.bdf}: restoring driver {before.driver or 'none'} failed: {e.strerror}"
    if not _wait(lambda: sysfs.link_name(f"{dev}/driver") == before.driver, deadline):
        return (f"{before.bdf}: driver is {sysfs.link_name(f'{dev}/driver') or 'none'} after restore, "
                f"was {before.driver or 'none'}")
    override = inspect(sysfs, before.bdf).driver_override
    if override != before.driver_override:
        return f"{before.bdf}: driver_override is {override or 'empty'}, was {before.driver_override or 'empty'}"
    return None
