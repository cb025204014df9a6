"""Confidential profiles: decisions on recorded hosts, real QEMU's parser, emulated runs."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from junitparser import JUnitXml

from harness.errors import BadInput, InfraError
from harness.plan import choose_profile, plan_profile, prepare
from harness.probe import Fact, HostCaps, probe_host
from harness.profiles import Profile, apply_params, available, load_profile
from harness.qemu_check import check_profile_argv, classify_qemu_error
from tests.conftest import REPO, Cli, meta
from tests.test_probe import recorded_host

COCO = ["sev", "sev-es", "snp", "tdx", "tio", "hyperv"]
# What QMP qom-list-properties answers in QEMU 10.2.2 (Debian's 1:10.2.2+ds-1), recorded.
QEMU_10_2_PROPERTIES = {
    "sev-guest": "cbitpos,dh-cert-file,handle,kernel-hashes,legacy-vm-type,policy,reduced-phys-bits,session-file,"
                 "sev-device",
    "sev-snp-guest": "author-key-enabled,cbitpos,guest-visible-workarounds,host-data,id-auth,id-block,"
                     "kernel-hashes,policy,reduced-phys-bits,sev-device,vcek-disabled",
    "tdx-guest": "attributes,mrconfigid,mrowner,mrownerconfig,quote-generation-socket,sept-ve-disable",
}


def host(tmp: Path, files: dict[str, str], objects: str = "sev-guest,sev-snp-guest,tdx-guest,iommufd",
         kvm: bool = True, tio: str | None = "x-tio") -> HostCaps:
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    caps = probe_host(tmp)
    fw = {"ovmf": Fact("/usr/share/ovmf/OVMF.fd", "found"), "tdvf": Fact("/fw/TDVF.fd", "found")}
    props = {k: Fact(v, "recorded") for k, v in QEMU_10_2_PROPERTIES.items() if k in objects.split(",")}
    return dataclasses.replace(caps, kvm=Fact(kvm, "usable (recorded)" if kvm else "unusable (recorded)"),
                               qemu=Fact("/opt/qemu/bin/qemu-system-x86_64", "recorded"),
                               qemu_objects=Fact(objects, "recorded"), qemu_version=Fact("10.2.2", "recorded"),
                               qemu_properties=props, vfio_tio=Fact(tio, "recorded"),
                               vfio_iommufd=Fact("iommufd" in objects, "recorded"),
                               firmware={**caps.firmware, **fw})


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
    assert choice.reasons == ("QEMU 10.2.2 lacks tdx-guest (recorded)",)
    assert "module initialized" in caps.tdx.evidence


def test_plain_host_falls_back_for_every_coco_profile(tmp_path: Path) -> None:
    caps = host(tmp_path, {}, kvm=False)
    for name in COCO:
        choice = choose_profile(name, {}, caps)
        assert choice.verdict == "falls back", name
        # tio's twin (vfio) needs an IOMMU too: its own twin runs.
        assert choice.effective.name == ("tio-emulated" if name == "tio" else load_profile(name).twin)
        assert any(r.startswith("kvm unusable") for r in choice.reasons)


@pytest.mark.parametrize(("tree", "runs"), [
    ("snp-host", {"sev", "sev-es", "snp", "tio", "hyperv"}),
    ("tdx-host", {"tdx", "hyperv"}),
    ("tsm-6.19-connected", {"sev", "sev-es", "snp", "tio", "hyperv"}),
    ("plain-host", {"hyperv"}),
])
def test_probe_decisions_on_recorded_hosts(tmp_path: Path, tree: str, runs: set[str]) -> None:
    """Which CoCo profiles run for real on each recorded host (KVM usable, QEMU recorded as 10.2.2 with TIO)."""
    recorded_host(tree, tmp_path)
    caps = host(tmp_path, {})
    verdicts = {name: choose_profile(name, {"host_bdf": "0000:41:00.1"} if name == "tio" else {}, caps)
                for name in COCO}
    assert {name for name, c in verdicts.items() if c.verdict == "runs"} == runs
    for name, choice in verdicts.items():
        if name not in runs:
            assert choice.verdict == "falls back" and choice.reasons, name
    if tree == "tsm-6.19-connected":
        assert caps.pci_tsm.device("0000:41:00.1") is not None


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
    # iommufd (the default backend): the object is on the command line, the device names it.
    assert choice.effective.hotplug == ("vfio-pci,host=0000:00:10.0,iommufd=iommufd0,id=vfio0,bus=hp4",)
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
    assert choice.requested.hotplug == ("vfio-pci,host=0000:41:00.1,iommufd=iommufd0,id=tio0,bus=hp0,x-tio=on",)
    assert "iommufd,id=iommufd0" in choice.requested.object_argv()
    # A QEMU without the TIO property cannot run tio for real.
    caps = host(tmp_path, files, tio=None)
    assert choose_profile("tio", {"host_bdf": "0000:41:00.1"}, caps).verdict == "falls back"
    # Intel's TDX Connect QEMU spells it x-secure-mode; the probe's find is what goes on the device.
    caps = host(tmp_path, files, tio="x-secure-mode")
    assert choose_profile("tio", {"host_bdf": "0000:41:00.1"}, caps).requested.hotplug[0].endswith(
        ",x-secure-mode=on")


def test_tio_without_iommufd_in_qemu_falls_back_unless_containers_are_asked_for(tmp_path: Path) -> None:
    files = {**SNP_HOST, "sys/class/iommu/ivhd0/x": "", "sys/kernel/iommu_groups/7/devices/x": "",
             "sys/bus/pci/drivers/vfio-pci/bind": ""}
    caps = host(tmp_path, files, objects="sev-guest,sev-snp-guest")
    choice = choose_profile("tio", {"host_bdf": "0000:41:00.1"}, caps)
    assert choice.verdict == "falls back"
    assert any("iommufd" in r and "vfio_backend=container" in r for r in choice.reasons), choice.reasons
    legacy = choose_profile("tio", {"host_bdf": "0000:41:00.1", "vfio_backend": "container"}, caps)
    assert legacy.verdict == "runs" and "iommufd" not in legacy.requested.hotplug[0]
    with pytest.raises(BadInput, match="parameter 'vfio_backend' must be one of iommufd, container"):
        choose_profile("tio", {"host_bdf": "0000:41:00.1", "vfio_backend": "vfio"}, caps)


@pytest.mark.parametrize(("profile", "param", "value", "message"), [
    ("snp", "secure_tsc", "on", "parameter 'secure_tsc' needs sev-snp-guest property 'secure-tsc': "
                                "QEMU 10.2.2 (/opt/qemu/bin/qemu-system-x86_64) sev-snp-guest has no property"),
    ("snp", "tsc_frequency", "2000000000", "parameter 'tsc_frequency' needs sev-snp-guest property"),
    ("snp", "igvm", "/fw/snp.igvm", "parameter 'igvm' needs the igvm-cfg object"),
])
def test_a_parameter_the_qemu_lacks_is_bad_input(tmp_path: Path, profile: str, param: str, value: str,
                                                  message: str) -> None:
    caps = host(tmp_path, SNP_HOST)
    with pytest.raises(BadInput, match=re.escape(message)):
        choose_profile(profile, {param: value}, caps)


def test_parameters_the_qemu_has_reach_the_object(tmp_path: Path) -> None:
    caps = host(tmp_path, TDX_HOST)
    digest = base64.b64encode(bytes(range(48))).decode()
    choice = choose_profile("tdx", {"quote_socket": "vsock:2:4050", "mrowner": digest}, caps)
    assert choice.verdict == "runs"
    obj = json.loads(choice.requested.object_argv()[1])
    assert obj["quote-generation-socket"] == {"type": "vsock", "cid": "2", "port": "4050"}
    assert obj["mrowner"] == digest and obj["sept-ve-disable"] is True
    snp = choose_profile("snp", {"host_data": base64.b64encode(bytes(32)).decode(), "author_key": "on"},
                         host(tmp_path, SNP_HOST)).requested.object_argv()[1]
    assert snp.endswith(",host-data=" + base64.b64encode(bytes(32)).decode() + ",author-key-enabled=on")
    # An older QEMU without tdx-guest at all: the parameter cannot be honoured.
    old = host(tmp_path, TDX_HOST, objects="sev-guest,sev-snp-guest")
    with pytest.raises(BadInput, match=r"parameter 'quote_socket' needs tdx-guest .*has no tdx-guest object"):
        choose_profile("tdx", {"quote_socket": "vsock:2:4050"}, old)


@pytest.mark.parametrize(("param", "value", "message"), [
    ("quote_socket", "tcp:10.0.0.1:4050", "must be vsock:CID:PORT or unix:/PATH"),
    ("quote_socket", "vsock:2", "must be vsock:CID:PORT or unix:/PATH"),
    ("mrconfigid", "AAAA", "must be base64 of 48 bytes"),
])
def test_malformed_tdx_parameters_are_bad_input(param: str, value: str, message: str) -> None:
    with pytest.raises(BadInput, match=re.escape(f"parameter '{param}' {message}")):
        apply_params(load_profile("tdx"), {param: value})


def test_parameters_fill_the_command_line() -> None:
    p = apply_params(load_profile("snp"), {"cbitpos": "47", "memory": "2G", "smp": "4"})
    assert any("sev-snp-guest" in a and "cbitpos=47" in a for a in p.object_argv())
    assert (p.memory_mib, p.smp) == (2048, 4)
    with pytest.raises(BadInput, match="unknown parameter 'cbitpo'; known: author_key, cbitpos"):
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


@pytest.fixture(scope="session")
def newest_qemu() -> str:
    """The newest QEMU Debian's source packages offer, built by bin/build-qemu.

    Built here when absent (once per machine: several minutes, see README);
    $HARNESS_NEWEST_QEMU names another build. Never a skip: CI checks every
    profile's argv against it, tdx included, which QEMU 10.0 cannot parse.
    """
    given = os.environ.get("HARNESS_NEWEST_QEMU")
    if given:
        return given
    proc = subprocess.run([str(REPO / "bin" / "build-qemu")], capture_output=True, text=True, timeout=4800,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"bin/build-qemu exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def test_every_profile_passes_the_newest_qemu_parser(cli: Cli, newest_qemu: str) -> None:
    proc = cli("probe", "--check-argv", "--json", "--qemu", newest_qemu, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["qemu"]["value"] == newest_qemu and report["qemu"]["evidence"] == "given with --qemu"
    assert "tdx-guest" in report["qemu_objects"]["value"].split(","), report["qemu_objects"]
    # tdx-guest adds its properties per instance: only qom-list-properties sees them.
    assert report["qemu_properties"]["tdx-guest"]["value"] == QEMU_10_2_PROPERTIES["tdx-guest"] or \
        report["qemu_version"]["value"] != "10.2.2"
    verdicts = {row["profile"]: (row["qemu_check"], row["qemu_message"]) for row in report["profiles"]}
    assert set(verdicts) == set(available())
    bad = {name: v for name, v in verdicts.items() if v[0] not in ("accepted", "needs-hardware")}
    assert not bad, bad
    # tdx: parsed to the end, stopped only by the missing TDX-capable KVM.
    assert verdicts["tdx"][0] == "needs-hardware" and "KVM" in verdicts["tdx"][1], verdicts["tdx"]


@pytest.mark.parametrize(("name", "params"), [
    ("tdx", {"quote_socket": "vsock:2:4050", "mrconfigid": base64.b64encode(bytes(range(48))).decode(),
             "mrowner": base64.b64encode(bytes(48)).decode(), "mrownerconfig": base64.b64encode(bytes(48)).decode()}),
    ("tdx", {"quote_socket": "unix:/var/run/tdx-qgs/qgs.socket"}),
    ("snp", {"host_data": base64.b64encode(bytes(32)).decode(), "author_key": "off",
             "id_block": base64.b64encode(bytes(96)).decode(), "id_auth": base64.b64encode(bytes(4096)).decode()}),
    ("tio", {"host_bdf": "0000:41:00.1"}),
    ("tio", {"host_bdf": "0000:41:00.1", "vfio_backend": "container"}),
])
def test_optional_parameters_pass_the_newest_qemu_parser(newest_qemu: str, name: str,
                                                         params: dict[str, str]) -> None:
    caps = probe_host(qemu=newest_qemu)
    profile, _ = prepare(name, params, caps)
    verdict = check_profile_argv(profile, caps)
    assert verdict.verdict in ("accepted", "needs-hardware"), verdict.message


def test_the_newest_qemu_refuses_what_it_lacks_with_exit_2(cli: Cli, newest_qemu: str) -> None:
    """QEMU 10.2 has no Secure TSC (posted for 10.2, not merged there): exit 2 naming both."""
    caps = probe_host(qemu=newest_qemu)
    if caps.qemu_has_property("sev-snp-guest", "secure-tsc")[0]:
        pytest.skip(f"QEMU {caps.qemu_version.value} has secure-tsc: nothing to refuse")
    proc = subprocess.run(cli.argv("run", "--profile", "snp", "--param", "secure_tsc=on", "--dry-run", "--json"),
                          env={**cli.env(), "HARNESS_QEMU": newest_qemu}, cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "parameter 'secure_tsc'" in line and f"QEMU {caps.qemu_version.value}" in line, line


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


def test_tio_dry_run_requests_iommufd(cli: Cli) -> None:
    proc = cli("run", "--profile", "tio", "--dry-run", "--json", "--param", "host_bdf=0000:41:00.1")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    requested = plan["requested_argv"]
    assert requested[requested.index("iommufd,id=iommufd0") - 1] == "-object"
    assert plan["params"]["vfio_backend"] == "iommufd"
    # The device comes over QMP after boot, with the same iommufd object.
    assert plan["requested_hotplug"] == ["vfio-pci,host=0000:41:00.1,iommufd=iommufd0,id=tio0,bus=hp0,"
                                         f"{plan['params']['tio_flag']}"]
    if plan["effective"] != "tio":
        assert "iommufd" not in " ".join(plan["argv"])  # the emulated twin hot-plugs edu


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


HARDWARE_CHECKS = ("test_memory_encryption_banner_matches_profile", "test_guest_device_node",
                   "test_configfs_tsm_report", "test_configfs_tsm_generation_counts_reports",
                   "test_configfs_tsm_refuses_a_wrong_size_inblob", "test_snp_vmpl_is_readable",
                   "test_tdx_guest_detected", "test_tdx_measurement_registers", "test_lazy_memory_accept")
DMA_PATH_CHECKS = ("test_swiotlb_pool", "test_virtio_negotiated_access_platform",
                   "test_no_encryption_claimed_without_hardware")


def _emulated_cases(cli: Cli, profile: str, *pytest_args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    proc = cli("run", "--profile", profile, "--results", str(cli.results), *pytest_args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    m = meta(run_dir)
    # Where the profile's twin chain ends on this host (tio -> vfio -> tio-emulated without an IOMMU).
    twin = choose_profile(profile, {}, probe_host()).effective.name
    assert (m["profile"]["requested"], m["profile"]["effective"]) == (profile, twin)
    assert f"FELL BACK to {twin}" in proc.stdout
    return m, {c.name: c for suite in JUnitXml.fromfile(str(run_dir / "junit.xml")) for c in suite}


def test_emulated_snp_run_skips_hardware_checks_and_passes_the_dma_path(cli: Cli) -> None:
    if probe_host().sev_snp.value:
        pytest.skip("this host has SNP: the run would not be emulated")
    m, cases = _emulated_cases(cli, "snp")
    assert any("sev_snp" in r for r in m["profile"]["reasons"])
    for name in HARDWARE_CHECKS:
        assert cases[name].is_skipped, name
        message = cases[name].result[0].message
        if name.startswith("test_tdx"):
            assert "is not tdx (coco: snp)" in message, (name, message)
        else:
            assert "emulated run - profile snp fell back to coco-emulated" in message, (name, message)
    for name in DMA_PATH_CHECKS:
        assert cases[name].is_passed, name


@pytest.mark.parametrize("profile", ["sev", "sev-es", "tdx", "tio"])
def test_emulated_coco_runs_skip_every_hardware_check_with_its_reason(cli: Cli, profile: str) -> None:
    """The CoCo suite (and the TIO workflow) of each emulated profile: no CoCo assertion passes."""
    caps = probe_host()
    if choose_profile(profile, {"host_bdf": "0000:41:00.1"} if profile == "tio" else {}, caps).verdict == "runs":
        pytest.skip(f"this host runs {profile} for real: the run would not be emulated")
    _, cases = _emulated_cases(cli, profile, "-k", "test_coco or tio_workflow")
    coco = load_profile(profile).coco
    for name in HARDWARE_CHECKS:
        assert cases[name].is_skipped, name
        message = cases[name].result[0].message
        if name.startswith("test_configfs") and coco in ("sev", "sev-es"):
            assert "no report provider on SEV/SEV-ES" in message, (name, message)
        else:
            assert "emulated run" in message or f"(coco: {coco})" in message, (name, message)
    for name in DMA_PATH_CHECKS:
        assert cases[name].is_passed, name
    if profile == "tio":
        assert cases["test_tio_workflow"].is_passed  # edu hot-plugged into the twin
