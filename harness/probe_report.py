"""`harness probe`'s report: the host's capabilities, each with its evidence,
then each profile's verdict here (runs / falls back / cannot run, and why),
and, with --check-argv, QEMU's own verdict on each profile's capable-host argv."""

from __future__ import annotations

import json
from typing import Any

from harness.errors import HarnessError
from harness.probe import HostCaps, check_qemu_binary, probe_host
from harness.profiles import available


def probe(qemu: str | None, use_cache: bool, check_argv: bool, as_json: bool) -> int:
    """`harness probe`: the host's capabilities with their evidence, then each profile's verdict here."""
    if qemu:
        check_qemu_binary(qemu, "harness probe: --qemu")
    caps = probe_host(use_cache=use_cache, qemu=qemu)
    table = profile_table(caps, check_argv)
    if as_json:
        print(json.dumps({**caps.to_json(), "profiles": table}, indent=2))
        return 0
    rows = [("kvm", caps.kvm), ("qemu", caps.qemu), ("qemu version", caps.qemu_version),
            ("qemu coco objects", caps.qemu_objects), ("sev", caps.sev), ("sev-es", caps.sev_es),
            ("sev-snp", caps.sev_snp), ("tdx", caps.tdx), ("c-bit position", caps.cbitpos),
            ("iommu", caps.iommu), ("vfio-pci", caps.vfio_pci), ("vfio-pci tio flag", caps.vfio_tio),
            ("vfio-pci iommufd", caps.vfio_iommufd)]
    rows += [(f"firmware {name}", fact) for name, fact in caps.firmware.items()]
    rows += [(f"{obj} props", fact) for obj, fact in caps.qemu_properties.items()]
    for name, fact in rows:
        value = fact.value
        if isinstance(value, str):
            shown = value or "none"
        elif isinstance(value, bool) or value is None:
            shown = {True: "yes", False: "no", None: "-"}[value]
        else:
            shown = str(value)
        if name == "kvm":
            shown = fact.evidence
        print(f"{name:20} {shown:34} {'' if name == 'kvm' else fact.evidence}".rstrip())
    print(f"{'pci tsm':20} {caps.pci_tsm.summary()}")
    print(f"{'probe cache':20} {'used' if caps.probe_cache.cached else 'not used':34} {caps.probe_cache.note}")
    print(f"\nguests here run under {'KVM' if caps.kvm_usable else 'TCG (software emulation)'}\n")
    width = max(len(row["profile"]) for row in table)
    for row in table:
        verdict = row["verdict"] + (f" -> {row['effective']}" if row["verdict"] == "falls back" else "")
        print(f"{row['profile']:{width}}  {verdict:30} {'; '.join(row['reasons'])}".rstrip())
        if "qemu_check" in row:
            print(f"{'':{width}}  qemu argv check: {row['qemu_check']}: {row['qemu_message']}")
    return 0


def profile_table(caps: HostCaps, check_argv: bool = False) -> list[dict[str, Any]]:
    """Each profile: runs for real here / falls back to its twin / cannot run, and why."""
    from harness.plan import choose_profile
    from harness.qemu_check import check_profile_argv

    rows: list[dict[str, Any]] = []
    for name in available():
        try:
            choice = choose_profile(name, {}, caps)
        except HarnessError as e:
            rows.append({"profile": name, "verdict": "cannot run", "effective": name, "reasons": [str(e)]})
            continue
        row: dict[str, Any] = {"profile": name, "verdict": choice.verdict, "effective": choice.effective.name,
                                  "reasons": list(choice.reasons)}
        if check_argv:
            verdict = check_profile_argv(choice.requested, caps)
            row.update(qemu_check=verdict.verdict, qemu_message=verdict.message)
        rows.append(row)
    return rows
