"""Confidential-computing checks: what a CoCo guest must show, and its DMA path.

Hardware assertions (encryption banner, guest devices, attestation reports)
skip with the reason on an emulated run; they never pass there. The DMA-path
checks (swiotlb pool, bouncing, VIRTIO_F_ACCESS_PLATFORM) run for real on the
emulated twins, which reproduce a CoCo guest's DMA path with swiotlb=force.
"""

from __future__ import annotations

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


def test_configfs_tsm_report(guest: GuestChannel, run_info: RunInfo) -> None:
    run_info.require_coco("sev", "sev-es", "snp", "tdx", what="configfs-tsm attestation report")
    if not guest.run("test -d /sys/kernel/config/tsm/report").ok:
        pytest.skip(f"kernel {run_info.kernel_release} has no configfs-tsm (CONFIG_TSM_REPORTS, 6.7+)")
    guest.check("mkdir /sys/kernel/config/tsm/report/r0")
    try:
        guest.check("head -c 64 /dev/urandom > /sys/kernel/config/tsm/report/r0/inblob")
        size = int(guest.check("wc -c < /sys/kernel/config/tsm/report/r0/outblob").strip())
        provider = guest.read_text("/sys/kernel/config/tsm/report/r0/provider").strip()
    finally:
        guest.run("rmdir /sys/kernel/config/tsm/report/r0")
    assert size > 0
    assert provider == {"tdx": "tdx_guest"}.get(run_info.coco, "sev_guest")


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
