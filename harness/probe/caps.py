"""HostCaps: the probed host as one record, and `probe_host`, which fills it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.probe import cache
from harness.probe.facts import Fact
from harness.probe.firmware import find_firmware
from harness.probe.host import (
    dmesg_evidence,
    host_dmesg,
    iommu_fact,
    module_flag,
    read_cbitpos,
    sev_fact,
    vfio_pci_fact,
    with_dmesg,
)
from harness.probe.kvm import probe_kvm
from harness.probe.qemu import QemuAnswers, ask_qemu, find_qemu, qemu_origin
from harness.probe.tsm import PciTsmState, read_pci_tsm


@dataclass(frozen=True)
class ProbeSource:
    """Where the QEMU answers and the host dmesg lines in a HostCaps came from: probed now,
    or the cache of an earlier probe on this host boot with this QEMU binary (`probed_at`)."""

    cached: bool
    probed_at: str | None
    key: str | None
    note: str


@dataclass
class HostCaps:
    kvm: Fact
    qemu: Fact
    qemu_version: Fact
    qemu_objects: Fact
    sev: Fact
    sev_es: Fact
    sev_snp: Fact
    tdx: Fact
    iommu: Fact
    vfio_pci: Fact
    vfio_tio: Fact = Fact(None, "not probed")
    vfio_iommufd: Fact = Fact(None, "not probed")
    cbitpos: Fact = Fact(None, "not probed")
    firmware: dict[str, Fact] = field(default_factory=dict)
    # Per object type: its properties as a comma-separated list (QMP qom-list-properties).
    qemu_properties: dict[str, Fact] = field(default_factory=dict)
    pci_tsm: PciTsmState = field(default_factory=lambda: PciTsmState((), (), "not probed"))
    probe_cache: ProbeSource = ProbeSource(False, None, None, "probed now")

    def qemu_has_property(self, qom_type: str, prop: str) -> tuple[bool, str]:
        """Whether the probed QEMU's `qom_type` object takes `prop`, and the evidence."""
        fact = self.qemu_properties.get(qom_type)
        where = f"QEMU {self.qemu_version.value} ({self.qemu.value})"
        if fact is None or fact.value is None:
            return False, f"{where} has no {qom_type} object"
        if prop in str(fact.value).split(","):
            return True, f"{where} {qom_type} has {prop}"
        return False, f"{where} {qom_type} has no property {prop!r}"

    @property
    def kvm_usable(self) -> bool:
        return self.kvm.value is True

    def check(self, need: str) -> tuple[bool, str]:
        """Whether this host has one capability a profile needs, and why (the evidence)."""
        if need.startswith("qemu:"):
            if need == "qemu:vfio-tio":
                fact = self.vfio_tio
                return bool(fact.value), f"vfio-pci TIO property: {fact.evidence}"
            if need == "qemu:vfio-iommufd":
                fact = self.vfio_iommufd
                return bool(fact.value), f"vfio-pci iommufd property: {fact.evidence}"
            obj = need.split(":", 1)[1]
            known = str(self.qemu_objects.value or "").split(",")
            if obj in known:
                return True, f"QEMU {self.qemu_version.value} has {obj}"
            return False, f"QEMU {self.qemu_version.value} lacks {obj} ({self.qemu_objects.evidence})"
        fact = {"kvm": self.kvm, "sev": self.sev, "sev_es": self.sev_es, "sev_snp": self.sev_snp,
                "tdx": self.tdx, "iommu": self.iommu, "vfio_pci": self.vfio_pci}[need]
        if need == "kvm":
            return self.kvm_usable, f"kvm {fact.evidence}"
        return bool(fact.value), f"{need}: {fact.evidence}"

    def firmware_path(self, name: str) -> tuple[str | None, str]:
        """Resolve a firmware name (ovmf, ovmf-amdsev, tdvf) or a path."""
        if "/" in name:
            return (name, "given") if Path(name).is_file() else (None, f"firmware {name}: no such file")
        fact = self.firmware.get(name)
        if fact is None:
            return None, f"firmware {name!r}: unknown name; known: {', '.join(self.firmware)}"
        return (str(fact.value), "found") if fact.value else (None, f"firmware {name}: {fact.evidence}")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


