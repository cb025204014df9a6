"""Host probe: recorded host trees for the decisions, real QEMU for the KVM probe guest."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from harness.probe import find_qemu, probe_host, probe_kvm, pvh_probe_image


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_probe_guest_reaches_long_mode_under_tcg(tmp_path: Path) -> None:
    qemu = find_qemu()
    assert qemu
    image = tmp_path / "probe.elf"
    image.write_bytes(pvh_probe_image())
    start = time.monotonic()
    proc = subprocess.run([qemu, "-machine", "pc,accel=tcg", "-nodefaults", "-display", "none",
                           "-kernel", str(image), "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
                          capture_output=True, timeout=30)
    assert proc.returncode == (0x2A << 1) | 1
    assert time.monotonic() - start < 5


def test_kvm_missing_device_is_unusable(tmp_path: Path) -> None:
    fact = probe_kvm(find_qemu(), root=tmp_path)
    assert fact.value is False and fact.evidence == "unusable (/dev/kvm missing)"


def test_snp_host_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "sys/module/kvm_amd/parameters/sev": "Y\n",
        "sys/module/kvm_amd/parameters/sev_es": "Y\n",
        "sys/module/kvm_amd/parameters/sev_snp": "Y\n",
        "dev/sev": "",
        "sys/class/iommu/ivhd0/x": "",
        "sys/kernel/iommu_groups/0/devices/x": "",
        "sys/bus/pci/drivers/vfio-pci/bind": "",
    })
    caps = probe_host(root)
    assert caps.sev.value and caps.sev_es.value and caps.sev_snp.value
    assert not caps.tdx.value
    assert caps.iommu.value and "1 IOMMU groups" in caps.iommu.evidence
    assert caps.vfio_pci.value
    assert caps.sev_snp.evidence.startswith("/sys/module/kvm_amd/parameters/sev_snp = Y")


def test_sev_parameter_without_device_is_not_sev(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"sys/module/kvm_amd/parameters/sev": "Y\n"})
    caps = probe_host(root)
    assert caps.sev.value is False and "/dev/sev is missing" in caps.sev.evidence


def test_tdx_host_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"sys/module/kvm_intel/parameters/tdx": "Y\n"})
    caps = probe_host(root)
    assert caps.tdx.value and not caps.sev_snp.value


def test_real_probe_on_this_host() -> None:
    caps = probe_host(use_cache=False)
    # /dev/kvm existing proves nothing: the verdict must come from running the probe guest.
    assert caps.kvm.evidence.startswith(("usable (probe guest reached", "unusable ("))
    assert caps.qemu_version.value and caps.qemu_version.value != "unknown"
