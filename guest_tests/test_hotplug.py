"""PCI hotplug sequences driven through QMP: edu, NVMe, virtio-blk; unplug under
DMA; guest-initiated remove and rescan; the TIO workflow of AMD's SEV-TIO RFC
(connect on the host, boot without the device, hot-plug it, enable it, use it).

Whether QEMU uses ACPI or native PCIe hotplug is the profile's choice
(emulated: ACPI; emulated-pciehp: native, with its 5 s attention-button delay,
which `unplug` cuts short from the guest except in the first edu cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.guest import GuestChannel
from harness.hotplug import TioStep, connect_host_device, device_args, plug, unplug
from harness.machine import Machine
from harness.pytest_plugin import RunInfo
from harness.qmp import QmpChannel
from harness.sysfs import block_devices_of, find_pci, path_exists, slots, wait_until

EDU = ("0x1234", "0x11e8")
NVME = ("0x1b36", "0x0010")
# Behind a PCIe root port virtio-pci is modern-only (disable-legacy=auto): 1af4:1042.
VIRTIO_BLK = ("0x1af4", "0x1042")


def _add_disk(machine: Machine, qmp: QmpChannel, node: str, size: int = 32 << 20) -> None:
    assert machine.sock_dir is not None
    image = machine.sock_dir / f"{node}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    qmp.execute("blockdev-add", {"driver": "file", "node-name": node, "filename": str(image)})


def _wait_disk(guest: GuestChannel, bdf: str) -> str:
    names: list[str] = []

    def ready() -> bool:
        names[:] = block_devices_of(guest, bdf)
        return bool(names) and guest.run(f"test -b /dev/{names[0]}").ok

    assert wait_until(ready, 30), f"no block device appeared for {bdf}"
    return f"/dev/{names[0]}"


def _slot_of(guest: GuestChannel, bdf: str) -> dict[str, str]:
    """The hotplug slot (ACPI or pciehp) whose address is the device's bus."""
    found = [s for s in slots(guest).values() if s.get("address") == bdf.rsplit(".", 1)[0]]
    assert found, f"no hotplug slot for {bdf}"
    return found[0]


def test_edu_hotplug_cycles(guest: GuestChannel, qmp: QmpChannel, hotplug_cycles: int) -> None:
    for cycle in range(hotplug_cycles):
        plugged = plug(qmp, guest, f"edu,id=hpedu{cycle},bus=hp1", *EDU)
        slot = _slot_of(guest, plugged.device.bdf)
        assert (slot["power"], slot["adapter"]) == ("1", "1"), slot
        guest.check(f"echo 1 > {plugged.device.path}/enable")
        assert guest.check(f"pcimem {plugged.device.resource(0)} 0").strip() == "0x0000: 0x010000ED", cycle
        # The first cycle lets native hotplug (pciehp) wait out its 5 s attention-button window;
        # later ones power the slot off from the guest as soon as the button press is taken.
        unplug(qmp, guest, plugged, prompt=cycle > 0)
        slot = _slot_of(guest, plugged.device.bdf)
        assert (slot["power"], slot["adapter"]) == ("0", "0"), slot


@pytest.mark.parametrize("kind", ["nvme", "virtio-blk"])
def test_disk_hotplug_with_dma(machine: Machine, guest: GuestChannel, qmp: QmpChannel, kind: str) -> None:
    virtio_opts = machine.plan.profile.param("virtio_opts") or ""
    for cycle in range(2):
        node = f"hp{kind.replace('-', '')}{cycle}"
        _add_disk(machine, qmp, node)
        if kind == "nvme":
            plugged = plug(qmp, guest, f"nvme,id=dev{node},serial={node},drive={node},bus=hp2", *NVME,
                           driver="nvme")
        else:
            plugged = plug(qmp, guest, f"virtio-blk-pci,id=dev{node},drive={node},bus=hp3{virtio_opts}",
                           *VIRTIO_BLK, driver="virtio-pci")
        dev = _wait_disk(guest, plugged.device.bdf)
        result = guest.run(f"dmastress -d {dev} -t 2 -n 16 -r 2097152", timeout=120)
        assert result.exit_code == 0, result.stdout[-400:] + result.stderr[-400:]
        unplug(qmp, guest, plugged)
        qmp.execute("blockdev-del", {"node-name": node})


