"""Confidential-computing checks: what a CoCo guest must show, and its DMA path.

Hardware assertions (encryption banner, guest devices, attestation reports)
skip with the reason on an emulated run; they never pass there. The DMA-path
checks (swiotlb pool, bouncing, VIRTIO_F_ACCESS_PLATFORM) run for real on the
emulated twins, which reproduce a CoCo guest's DMA path with swiotlb=force.
"""

from __future__ import annotations

import base64
import re

import pytest

from harness.guest import GuestChannel
from harness.pytest_plugin import RunInfo

BANNER = re.compile(r"Memory Encryption Features active: (.*)")
EXPECTED_WORDS = {"sev": ["AMD", "SEV"], "sev-es": ["AMD", "SEV", "SEV-ES"],
                  "snp": ["AMD", "SEV", "SEV-ES", "SEV-SNP"], "tdx": ["Intel", "TDX"]}
SWIOTLB = "/sys/kernel/debug/swiotlb"
VIRTIO_F_ACCESS_PLATFORM = 33


def _banner(dmesg_lines: list[str]) -> str | None:
    for line in dmesg_lines:
        m = BANNER.search(line)
        if m:
            return m.group(1).strip()
    return None


def _cmdline(guest: GuestChannel) -> list[str]:
    return guest.read_text("/proc/cmdline").split()


def _dma_path_is_coco(run_info: RunInfo) -> bool:
    return run_info.coco != "none" or "swiotlb=force" in (run_info.cmdline or "").split()


def test_memory_encryption_banner_matches_profile(dmesg_lines: list[str], run_info: RunInfo) -> None:
    run_info.require_coco("sev", "sev-es", "snp", "tdx", what="memory-encryption banner")
    banner = _banner(dmesg_lines)
    assert banner is not None, "no 'Memory Encryption Features active' line in dmesg"
    words = banner.split()
    assert all(w in words for w in EXPECTED_WORDS[run_info.coco]), banner
    if run_info.coco == "sev":
        assert "SEV-ES" not in words, banner


def test_no_encryption_claimed_without_hardware(dmesg_lines: list[str], run_info: RunInfo) -> None:
    if run_info.coco != "none":
        pytest.skip(f"profile {run_info.profile} is a confidential guest")
    assert _banner(dmesg_lines) is None, "an unencrypted guest claims memory encryption"


def test_guest_device_node(guest: GuestChannel, run_info: RunInfo) -> None:
    run_info.require_coco("snp", "tdx", what="guest attestation device")
    node = {"snp": "/dev/sev-guest", "tdx": "/dev/tdx_guest"}[run_info.coco]
    assert guest.run(f"test -c {node}").ok, f"{node} missing"


def test_snp_vmpl_is_readable(guest: GuestChannel, run_info: RunInfo) -> None:
    run_info.require_coco("snp", what="SNP VMPL")
    path = "/sys/devices/system/cpu/sev/vmpl"
    if not guest.run(f"test -e {path}").ok:
        pytest.skip(f"kernel {run_info.kernel_release} has no {path}")
    assert guest.read_text(path).strip().isdigit()


REPORT = "/sys/kernel/config/tsm/report"
PROVIDER = {"snp": "sev_guest", "tdx": "tdx_guest"}
# TSM_REPORT_INBLOB_MAX (include/linux/tsm.h): user data for the report, 64 bytes.
INBLOB_MAX = 64


def _report_dir(guest: GuestChannel, run_info: RunInfo, what: str) -> str:
    """A fresh configfs-tsm report directory, or a skip saying why there cannot be one.

    Only SNP (sev_guest) and TDX (tdx_guest) register a report provider: on SEV
    and SEV-ES creating a report fails with ENXIO (drivers/virt/coco/guest/report.c).
    """
    if run_info.requested_coco in ("sev", "sev-es"):
        pytest.skip(f"{what}: no report provider on SEV/SEV-ES (only sev_guest on SNP and tdx_guest on TDX "
                    f"register one; profile {run_info.profile})")
    run_info.require_coco("snp", "tdx", what=what)
    if not guest.run(f"test -d {REPORT}").ok:
        pytest.skip(f"kernel {run_info.kernel_release} has no configfs-tsm (CONFIG_TSM_REPORTS, 6.7+)")
    path = f"{REPORT}/harness{guest.check('echo $$').strip()}"
    guest.check(f"mkdir {path}")
    return path


