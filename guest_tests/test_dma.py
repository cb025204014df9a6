"""DMA through the guest's DMA API with data verification (dmastress).

NVMe and virtio-blk scratch disks; several threads; sizes that cross pages and
2 KiB swiotlb slots. Under swiotlb=force (the CoCo twins) every transfer
bounces, and the swiotlb high-water mark shows it.
"""

from __future__ import annotations

import re

import pytest

from harness.guest import GuestChannel
from harness.machine import Machine
from harness.pytest_plugin import RunInfo
from harness.sysfs import block_devices_of, find_pci, swiotlb_stats

# virtio-blk is 1af4:1042 modern-only (disable-legacy=on), 1af4:1001 transitional.
DEVICES = {"nvme": [("0x1b36", "0x0010")], "virtio-blk": [("0x1af4", "0x1042"), ("0x1af4", "0x1001")]}
SUMMARY = re.compile(r"dmastress: dev=\S+ threads=(\d+) ops=(\d+) bytes=(\d+) corrupt=(\d+) errors=(\d+) "
                     r"seconds=([\d.]+) MBps=([\d.]+)")


def disk(guest: GuestChannel, kind: str) -> str:
    """/dev/<name> of the profile's scratch disk of this kind (skips if there is none)."""
    for dev in [d for ids in DEVICES[kind] for d in find_pci(guest, *ids)]:
        names = block_devices_of(guest, dev.bdf)
        if names:
            return f"/dev/{names[0]}"
    pytest.skip(f"no {kind} disk in this guest: the profile adds none")


def parse_summary(output: str) -> dict[str, float]:
    m = SUMMARY.search(output)
    assert m, f"no dmastress summary in: {output[-300:]}"
    keys = ("threads", "ops", "bytes", "corrupt", "errors", "seconds", "MBps")
    return {k: float(v) for k, v in zip(keys, m.groups(), strict=True)}


@pytest.mark.parametrize("kind", sorted(DEVICES))
@pytest.mark.parametrize("threads", [1, 4])
def test_dma_stress_verifies(guest: GuestChannel, run_info: RunInfo, kind: str, threads: int,
                             record_property: pytest.RecordProperty) -> None:
    dev = disk(guest, kind)
    before = swiotlb_stats(guest)
    if "io_tlb_used_hiwater" in before:
        guest.check("echo 0 > /sys/kernel/debug/swiotlb/io_tlb_used_hiwater")
    result = guest.run(f"dmastress -d {dev} -t {threads} -n 32 -r 4194304", timeout=180)
    figures = parse_summary(result.stdout)
    # Workload figures for `harness compare` (one name per device and thread count).
    record_property(f"dma_{kind}_t{threads}_MBps", figures["MBps"])
    record_property(f"dma_{kind}_t{threads}_seconds", figures["seconds"])
    corrupt = [line for line in result.stdout.splitlines() if line.startswith("CORRUPT")]
    assert not corrupt, f"{dev}: data corrupted: {corrupt[:3]}"
    assert result.exit_code == 0 and figures["errors"] == 0, result.stderr or result.stdout
    assert "swiotlb buffer is full" not in guest.check("dmesg")
    after = swiotlb_stats(guest)
    forced = "swiotlb=force" in (run_info.cmdline or "").split()
    if forced and "io_tlb_used_hiwater" in after:
        record_property("swiotlb_hiwater_slabs", after["io_tlb_used_hiwater"])
        assert after["io_tlb_used_hiwater"] > 0, "swiotlb=force, yet no DMA bounced through the pool"


def test_dma_verify_detects_corruption_behind_the_guests_back(guest: GuestChannel, machine: Machine) -> None:
    dev = disk(guest, "virtio-blk")
    assert machine.sock_dir is not None
    image = machine.sock_dir / "vblk0.img"
    guest.check(f"dmastress -d {dev} -t 1 -n 8 -s 4096 -m write", timeout=60)
    # 512 bytes at 8 KiB change under the guest, as a faulty DMA would leave them.
    # (QEMU reads the image through the host page cache: cache.direct=off.)
    with open(image, "r+b") as f:
        f.seek(8192)
        f.write(b"\x5a" * 512)
    result = guest.run(f"dmastress -d {dev} -t 1 -n 8 -s 4096 -m verify", timeout=60)
    assert result.exit_code == 1
    offsets = re.findall(r"CORRUPT offset=0x([0-9a-f]+)", result.stdout)
    assert offsets and int(offsets[0], 16) == 8192, result.stdout[-500:]
    assert parse_summary(result.stdout)["corrupt"] == 512 / 8
