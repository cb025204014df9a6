"""PCI hotplug through QMP, with the guest's view checked at every step.

device_add into a free pcie-root-port; the guest must show the function in
sysfs (with its driver, where one is expected); device_del only *requests*
removal: completion is the DEVICE_DELETED event, after which the guest must
have forgotten the function. DEVICE_UNPLUG_GUEST_ERROR is the guest refusing.
Every wait has a deadline; a device the guest never shows (or never lets go)
is a kernel failure, a command QEMU rejects is an infrastructure error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qemu.qmp import ExecuteError

from harness.errors import InfraError, KernelFault
from harness.guest import GuestChannel
from harness.qmp import QmpChannel
from harness.sysfs import PciDevice, path_exists, pci_devices, wait_until

_INT_TYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size"}


class HotplugFailure(KernelFault):
    """The guest did not show, or did not release, a hot-plugged device in time."""


def device_args(spec: str, types: dict[str, str] | None = None) -> dict[str, Any]:
    """`edu,id=x,bus=hp0,x-tio=on` (the -device syntax) -> QMP device_add arguments.

    QMP is strictly typed (a bool property wants true, an OnOffAuto one "on"):
    `types` maps property names to QOM types, as device-list-properties reports.
    """
    driver, *props = spec.split(",")
    args: dict[str, Any] = {"driver": driver}
    for prop in props:
        key, _, value = prop.partition("=")
        kind = (types or {}).get(key, "str")
        if kind == "bool":
            args[key] = value in ("on", "true", "yes", "")
        elif kind in _INT_TYPES and value.lstrip("-").isdigit():
            args[key] = int(value, 0)
        else:
            args[key] = value
    return args


def property_types(qmp: QmpChannel, driver: str) -> dict[str, str]:
    try:
        props = qmp.execute("device-list-properties", {"typename": driver})
    except ExecuteError as e:
        raise InfraError(f"QEMU does not know device {driver!r}: {e}") from None
    return {p["name"]: p["type"] for p in props}


@dataclass
class Plugged:
    id: str
    device: PciDevice


def plug(qmp: QmpChannel, guest: GuestChannel, spec: str, vendor: str, device: str,
         driver: str | None = None, timeout: float = 30.0) -> Plugged:
    """device_add `spec`; wait for a new vendor:device function (and its driver) in the guest."""
    args = device_args(spec, property_types(qmp, spec.split(",", 1)[0]))
    if "id" not in args:
        raise InfraError(f"hotplug {spec!r}: needs an id= to be unplugged again")
    before = {d.bdf for d in pci_devices(guest)}
    try:
        qmp.execute("device_add", args)
    except ExecuteError as e:
        raise InfraError(f"QEMU refused device_add {spec!r}: {e}") from None
    found: list[PciDevice] = []

    def appeared() -> bool:
        found[:] = [d for d in pci_devices(guest) if d.bdf not in before and (d.vendor, d.device) == (vendor, device)
                    and (driver is None or d.driver == driver)]
        return bool(found)

    if not wait_until(appeared, timeout, 0.25):
        want = f"{vendor}:{device}" + (f" bound to {driver}" if driver else "")
        raise HotplugFailure(
            f"hot-plugged {args['driver']} ({want}) did not show up in the guest within {timeout:.0f} s")
    return Plugged(str(args["id"]), found[0])


def unplug(qmp: QmpChannel, guest: GuestChannel, plugged: Plugged, timeout: float = 30.0) -> None:
    """device_del; wait for DEVICE_DELETED and for the guest to forget the function."""
    since = len(qmp.events())
    try:
        qmp.execute("device_del", {"id": plugged.id})
    except ExecuteError as e:
        raise InfraError(f"QEMU refused device_del {plugged.id}: {e}") from None
    event = qmp.wait_event("DEVICE_DELETED", timeout, since=since,
                           match=lambda ev: ev.get("data", {}).get("device") == plugged.id)
    refused = [ev for ev in qmp.events()[since:] if ev.get("event") == "DEVICE_UNPLUG_GUEST_ERROR"]
    if refused:
        raise HotplugFailure(
            f"guest refused to unplug {plugged.id}: DEVICE_UNPLUG_GUEST_ERROR {refused[0].get('data')}")
    if event is None:
        raise HotplugFailure(
            f"no DEVICE_DELETED for {plugged.id} within {timeout:.0f} s (the guest did not release it)")
    if not wait_until(lambda: not path_exists(guest, plugged.device.path), timeout):
        raise HotplugFailure(f"guest still shows {plugged.device.bdf} after DEVICE_DELETED")