def _quote_service(run_info: RunInfo) -> str:
    plan = run_info.require_plan("attestation quote")
    return plan.requested_profile.param("quote_socket") or ""


def test_configfs_tsm_report(guest: GuestChannel, run_info: RunInfo) -> None:
    path = _report_dir(guest, run_info, "configfs-tsm attestation report")
    try:
        guest.check(f"head -c {INBLOB_MAX} /dev/urandom > {path}/inblob")
        provider = guest.read_text(f"{path}/provider").strip()
        assert provider == PROVIDER[run_info.coco], provider
        if run_info.coco == "tdx" and not _quote_service(run_info):
            # QEMU answers GetQuote with QGS_UNAVAILABLE: the outblob stays empty.
            pytest.skip("TDX quote: profile tdx has no quote_socket (no quote-generation service on the "
                        "host), so the outblob is empty by design; pass --param quote_socket=vsock:2:4050")
        size = int(guest.check(f"wc -c < {path}/outblob").strip())
        assert size > 0, "empty attestation report"
    finally:
        guest.run(f"rmdir {path}")


def test_configfs_tsm_generation_counts_reports(guest: GuestChannel, run_info: RunInfo) -> None:
    path = _report_dir(guest, run_info, "configfs-tsm generation")
    try:
        if not guest.run(f"test -r {path}/generation").ok:
            pytest.skip(f"kernel {run_info.kernel_release} has no configfs-tsm generation attribute")
        counts = []
        for _ in range(2):
            guest.check(f"head -c {INBLOB_MAX} /dev/urandom > {path}/inblob")
            counts.append(int(guest.read_text(f"{path}/generation").strip()))
        assert counts[1] == counts[0] + 1, f"generation {counts}: each inblob write is a new report"
    finally:
        guest.run(f"rmdir {path}")


def test_configfs_tsm_refuses_a_wrong_size_inblob(guest: GuestChannel, run_info: RunInfo) -> None:
    path = _report_dir(guest, run_info, "configfs-tsm inblob size")
    try:
        too_big = guest.run(f"head -c {INBLOB_MAX + 1} /dev/zero > {path}/inblob")
        assert not too_big.ok, f"a {INBLOB_MAX + 1}-byte inblob was accepted"
        # SNP and TDX take exactly 64 bytes of report data: a shorter one gets no report.
        guest.check(f"head -c 32 /dev/zero > {path}/inblob")
        short = guest.run(f"cat {path}/outblob > /dev/null")
        assert not short.ok, "a report was produced for a 32-byte inblob"
    finally:
        guest.run(f"rmdir {path}")


def test_tdx_guest_detected(dmesg_lines: list[str], guest: GuestChannel, run_info: RunInfo) -> None:
    run_info.require_coco("tdx", what="TDX guest detection")
    assert any("tdx: Guest detected" in line for line in dmesg_lines), "no 'tdx: Guest detected' in dmesg"
    flags = next((line for line in guest.read_text("/proc/cpuinfo").splitlines() if line.startswith("flags")), "")
    assert "tdx_guest" in flags.split(), "no tdx_guest flag in /proc/cpuinfo"


MEASUREMENTS = "/sys/class/misc/tdx_guest/measurements"


def test_tdx_measurement_registers(guest: GuestChannel, run_info: RunInfo) -> None:
    run_info.require_coco("tdx", what="TDX measurement registers")
    if not guest.run(f"test -d {MEASUREMENTS}").ok:
        pytest.skip(f"kernel {run_info.kernel_release} has no {MEASUREMENTS} (TSM_MEASUREMENTS, 6.16+)")
    listing = guest.check(f"cd {MEASUREMENTS} && for f in *; do echo $f $(wc -c < $f); done")
    sizes = dict(line.split() for line in listing.splitlines() if line.strip())
    for reg in ("mrtd:sha384", "rtmr0:sha384", "rtmr1:sha384", "rtmr2:sha384", "rtmr3:sha384"):
        assert sizes.get(reg) == "48", f"{reg}: {sizes.get(reg)} bytes (SHA384 is 48)"
    want = run_info.require_plan("mrconfigid").requested_profile.param("mrconfigid")
    if want and "mrconfigid" in sizes:
        got = guest.check(f"od -An -v -tx1 {MEASUREMENTS}/mrconfigid").split()
        assert bytes.fromhex("".join(got)) == base64.b64decode(want), "MRCONFIGID differs from the profile's"


