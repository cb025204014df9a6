"""Hot-plugging host functions into the guest as vfio-pci (the vfio profile's workflow).

The guest boots without the devices (the SEV-TIO RFC: cold-plugging fails for TIO,
and a run that assigns after boot is the workflow people use). For each
function in `host_bdf` the guest tests then:

- with `vfio_backend=iommufd`: QMP `object-add iommufd` once, kept for the
  VM's life (so the argv of a profile carries nothing a host without
  /dev/iommu would refuse), and
  `device_add vfio-pci,host=BDF,iommufd=iommufd0`; with `container`: the
  legacy /dev/vfio/vfio type1 container, no object;
- each into its own root port, hp4 and on (hp0-hp3 are the hotplug suite's);
- wait until the guest shows the function with the host's vendor:device
  (and, for an NVMe controller, its driver and block device: the DMA suite
  looks for the disk once, it does not wait for it).

These run on the host side of the run (the pytest process), which is the
assigning host: the host's sysfs is read directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qemu.qmp import ExecuteError

from harness.errors import BadInput, InfraError
from harness.guest import GuestChannel
from harness.hostpci import PCI_DEVICES, RealSysfs, Sysfs, inspect, parse_bdfs, vfio_nodes
from harness.hotplug import HotplugFailure, Plugged, plug, unplug
from harness.profiles import Profile
from harness.qmp import QmpChannel
from harness.sysfs import block_devices_of, wait_until

BACKENDS = ("iommufd", "container")
IOMMUFD_ID = "iommufd0"
FIRST_PORT = 4
_NVME_CLASS = "0x010802"


def assigned_bdfs(profile: Profile) -> list[str]:
    """The host functions a vfio-style profile hands to the guest after boot ([] for other profiles)."""
    if profile.param("vfio_backend") is None:
        return []
    return parse_bdfs(profile.param("host_bdf") or "")


def backend(profile: Profile) -> str:
    value = profile.param("vfio_backend") or "iommufd"
    if value not in BACKENDS:
        raise BadInput(f"profile {profile.name}: vfio_backend {value!r}; expected {' or '.join(BACKENDS)}")
    return value


def device_spec(profile: Profile, index: int, bdf: str) -> str:
    """The -device form of one assigned function (what device_add gets)."""
    spec = f"vfio-pci,host={bdf},id=vfio{index},bus=hp{FIRST_PORT + index}"
    return spec + (f",iommufd={IOMMUFD_ID}" if backend(profile) == "iommufd" else "")


@dataclass
class Assigned:
    bdf: str
    spec: str
    vendor: str
    device: str
    plugged: Plugged
    disk: str | None = None


@dataclass
class Assignment:
    """The functions in the guest now, and how long plugging and unplugging took."""

    profile: Profile
    host: Sysfs
    devices: list[Assigned] = field(default_factory=list)
    plug_seconds: float = 0.0
    unplug_seconds: float = 0.0

    def holders(self, bdf: str) -> list[int]:
        """Processes (QEMU) holding the host function's vfio nodes: proof it is really assigned."""
        return self.host.holders(vfio_nodes(self.host, inspect(self.host, bdf)))


def plug_all(qmp: QmpChannel, guest: GuestChannel, profile: Profile, host: Sysfs | None = None,
             timeout: float = 60.0) -> Assignment:
    """Hot-plug every function of `host_bdf`. Raises InfraError (QEMU refused) or HotplugFailure."""
    done = Assignment(profile, host or RealSysfs())
    bdfs = assigned_bdfs(profile)
    if len(bdfs) > profile.hotplug_ports - FIRST_PORT:
        raise BadInput(f"profile {profile.name}: {len(bdfs)} functions in host_bdf, but only "
                       f"{profile.hotplug_ports - FIRST_PORT} root ports for them")
    start = time.monotonic()
    if backend(profile) == "iommufd" and bdfs and not _has_object(qmp, IOMMUFD_ID):
        try:
            qmp.execute("object-add", {"qom-type": "iommufd", "id": IOMMUFD_ID})
        except ExecuteError as e:
            raise InfraError(f"QEMU refused object-add iommufd (no /dev/iommu on the host? "
                             f"use --param vfio_backend=container): {e}") from None
    for i, bdf in enumerate(bdfs):
        dev = f"{PCI_DEVICES}/{bdf}"
        vendor, device = done.host.read(f"{dev}/vendor"), done.host.read(f"{dev}/device")
        if vendor is None or device is None:
            raise BadInput(f"host_bdf {bdf}: not on this host")
        nvme = done.host.read(f"{dev}/class") == _NVME_CLASS
        spec = device_spec(profile, i, bdf)
        plugged = plug(qmp, guest, spec, vendor, device, driver="nvme" if nvme else None, timeout=timeout)
        item = Assigned(bdf, spec, vendor, device, plugged)
        done.devices.append(item)
        if nvme:
            item.disk = _wait_disk(guest, plugged.device.bdf, timeout)
            if item.disk is None:
                raise HotplugFailure(f"assigned NVMe {bdf} (guest {plugged.device.bdf}) got no block device "
                                     f"within {timeout:.0f} s")
    done.plug_seconds = time.monotonic() - start
    return done


def _wait_disk(guest: GuestChannel, bdf: str, timeout: float) -> str | None:
    """/dev/<name> of the guest function's block device once it is usable, or None at the deadline."""
    names: list[str] = []

    def ready() -> bool:
        names[:] = block_devices_of(guest, bdf)
        return bool(names) and guest.run(f"test -b /dev/{names[0]}").ok

    return f"/dev/{names[0]}" if wait_until(ready, timeout) else None


def unplug_all(qmp: QmpChannel, guest: GuestChannel, done: Assignment, timeout: float = 60.0) -> None:
    """device_del each function: DEVICE_DELETED, then gone from the guest."""
    start = time.monotonic()
    while done.devices:
        plugged = done.devices[-1].plugged
        # The guest's driver lets go first, while the function is still fully there: what a
        # careful user does before handing a device back, and the eject then has no driver to
        # wait for.
        guest.run(f"d={plugged.device.path}; [ -e $d/driver ] && echo {plugged.device.bdf} > $d/driver/unbind",
                  timeout=timeout)
        unplug(qmp, guest, plugged, timeout=timeout)
        done.devices.pop()
    done.unplug_seconds = time.monotonic() - start


def _has_object(qmp: QmpChannel, object_id: str) -> bool:
    """Whether /objects/<id> exists. The iommufd object stays for the VM's life once added:
    deleting and re-adding it between plug cycles is not what users do, and was not reliable here."""
    children = qmp.execute("qom-list", {"path": "/objects"})
    return any(child.get("name") == object_id for child in children)
