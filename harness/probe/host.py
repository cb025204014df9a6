"""The host kernel's side: SEV/SEV-ES/SNP and TDX module parameters (with the
firmware/module lines from dmesg), the C-bit position, IOMMUs and vfio-pci.

File reads go through `root` so tests can feed recorded /sys, /proc and /dev trees.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from harness import process
from harness.errors import InfraError
from harness.probe.facts import Fact, read_attr

_DMESG_FACTS = (
    ("sev_api", re.compile(r"SEV API:\s*(\d+\.\d+)")),
    ("snp_api", re.compile(r"SEV-SNP API:\s*(\d+\.\d+)")),
    # `virt/tdx: module initialized` until Linux 6.15; newer kernels print
    # `virt/tdx: TDX-Module initialized` (Documentation/arch/x86/tdx.rst).
    ("tdx_module", re.compile(r"(?:virt/tdx|tdx): (?:TDX )?(?:module|TDX-Module) initialized")),
)


def read_cbitpos(root: Path) -> Fact:
    """C-bit position from CPUID 0x8000001F EBX[5:0], through /dev/cpu/0/cpuid."""
    dev = root / "dev/cpu/0/cpuid"
    try:
        fd = os.open(dev, os.O_RDONLY)
    except OSError as e:
        return Fact(None, f"not readable: /dev/cpu/0/cpuid: {e.strerror} (modprobe cpuid)")
    try:
        data = os.pread(fd, 16, 0x8000001F)
    except OSError as e:
        return Fact(None, f"CPUID 0x8000001F not readable: {e.strerror}")
    finally:
        os.close(fd)
    if len(data) < 16:
        return Fact(None, "CPUID 0x8000001F: short read")
    eax, ebx = struct.unpack("<II", data[:8])
    if not eax & 0x2:
        return Fact(None, f"CPUID 0x8000001F EAX={eax:#x}: the CPU reports no SEV")
    return Fact(ebx & 0x3F, f"CPUID 0x8000001F EBX={ebx:#x} bits 5:0")


def host_dmesg(root: Path) -> str | None:
    """The host's kernel log: `dmesg` here, or a recorded `dmesg` file in a fixture root."""
    if root != Path("/"):
        try:
            return (root / "dmesg").read_text()
        except OSError:
            return None
    try:
        proc = process.run(["dmesg"], timeout=10)
    except InfraError:
        return None
    return proc.out if proc.ok else None


def dmesg_evidence(log: str | None) -> dict[str, str] | None:
    """The dmesg lines the probe cites, by name in _DMESG_FACTS (the first match, its last 80
    characters); None if the log could not be read."""
    if log is None:
        return None
    found: dict[str, str] = {}
    for name, pattern in _DMESG_FACTS:
        line = next((x for x in log.splitlines() if pattern.search(x)), None)
        if line is not None:
            found[name] = line.strip()[-80:]
    return found


def with_dmesg(fact: Fact, found: dict[str, str] | None, key: str) -> Fact:
    """`fact` with the dmesg line that backs it (`key` in `dmesg_evidence`) added to its evidence."""
    if found is None:
        return Fact(fact.value, fact.evidence + "; dmesg not readable")
    if key in found:
        return Fact(fact.value, f"{fact.evidence}; dmesg: {found[key]}")
    return fact


def module_flag(root: Path, module: str, param: str) -> Fact:
    """A boolean module parameter (`Y`/`1`) from /sys/module/<module>/parameters/."""
    rel = f"sys/module/{module}/parameters/{param}"
    value = read_attr(root / rel)
    if value is None:
        return Fact(False, f"no /{rel}")
    return Fact(value in ("Y", "1"), f"/{rel} = {value}")


def sev_fact(root: Path) -> Fact:
    """kvm_amd's `sev` parameter; SEV also needs /dev/sev (the firmware device)."""
    sev = module_flag(root, "kvm_amd", "sev")
    if sev.value and not (root / "dev/sev").exists():
        sev = Fact(False, sev.evidence + ", but /dev/sev is missing")
    return sev


def iommu_fact(root: Path) -> Fact:
    groups = root / "sys/kernel/iommu_groups"
    n_groups = len(list(groups.iterdir())) if groups.is_dir() else 0
    iommus = root / "sys/class/iommu"
    n_iommu = len(list(iommus.iterdir())) if iommus.is_dir() else 0
    return Fact(n_iommu > 0, f"{n_iommu} in /sys/class/iommu, {n_groups} IOMMU groups")


def vfio_pci_fact(root: Path) -> Fact:
    vfio = (root / "sys/bus/pci/drivers/vfio-pci").is_dir()
    return Fact(vfio, "/sys/bus/pci/drivers/vfio-pci " + ("present" if vfio else "absent"))