@pytest.mark.dmesg_allow("io-error", "nvme", reason="its disk is unplugged under it: I/O errors are the point")
def test_unplug_during_dma(machine: Machine, guest: GuestChannel, qmp: QmpChannel, run_info: RunInfo) -> None:
    _add_disk(machine, qmp, "hpbusy")
    plugged = plug(qmp, guest, "nvme,id=devbusy,serial=busy,drive=hpbusy,bus=hp2", *NVME, driver="nvme")
    dev = _wait_disk(guest, plugged.device.bdf)
    guest.check(f"(dmastress -d {dev} -t 4 -n 100000 -r 4194304 > /tmp/busy.log 2>&1; echo $? > /tmp/busy.rc) &")
    assert wait_until(lambda: "dmastress" in guest.check("ps"), 10), "dmastress did not start"
    # Unplug once its DMA is under way: the disk has completed reads and writes. NVMe counts
    # them on the path device (nvme0c0n1), not on the multipath head that dmastress opens.
    def busy() -> bool:
        out = guest.run(f"cat {plugged.device.path}/nvme/nvme*/nvme*n*/stat").stdout
        return any(int(line.split()[0]) and int(line.split()[4]) for line in out.splitlines() if line.strip())

    assert wait_until(busy, 10), "dmastress did no I/O"
    unplug(qmp, guest, plugged, timeout=run_info.deadline(60))
    # The workload must end (with I/O errors: its disk is gone) and the guest must stay healthy.
    assert wait_until(lambda: guest.run("test -s /tmp/busy.rc").ok, run_info.deadline(60)), \
        "dmastress hung after the unplug"
    assert guest.check("echo alive").strip() == "alive"
    qmp.execute("blockdev-del", {"node-name": "hpbusy"})


def test_remove_and_rescan(guest: GuestChannel) -> None:
    found = find_pci(guest, *EDU)
    if not found:
        pytest.skip("no cold-plugged edu device to remove and rescan")
    dev = found[0]
    guest.check(f"echo 1 > {dev.path}/remove")
    assert wait_until(lambda: not path_exists(guest, dev.path), 10), "removed function still in sysfs"
    guest.check("echo 1 > /sys/bus/pci/rescan")
    assert wait_until(lambda: path_exists(guest, dev.path), 10), "rescan did not find the function again"
    again = [d for d in find_pci(guest, *EDU) if d.bdf == dev.bdf]
    assert again and (again[0].vendor, again[0].device) == EDU


def test_tio_workflow(machine: Machine, guest: GuestChannel, qmp: QmpChannel, run_info: RunInfo,
                      record_property: Callable[[str, object], None]) -> None:
    """Connect the host device to the TSM, hot-plug it after boot, enable it, poke its BAR.

    Each host step and its state goes into the run's test record (`tio_steps`).
    """
    specs = machine.plan.profile.hotplug
    if not specs:
        pytest.skip(f"profile {run_info.profile} hot-plugs no device after boot (tio and tio-emulated do)")
    args = device_args(specs[0])
    if args["driver"] == "vfio-pci":
        # Linux 6.19 PCI TSM: connect before QEMU maps the device; recorded either way.
        bdf = str(args["host"])
        steps = connect_host_device(bdf)
        ids = tuple(Path(f"/sys/bus/pci/devices/{bdf}/{f}").read_text().strip() for f in ("vendor", "device"))
    else:
        steps = [TioStep("host PCI TSM", f"not used: profile {run_info.profile} hot-plugs an emulated "
                                         f"{args['driver']} device")]
        ids = EDU
    record_property("tio_steps", [step.to_json() for step in steps])
    plugged = plug(qmp, guest, specs[0], ids[0], ids[1])
    guest.check(f"echo 1 > {plugged.device.path}/enable")
    if args["driver"] != "edu":
        unplug(qmp, guest, plugged)
        pytest.skip(f"TIO device {args['driver']} {ids[0]}:{ids[1]} plugged and enabled; its register map is "
                    "the lab's: run a device test for its BARs")
    enc = plugged.device.resource(0, enc=True)
    target = enc if path_exists(guest, enc) else plugged.device.resource(0)
    assert guest.check(f"pcimem {target} 0 w*4").splitlines()[0] == "0x0000: 0x010000ED"
    unplug(qmp, guest, plugged)
