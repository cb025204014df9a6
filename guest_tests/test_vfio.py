"""Device assignment (the vfio profile): the host's own functions, in the guest.

The session fixture `assignment` (conftest.py) has hot-plugged every function
of `host_bdf` as vfio-pci after boot. These tests check that what the guest
drives is the host's function itself (QEMU holds its vfio nodes on the host),
read edu's identification register through the assigned BAR, verify DMA on an
assigned NVMe (through the host IOMMU's mapping), and hot-unplug each
function (last). Other profiles assign nothing: the tests skip, saying so.
"""

from __future__ import annotations

import re

import pytest

from harness.assign import Assignment, unplug_all
from harness.guest import GuestChannel
from harness.hostpci import VFIO_DRIVER, inspect
from harness.pytest_plugin import RunInfo
from harness.qmp import QmpChannel
from harness.sysfs import find_pci, path_exists

EDU = ("0x1234", "0x11e8")


@pytest.fixture
def assigned(assignment: Assignment | None, run_info: RunInfo) -> Assignment:
    if assignment is None:
        pytest.skip(f"profile {run_info.profile} assigns no host function (vfio does, with --param host_bdf=...)")
    return assignment


def test_assigned_functions_are_the_hosts(assigned: Assignment, guest: GuestChannel,
                                          record_property: pytest.RecordProperty) -> None:
    record_property("vfio_plug_seconds", round(assigned.plug_seconds, 3))
    for item in assigned.devices:
        host = inspect(assigned.host, item.bdf)
        assert host.driver == VFIO_DRIVER, host.describe()
        assert assigned.holders(item.bdf), f"no process holds {item.bdf}'s vfio nodes: it is not assigned"
        seen = [d for d in find_pci(guest, item.vendor, item.device) if d.bdf == item.plugged.device.bdf]
        assert seen, f"guest lost {item.bdf} (guest {item.plugged.device.bdf})"


def test_assigned_edu_id_register_through_the_bar(assigned: Assignment, guest: GuestChannel) -> None:
    edus = [a for a in assigned.devices if (a.vendor, a.device) == EDU]
    if not edus:
        pytest.skip("no edu among the assigned functions: its register map is the one this test knows")
    for item in edus:
        dev = item.plugged.device
        guest.check(f"echo 1 > {dev.path}/enable")
        assert guest.check(f"pcimem {dev.resource(0)} 0").strip() == "0x0000: 0x010000ED", item.bdf
        # The liveness register inverts what is written: a real round trip, not a cached value.
        assert guest.check(f"pcimem {dev.resource(0)} 0x4 w 0x0badcafe").strip() == \
            "Written 0x0BADCAFE; readback 0xF4523501"


def test_assigned_nvme_dma_verifies(assigned: Assignment, guest: GuestChannel, vfio_dma_ops: int,
                                    record_property: pytest.RecordProperty) -> None:
    disks = [a for a in assigned.devices if a.disk]
    if not disks:
        pytest.skip("no NVMe controller among the assigned functions")
    for item in disks:
        # Two threads, each over its own 16 MiB, 1 MiB transfers and ones that
        # cross pages, written and read back: at least 16 MiB through the guest's
        # DMA API, QEMU's vfio mapping and the host IOMMU.
        result = guest.run(f"dmastress -d {item.disk} -t 2 -n {vfio_dma_ops} -s 1048576,4608 -r 16777216",
                           timeout=300 + vfio_dma_ops // 10)
        m = re.search(r"bytes=(\d+) corrupt=(\d+) errors=(\d+) seconds=([\d.]+) MBps=([\d.]+)", result.stdout)
        assert m, result.stdout[-400:] + result.stderr[-400:]
        assert result.exit_code == 0 and m.group(2) == "0" and m.group(3) == "0", result.stdout[-400:]
        assert int(m.group(1)) >= 16 << 20, f"only {m.group(1)} bytes moved"
        record_property("vfio_nvme_MBps", float(m.group(5)))
        record_property("vfio_nvme_bytes", int(m.group(1)))


def test_hot_unplug_gives_the_host_function_back(assigned: Assignment, guest: GuestChannel, qmp: QmpChannel,
                                               record_property: pytest.RecordProperty) -> None:
    """Last in the session: the functions go back to the host side (the run then restores them)."""
    paths = [a.plugged.device.path for a in assigned.devices]
    bdfs = [a.bdf for a in assigned.devices]
    unplug_all(qmp, guest, assigned)
    record_property("vfio_unplug_seconds", round(assigned.unplug_seconds, 3))
    assert not any(path_exists(guest, p) for p in paths)
    for bdf in bdfs:
        # QEMU closed the function's vfio nodes; it stays on vfio-pci until the run restores it.
        assert not assigned.holders(bdf), f"{bdf} still held after device_del"
        assert inspect(assigned.host, bdf).driver == VFIO_DRIVER
