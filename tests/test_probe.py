"""Host probe: recorded host trees for the decisions (tests/data/hosts, written from the kernel's
ABI documents), real QEMU for the KVM probe guest; the host side of the TIO workflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.errors import InfraError
from harness.hotplug import TioStep, connect_host_device
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


HOSTS = Path(__file__).parent / "data" / "hosts"


def recorded_host(name: str, root: Path) -> Path:
    """Materialise tests/data/hosts/<name>.yaml (written from the ABI documents; see its README)."""
    tree = yaml.safe_load((HOSTS / f"{name}.yaml").read_text())
    for rel, text in tree.items():
        path = root / rel
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return root


def test_recorded_snp_host(tmp_path: Path) -> None:
    caps = probe_host(recorded_host("snp-host", tmp_path))
    assert caps.sev.value and caps.sev_es.value and caps.sev_snp.value and not caps.tdx.value
    assert "SEV-SNP API:1.55" in caps.sev_snp.evidence
    assert not caps.pci_tsm.present and "no /sys/class/tsm" in caps.pci_tsm.summary()


def test_recorded_tdx_host_with_the_new_module_banner(tmp_path: Path) -> None:
    caps = probe_host(recorded_host("tdx-host", tmp_path))
    assert caps.tdx.value and not caps.sev_snp.value
    assert caps.tdx.evidence.endswith("dmesg: [    3.200342] virt/tdx: TDX-Module initialized")


def test_recorded_plain_host_has_nothing(tmp_path: Path) -> None:
    caps = probe_host(recorded_host("plain-host", tmp_path))
    assert not any(f.value for f in (caps.sev, caps.sev_es, caps.sev_snp, caps.tdx, caps.iommu, caps.vfio_pci))
    assert not caps.pci_tsm.present and caps.pci_tsm.devices == ()


def test_recorded_tsm_host_with_a_connected_device(tmp_path: Path) -> None:
    tsm = probe_host(recorded_host("tsm-6.19-connected", tmp_path)).pci_tsm
    assert tsm.tsms == ("tsm0",)
    assert [d.bdf for d in tsm.devices] == ["0000:41:00.0", "0000:41:00.1"]
    pf, vf = tsm.devices
    assert (pf.connected, pf.authenticated, pf.bound) == (True, "1", None)
    assert pf.ide == "IDE connected to tsm0 (pci0000:41)"
    assert pf.tdi_bind.startswith("TDI bind not available")
    assert vf.dsm == "0000:41:00.0" and vf.tdi_bind == "TDI bind available (not bound)"
    assert vf.describe() == ("0000:41:00.1: no authenticated attribute; IDE connected to tsm0 (pci0000:41); "
                             "TDI bind available (not bound), DSM 0000:41:00.0")


def test_recorded_tsm_host_before_connect(tmp_path: Path) -> None:
    tsm = probe_host(recorded_host("tsm-6.19-not-connected", tmp_path)).pci_tsm
    pf, vf = tsm.devices
    assert (pf.connected, pf.authenticated, pf.ide) == (False, "0", "IDE not connected")
    assert vf.tdi_bind == "TDI bind available after connect"
    assert "0000:41:00.0: not authenticated; IDE not connected" in tsm.summary()


def test_tio_workflow_connects_through_the_dsm(tmp_path: Path) -> None:
    root = recorded_host("tsm-6.19-not-connected", tmp_path)
    steps = connect_host_device("0000:41:00.1", root, timeout=2)
    assert [s.step for s in steps] == ["host PCI TSM", "before connect", "connect", "after connect", "after connect"]
    assert steps[2].state == f"wrote tsm0 to {root}/sys/bus/pci/devices/0000:41:00.0/tsm/connect"
    assert (root / "sys/bus/pci/devices/0000:41:00.0/tsm/connect").read_text() == "tsm0"
    assert steps[3].state.startswith("0000:41:00.0: not authenticated; IDE connected to tsm0")


def test_tio_workflow_on_connected_and_plain_hosts(tmp_path: Path) -> None:
    steps = connect_host_device("0000:41:00.1", recorded_host("tsm-6.19-connected", tmp_path / "a"))
    assert steps[2] == TioStep("connect", "0000:41:00.0 already connected to tsm0")
    plain = connect_host_device("0000:41:00.1", recorded_host("plain-host", tmp_path / "b"))
    assert [s.to_json() for s in plain] == [
        {"step": "host PCI TSM", "state": "no /sys/class/tsm/tsmN (no PCI TSM: Linux 6.19+ with a TSM driver)"}]
    absent = connect_host_device("0000:99:00.0", recorded_host("tsm-6.19-connected", tmp_path / "c"))
    assert absent[-1].state.startswith("0000:99:00.0 has no tsm/ directory")


def test_tio_connect_the_kernel_refuses_is_infra(tmp_path: Path) -> None:
    root = recorded_host("tsm-6.19-not-connected", tmp_path)
    (root / "sys/bus/pci/devices/0000:41:00.0/tsm/connect").chmod(0o444)
    if os.access(root / "sys/bus/pci/devices/0000:41:00.0/tsm/connect", os.W_OK):
        # root ignores file modes: replace the attribute with a directory, which no write can open.
        (root / "sys/bus/pci/devices/0000:41:00.0/tsm/connect").unlink()
        (root / "sys/bus/pci/devices/0000:41:00.0/tsm/connect").mkdir()
    with pytest.raises(InfraError, match=r"TIO: writing tsm0 to .*0000:41:00.0/tsm/connect failed"):
        connect_host_device("0000:41:00.1", root, timeout=1)


@pytest.mark.parametrize(("files", "name", "found"), [
    # canonical/tdx boots TDs with Ubuntu's plain OVMF.fd.
    (["usr/share/ovmf/OVMF.fd"], "tdvf", "/usr/share/ovmf/OVMF.fd"),
    (["usr/share/ovmf/OVMF.fd", "usr/share/ovmf/OVMF.inteltdx.fd"], "tdvf", "/usr/share/ovmf/OVMF.inteltdx.fd"),
    # Fedora/RHEL's edk2-ovmf layout.
    (["usr/share/edk2/ovmf/OVMF.amdsev.fd"], "ovmf-amdsev", "/usr/share/edk2/ovmf/OVMF.amdsev.fd"),
    (["usr/share/edk2/ovmf/OVMF.inteltdx.fd"], "tdvf", "/usr/share/edk2/ovmf/OVMF.inteltdx.fd"),
    (["usr/share/OVMF/OVMF.fd"], "ovmf", "/usr/share/OVMF/OVMF.fd"),
    ([], "tdvf", None),
])
def test_firmware_search_paths(tmp_path: Path, files: list[str], name: str, found: str | None) -> None:
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\0")
    fact = probe_host(tmp_path).firmware[name]
    assert fact.value == found, fact
    if found is None:
        assert "/usr/share/edk2/ovmf/OVMF.inteltdx.fd" in fact.evidence


class _ProbeCommands:
    """Records every command the probe starts through harness.process: QEMU's queries and
    dmesg (they still run, for real; the KVM probe guest is not among them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import harness.probe.qemu as probe_qemu

        self.argvs: list[list[str]] = []
        real = probe_qemu.process.run

        def recording(argv: list[str], **kwargs: Any) -> Any:
            self.argvs.append(list(argv))
            return real(argv, **kwargs)

        monkeypatch.setattr(probe_qemu.process, "run", recording)

    def take(self) -> list[list[str]]:
        taken, self.argvs = self.argvs, []
        return taken


@pytest.fixture
def probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and boot id file; the KVM probe guest's deadline short (this host's
    /dev/kvm may be one where it always times out, and each new QEMU file probes again)."""
    import harness.probe.cache
    import harness.probe.kvm

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_PROBE_CACHE", raising=False)
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    monkeypatch.setattr(harness.probe.cache, "BOOT_ID", boot_id)
    monkeypatch.setattr(harness.probe.kvm, "KVM_PROBE_DEADLINE", 0.5)
    return boot_id


# --version, -object help, QMP qom-list-properties, -device vfio-pci,help: each once; and dmesg.
_PROBED = 5


def _same_answers(a: Any, b: Any) -> None:
    for name in ("qemu_version", "qemu_objects", "qemu_properties", "vfio_tio", "vfio_iommufd", "sev", "sev_snp",
                 "tdx"):
        assert getattr(a, name) == getattr(b, name), name


def test_probe_cache_answers_the_second_probe_without_starting_qemu(
        probe_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _ProbeCommands(monkeypatch)
    qemu = find_qemu()
    assert qemu
    first = probe_host(qemu=qemu)
    assert len(runs.take()) == _PROBED
    assert first.probe_cache.cached is False and first.probe_cache.probed_at
    second = probe_host(qemu=qemu)
    assert runs.take() == []
    assert second.probe_cache.cached is True and second.probe_cache.probed_at == first.probe_cache.probed_at
    assert "from the probe at" in second.probe_cache.note and "the rest read now" in second.probe_cache.note
    _same_answers(first, second)
    assert second.to_json()["probe_cache"]["cached"] is True
    # No cache asked for: everything probed again, and the new answers kept.
    third = probe_host(qemu=qemu, use_cache=False)
    assert len(runs.take()) == _PROBED and third.probe_cache.cached is False
    monkeypatch.setenv("HARNESS_PROBE_CACHE", "0")
    assert probe_host(qemu=qemu).probe_cache.cached is False and len(runs.take()) == _PROBED


def test_probe_cache_is_dropped_for_a_changed_qemu_binary(probe_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _ProbeCommands(monkeypatch)
    real = find_qemu()
    assert real
    qemu = tmp_path / "bin" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    shutil.copy2(real, qemu)
    before = probe_host(qemu=str(qemu))
    assert before.probe_cache.cached is False and len(runs.take()) == _PROBED
    assert probe_host(qemu=str(qemu)).probe_cache.cached is True and runs.take() == []
    # Same file, new mtime (a rebuild that happens to keep the size): probed again.
    st = qemu.stat()
    os.utime(qemu, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = probe_host(qemu=str(qemu))
    assert touched.probe_cache.cached is False and len(runs.take()) == _PROBED
    # Another program at the same path (a wrapper: another size): probed again.
    qemu.unlink()
    qemu.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    qemu.chmod(0o755)
    wrapped = probe_host(qemu=str(qemu))
    assert wrapped.probe_cache.cached is False and len(runs.take()) == _PROBED
    _same_answers(before, wrapped)
    assert probe_host(qemu=str(qemu)).probe_cache.cached is True and runs.take() == []


def test_probe_cache_is_dropped_after_a_reboot(probe_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _ProbeCommands(monkeypatch)
    qemu = find_qemu()
    assert qemu
    probe_host(qemu=qemu)
    runs.take()
    assert probe_host(qemu=qemu).probe_cache.cached is True
    probe_cache.write_text("99999999-2222-3333-4444-555555555555\n")
    rebooted = probe_host(qemu=qemu)
    assert rebooted.probe_cache.cached is False and len(runs.take()) == _PROBED
    assert "99999999" in (rebooted.probe_cache.key or "")
    # A host whose boot id cannot be read is never answered from the cache.
    probe_cache.unlink()
    for _ in range(2):
        unknown = probe_host(qemu=qemu)
        assert unknown.probe_cache.cached is False and "not cached" in unknown.probe_cache.note
        assert len(runs.take()) == _PROBED


def test_recorded_host_trees_are_never_cached(probe_cache: Path, tmp_path: Path) -> None:
    caps = probe_host(recorded_host("snp-host", tmp_path / "root"))
    assert caps.probe_cache.cached is False and "recorded host tree" in caps.probe_cache.note
    assert not list((tmp_path / "cache" / "probe").glob("qemu-*.json"))


def test_probe_cache_record_it_cannot_read_is_probed_again(probe_cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _ProbeCommands(monkeypatch)
    qemu = find_qemu()
    assert qemu
    probe_host(qemu=qemu)
    runs.take()
    (record,) = (tmp_path / "cache" / "probe").glob("qemu-*.json")
    doc = json.loads(record.read_text())
    doc["data"]["qemu"] = {"version": "9.9"}  # another harness version's layout
    record.write_text(json.dumps(doc))
    again = probe_host(qemu=qemu)
    assert again.probe_cache.cached is False and len(runs.take()) == _PROBED
    assert again.qemu_version.value != "9.9" and probe_host(qemu=qemu).probe_cache.cached is True
