"""Host capabilities, each with the evidence it was decided on.

`probe_host()` fills one `HostCaps` record from the parts, one module each:

    kvm       KVM usable, decided by running a 16 KiB probe guest (not by /dev/kvm)
    host      the host kernel: SEV/SEV-ES/SNP, TDX, C-bit position, IOMMUs, vfio-pci
    qemu      the QEMU binary: version, CoCo objects and their properties (QMP), vfio-pci's
    tsm       the PCI TSM state (Linux 6.19 ABI), also read by the TIO hot-plug workflow
    firmware  firmware images by name
    caps      the HostCaps record and probe_host

File reads go through `root` so tests can feed recorded /sys, /proc and /dev trees.
"""

from harness.probe.caps import HostCaps, ProbeSource, probe_host
from harness.probe.facts import Fact
from harness.probe.host import host_dmesg, read_cbitpos
from harness.probe.kvm import KVM_PROBE_DEADLINE, probe_kvm, pvh_probe_image
from harness.probe.qemu import (
    QEMU_CANDIDATES,
    QEMU_OBJECTS,
    QEMU_PROPERTY_OBJECTS,
    check_qemu_binary,
    find_qemu,
    parse_property_help,
    qemu_object_properties,
    qemu_objects,
    qemu_version,
    qemu_vfio_iommufd,
    qemu_vfio_tio,
)
from harness.probe.tsm import PciTsmState, TsmDevice, read_pci_tsm

__all__ = [
    "KVM_PROBE_DEADLINE", "QEMU_CANDIDATES", "QEMU_OBJECTS", "QEMU_PROPERTY_OBJECTS", "Fact", "HostCaps",
    "PciTsmState", "ProbeSource", "TsmDevice", "check_qemu_binary", "find_qemu", "host_dmesg", "parse_property_help",
    "probe_host", "probe_kvm", "pvh_probe_image", "qemu_object_properties", "qemu_objects", "qemu_version",
    "qemu_vfio_iommufd", "qemu_vfio_tio", "read_cbitpos", "read_pci_tsm",
]