_CACHED = ("qemu_version", "qemu_objects", "qemu_properties", "vfio_tio", "vfio_iommufd",
           "the dmesg lines in sev, sev_snp and tdx")


def _answers(qemu: str | None, root: Path,
             use_cache: bool) -> tuple[QemuAnswers | None, dict[str, str] | None, ProbeSource]:
    """QEMU's answers and the host's dmesg lines: from the cache for this host boot and QEMU
    binary when there is one (and `use_cache`), else probed (and stored for the next run)."""
    key = cache.cache_key(os.path.abspath(qemu)) if qemu is not None and root == Path("/") else None
    if key is None:
        why = "no QEMU" if qemu is None else ("a recorded host tree" if root != Path("/")
                                              else "host boot id or QEMU binary not readable: not cached")
        return (ask_qemu(qemu) if qemu else None), dmesg_evidence(host_dmesg(root)), \
            ProbeSource(False, None, None, f"probed now ({why})")
    if use_cache:
        hit = cache.load(key)
        if hit is not None:
            try:
                cached_answers = QemuAnswers.from_json(hit.data["qemu"])
                cached_dmesg = hit.data["dmesg"]
                if cached_dmesg is None or isinstance(cached_dmesg, dict):
                    return cached_answers, cached_dmesg, ProbeSource(
                        True, hit.probed_at, key.text(),
                        f"{', '.join(_CACHED)} from the probe at {hit.probed_at} ({key.describe()}); "
                        "the rest read now")
            except (KeyError, TypeError, ValueError):
                pass  # another version's record: probe again
    answers = ask_qemu(qemu) if qemu else None
    dmesg = dmesg_evidence(host_dmesg(root))
    stored = cache.store(key, {"qemu": answers.to_json() if answers else None, "dmesg": dmesg})
    return answers, dmesg, ProbeSource(False, stored.probed_at, key.text(),
                                       f"probed now; kept for {key.describe()}")


def probe_host(root: Path = Path("/"), use_cache: bool = True, qemu: str | None = None) -> HostCaps:
    """Read the host's capabilities. Never raises for a missing capability.

    `qemu` overrides the QEMU binary (`harness probe --qemu PATH`); otherwise
    $HARNESS_QEMU, then qemu-system-x86_64 on PATH. QEMU's answers and the host
    dmesg lines come from `harness.probe.cache` when this host boot already
    probed this QEMU binary (`probe_cache` says so and when); `use_cache=False`
    (or HARNESS_PROBE_CACHE=0) probes everything again, the KVM probe guest
    included, and stores the new answers.
    """
    use_cache = use_cache and os.environ.get("HARNESS_PROBE_CACHE", "1") != "0"
    given = qemu
    qemu = find_qemu(given)
    answers, dmesg, source = _answers(qemu, root, use_cache)
    return HostCaps(
        kvm=probe_kvm(qemu, root, use_cache),
        qemu=Fact(qemu, qemu_origin(given, qemu)),
        qemu_version=Fact(answers.version if answers else None, f"{qemu} --version" if qemu else "no QEMU"),
        qemu_objects=Fact(",".join(answers.objects) if answers else "",
                          f"{qemu} -object help" if qemu else "no QEMU"),
        qemu_properties=dict(answers.properties) if answers else {},
        sev=with_dmesg(sev_fact(root), dmesg, "sev_api"),
        sev_es=module_flag(root, "kvm_amd", "sev_es"),
        sev_snp=with_dmesg(module_flag(root, "kvm_amd", "sev_snp"), dmesg, "snp_api"),
        tdx=with_dmesg(module_flag(root, "kvm_intel", "tdx"), dmesg, "tdx_module"),
        iommu=iommu_fact(root),
        vfio_pci=vfio_pci_fact(root),
        vfio_tio=answers.vfio_tio if answers else Fact(None, "no QEMU"),
        vfio_iommufd=answers.vfio_iommufd if answers else Fact(None, "no QEMU"),
        cbitpos=read_cbitpos(root),
        firmware=find_firmware(root),
        pci_tsm=read_pci_tsm(root),
        probe_cache=source,
    )