def test_lazy_memory_accept(guest: GuestChannel, run_info: RunInfo) -> None:
    """TDX and SNP guests accept memory on first use (accept_memory=lazy, the default)."""
    run_info.require_coco("tdx", "snp", what="lazy memory accept")
    cmdline = _cmdline(guest)
    if "accept_memory=eager" in cmdline:
        pytest.skip("accept_memory=eager on the command line: everything was accepted at boot")
    vmstat = dict(line.split() for line in guest.read_text("/proc/vmstat").splitlines() if line.strip())
    if "nr_unaccepted" not in vmstat:
        pytest.skip(f"kernel {run_info.kernel_release} has no nr_unaccepted (CONFIG_UNACCEPTED_MEMORY, 6.5+)")
    meminfo = guest.read_text("/proc/meminfo")
    assert re.search(r"^Unaccepted:\s+\d+ kB", meminfo, re.M), "nr_unaccepted without Unaccepted in /proc/meminfo"
    assert int(vmstat["nr_unaccepted"]) >= 0


def test_swiotlb_pool(guest: GuestChannel, run_info: RunInfo) -> None:
    if not _dma_path_is_coco(run_info):
        pytest.skip(f"profile {run_info.profile} does not use the CoCo DMA path")
    if not guest.run(f"test -r {SWIOTLB}/io_tlb_nslabs").ok:
        pytest.skip(f"kernel {run_info.kernel_release} has no {SWIOTLB} (CONFIG_DEBUG_FS)")
    slabs = int(guest.read_text(f"{SWIOTLB}/io_tlb_nslabs"))
    mib = slabs * 2048 // (1 << 20)  # IO_TLB_SHIFT: 2 KiB slabs
    if run_info.coco != "none":
        # Protected guests size the pool at 6% of RAM, clamped to [64 MiB, 1 GiB].
        assert 64 <= mib <= 1024, f"swiotlb pool {mib} MiB"
    else:
        assert "swiotlb=force" in _cmdline(guest)
        assert mib >= 64, f"swiotlb pool {mib} MiB"


def test_virtio_negotiated_access_platform(guest: GuestChannel, run_info: RunInfo) -> None:
    if not _dma_path_is_coco(run_info):
        pytest.skip(f"profile {run_info.profile} does not use the CoCo DMA path")
    listing = guest.check("for d in /sys/bus/virtio/devices/*; do "
                          "[ -e $d/features ] && echo $(basename $d) $(cat $d/features); done").split("\n")
    features = dict(line.split() for line in listing if line.strip())
    if not features:
        pytest.skip(f"profile {run_info.profile} has no virtio device bound in the guest")
    lacking = [dev for dev, bits in features.items()
               if len(bits) <= VIRTIO_F_ACCESS_PLATFORM or bits[VIRTIO_F_ACCESS_PLATFORM] != "1"]
    assert not lacking, f"virtio devices without VIRTIO_F_ACCESS_PLATFORM: {lacking}"


def test_dma_bounces_through_swiotlb(guest: GuestChannel, run_info: RunInfo) -> None:
    if not _dma_path_is_coco(run_info):
        pytest.skip(f"profile {run_info.profile} does not use the CoCo DMA path")
    if not guest.run("test -c /dev/hwrng").ok or guest.read_text(
            "/sys/class/misc/hw_random/rng_current").strip() == "none":
        pytest.skip("no virtio-rng bound: nothing to drive DMA with")
    hiwater = f"{SWIOTLB}/io_tlb_used_hiwater"
    has_hiwater = guest.run(f"test -r {hiwater}").ok
    if has_hiwater:
        guest.check(f"echo 0 > {hiwater}")
    got = int(guest.check("dd if=/dev/hwrng bs=64 count=64 2>/dev/null | wc -c").strip())
    assert got == 4096, f"read {got} bytes from virtio-rng"
    dmesg = guest.check("dmesg")
    assert "swiotlb buffer is full" not in dmesg
    if not has_hiwater:
        pytest.skip(f"virtio-rng DMA worked, but kernel {run_info.kernel_release} has no "
                    f"{hiwater} (6.7+) to prove it bounced")
    assert int(guest.read_text(hiwater)) > 0, "DMA did not go through the swiotlb pool"
