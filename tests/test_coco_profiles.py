"""Confidential profiles: decisions on recorded hosts, real QEMU's parser, emulated runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.errors import BadInput, InfraError
from harness.plan import choose_profile, plan_profile, prepare
from harness.probe import Fact, HostCaps, probe_host
from harness.profiles import Profile, apply_params, available, load_profile
from harness.qemu_check import check_profile_argv, classify_qemu_error
from tests.conftest import Cli, meta

COCO = ["sev", "sev-es", "snp", "tdx", "tio", "hyperv"]


def host(tmp: Path, files: dict[str, str], objects: str = "sev-guest,sev-snp-guest,tdx-guest",
         kvm: bool = True, tio: str | None = "x-tio") -> HostCaps:
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    caps = probe_host(tmp)
    fw = {"ovmf": Fact("/usr/share/ovmf/OVMF.fd", "found"), "tdvf": Fact("/fw/TDVF.fd", "found")}
    return dataclasses.replace(caps, kvm=Fact(kvm, "usable (recorded)" if kvm else "unusable (recorded)"),
                               qemu_objects=Fact(objects, "recorded"), qemu_version=Fact("10.1.0", "recorded"),
                               vfio_tio=Fact(tio, "recorded"), firmware={**caps.firmware, **fw})


SNP_HOST = {"sys/module/kvm_amd/parameters/sev": "Y", "sys/module/kvm_amd/parameters/sev_es": "Y",
            "sys/module/kvm_amd/parameters/sev_snp": "Y", "dev/sev": "",
            "dmesg": "[    5.1] ccp 0000:22:00.1: SEV-SNP API:1.55 build:21\n"}
TDX_HOST = {"sys/module/kvm_intel/parameters/tdx": "Y", "dmesg": "[    3.2] virt/tdx: module initialized\n"}


def test_snp_runs_for_real_on_an_snp_host(tmp_path: Path) -> None:
    caps = host(tmp_path, SNP_HOST)
    choice = choose_profile("snp", {}, caps)
    assert (choice.verdict, choice.effective.name, choice.reasons) == ("runs", "snp", ())
    assert "SEV-SNP API:1.55" in caps.sev_snp.evidence
    assert choose_profile("tdx", {}, caps).verdict == "falls back"


def test_tdx_host_with_an_old_qemu_falls_back_and_says_why(tmp_path: Path) -> None:
    caps = host(tmp_path, TDX_HOST, objects="sev-guest,sev-snp-guest")
    choice = choose_profile("tdx", {}, caps)
    assert choice.verdict == "falls back" and choice.effective.name == "coco-emulated"
    assert choice.reasons == ("QEMU 10.1.0 lacks tdx-guest (recorded)",)
    assert "module initialized" in caps.tdx.evidence


def test_plain_host_falls_back_for_every_coco_profile(tmp_path: Path) -> None:
    caps = host(tmp_path, {}, kvm=False)
    for name in COCO:
        choice = choose_profile(name, {}, caps)
        assert choice.verdict == "falls back", name
        # tio's twin (vfio) needs an IOMMU too: its own twin runs.
        assert choice.effective.name == ("tio-emulated" if name == "tio" else load_profile(name).twin)
        assert any(r.startswith("kvm unusable") for r in choice.reasons)


def test_strict_and_force(tmp_path: Path) -> None:
    caps = host(tmp_path, {}, kvm=False)
    with pytest.raises(InfraError, match=r"profile snp cannot run on this host \(--strict\): kvm unusable"):
        plan_profile("snp", {}, caps, strict=True, force=False)
    forced = plan_profile("snp", {}, caps, strict=False, force=True)
    assert forced.effective.name == "snp" and forced.reasons


def test_tio_on_an_iommu_host_without_snp_falls_back_to_vfio_naming_only_what_is_missing(tmp_path: Path) -> None:
    files = {"sys/class/iommu/dmar0/x": "", "sys/kernel/iommu_groups/3/devices/x": "",
             "sys/bus/pci/drivers/vfio-pci/bind": ""}
    caps = host(tmp_path, files, tio=None)
    choice = choose_profile("tio", {"host_bdf": "0000:00:10.0"}, caps)
    assert (choice.verdict, choice.effective.name) == ("falls back", "vfio")
    assert [r.split(":")[0] for r in choice.reasons] == ["sev_snp", "vfio-pci TIO property"]
    assert choice.effective.hotplug == ("vfio-pci,host=0000:00:10.0,id=vfio0,bus=hp4",)
    with pytest.raises(BadInput, match="falls back to vfio, which needs --param host_bdf"):
        plan_profile("tio", {}, caps, strict=False, force=False)


def test_tio_on_a_capable_host_needs_the_host_bdf(tmp_path: Path) -> None:
    files = {**SNP_HOST, "sys/class/iommu/ivhd0/x": "", "sys/kernel/iommu_groups/7/devices/x": "",
             "sys/bus/pci/drivers/vfio-pci/bind": ""}
    caps = host(tmp_path, files)
    with pytest.raises(BadInput, match="host_bdf"):
        choose_profile("tio", {}, caps)
    choice = choose_profile("tio", {"host_bdf": "0000:41:00.1"}, caps)
    assert choice.verdict == "runs"
    assert choice.requested.hotplug == ("vfio-pci,host=0000:41:00.1,id=tio0,bus=hp0,x-tio=on",)
    # A QEMU without the TIO property cannot run tio for real.
    caps = host(tmp_path, files, tio=None)
    assert choose_profile("tio", {"host_bdf": "0000:41:00.1"}, caps).verdict == "falls back"


def test_parameters_fill_the_command_line() -> None:
    p = apply_params(load_profile("snp"), {"cbitpos": "47", "memory": "2G", "smp": "4"})
    assert any("sev-snp-guest" in a and "cbitpos=47" in a for a in p.args) and (p.memory_mib, p.smp) == (2048, 4)
    with pytest.raises(BadInput, match="unknown parameter 'cbitpo'; known: cbitpos"):
        apply_params(load_profile("snp"), {"cbitpo": "47"})
    with pytest.raises(BadInput, match="parameter 'smp' must be a positive integer"):
        apply_params(load_profile("emulated"), {"smp": "0"})


def test_profile_json_round_trip() -> None:
    for name in available():
        p = apply_params(load_profile(name), {})
        assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p


@pytest.mark.parametrize("name", available())
def test_requested_argv_passes_the_real_qemu_parser(name: str) -> None:
    caps = probe_host()
    profile, _ = prepare(name, {"host_bdf": "0000:41:00.1"} if name == "tio" else {}, caps)
    verdict = check_profile_argv(profile, caps)
    if verdict.verdict == "unknown-object":
        pytest.skip(f"QEMU {caps.qemu_version.value} here does not know the object: {verdict.message}")
    assert verdict.verdict in ("accepted", "needs-hardware"), verdict.message


def test_misspelt_property_is_rejected_by_the_real_qemu() -> None:
    caps = probe_host()
    profile, _ = prepare("snp", {"cbitpos": "51,polcy=1"}, caps)
    verdict = check_profile_argv(profile, caps)
    assert verdict.verdict == "rejected" and "Invalid parameter 'polcy'" in verdict.message


@pytest.mark.parametrize(("output", "verdict"), [
    ("qemu-system-x86_64: cannot set up private guest memory for sev-snp-guest: KVM required", "needs-hardware"),
    ("qemu-system-x86_64: vm-type SEV-SNP not supported by KVM", "needs-hardware"),
    ("qemu-system-x86_64: -object tdx-guest,id=tdx0: Parameter 'qom-type' does not accept value 'tdx-guest'",
     "unknown-object"),
    ("qemu-system-x86_64: -object sev-snp-guest,id=sev0,polcy=1: Invalid parameter 'polcy'", "rejected"),
])
def test_classify_qemu_errors(output: str, verdict: str) -> None:
    assert classify_qemu_error(output)[0] == verdict


def test_dry_run_shows_the_capable_host_argv_beside_the_one_here(cli: Cli) -> None:
    proc = cli("run", "--profile", "snp", "--dry-run", "--json", "--param", "cbitpos=47")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["requested"] == "snp"
    requested = " ".join(plan["requested_argv"])
    assert "sev-snp-guest,id=sev0,cbitpos=47,reduced-phys-bits=1" in requested
    assert "confidential-guest-support=sev0" in requested and "-bios" in plan["requested_argv"]
    if plan["effective"] != "snp":
        assert plan["effective"] == "coco-emulated" and plan["reasons"]
        assert "sev-snp-guest" not in " ".join(plan["argv"])
        assert "swiotlb=force" in plan["argv"][plan["argv"].index("-append") + 1]


def test_strict_run_exits_3_with_one_line(cli: Cli) -> None:
    if probe_host().sev_snp.value:
        pytest.skip("this host has SNP: --strict would run it for real")
    proc = cli("run", "--profile", "snp", "--strict", "--results", str(cli.results))
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("harness: profile snp cannot run on this host (--strict): ")
    assert "sev_snp" in lines[-1]
    assert cli.run_dirs() == []


def test_forced_snp_without_hardware_is_qemus_own_exit_3(cli: Cli) -> None:
    if probe_host().sev_snp.value:
        pytest.skip("this host has SNP")
    proc = cli("run", "--profile", "snp", "--force", "--results", str(cli.results), "-k", "userspace")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    failure = meta(cli.only_run())["failure"]
    assert failure["kind"] == "QemuStartError"
    assert "KVM" in failure["message"]  # QEMU's words: KVM required / failed to initialize kvm


def test_emulated_snp_run_skips_hardware_checks_and_passes_the_dma_path(cli: Cli) -> None:
    if probe_host().sev_snp.value:
        pytest.skip("this host has SNP: the run would not be emulated")
    proc = cli("run", "--profile", "snp", "--results", str(cli.results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    m = meta(run_dir)
    assert (m["profile"]["requested"], m["profile"]["effective"]) == ("snp", "coco-emulated")
    assert any("sev_snp" in r for r in m["profile"]["reasons"])
    assert "FELL BACK to coco-emulated" in proc.stdout
    cases = {c.name: c for suite in JUnitXml.fromfile(str(run_dir / "junit.xml")) for c in suite}
    for name in ("test_memory_encryption_banner_matches_profile", "test_guest_device_node",
                 "test_configfs_tsm_report", "test_snp_vmpl_is_readable"):
        assert cases[name].is_skipped, name
        assert "emulated run - profile snp fell back to coco-emulated" in cases[name].result[0].message
    for name in ("test_swiotlb_pool", "test_virtio_negotiated_access_platform",
                 "test_no_encryption_claimed_without_hardware"):
        assert cases[name].is_passed, name
