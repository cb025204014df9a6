"""PCI hotplug through QMP, with the guest's view checked at every step.

device_add into a free pcie-root-port; the guest must show the function in
sysfs (with its driver, where one is expected); device_del only *requests*
removal: completion is the DEVICE_DELETED event, after which the guest must
have forgotten the function. DEVICE_UNPLUG_GUEST_ERROR is the guest refusing.
Every wait has a deadline; a device the guest never shows (or never lets go)
is a kernel failure, a command QEMU rejects is an infrastructure error.

The host side of the TIO workflow (connect the device to the platform TSM
before it is hot-plugged) is here too: `connect_host_device`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError

from harness.errors import InfraError, KernelFault
from harness.guest import GuestChannel
from harness.probe import read_pci_tsm
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

    # Each poll is one guest command (about 30 ms under TCG since pci_devices forks nothing).
    if not wait_until(appeared, timeout, 0.1):
        want = f"{vendor}:{device}" + (f" bound to {driver}" if driver else "")
        raise HotplugFailure(
            f"hot-plugged {args['driver']} ({want}) did not show up in the guest within {timeout:.0f} s")
    return Plugged(str(args["id"]), found[0])


def unplug(qmp: QmpChannel, guest: GuestChannel, plugged: Plugged, timeout: float = 30.0,
           prompt: bool = True) -> None:
    """device_del; wait for DEVICE_DELETED and for the guest to forget the function.

    With native PCIe hotplug QEMU's device_del presses the slot's attention
    button, and pciehp blinks the power indicator for 5 s (the window in which
    an operator may cancel) before it powers the slot off. `prompt` (default)
    confirms the removal from the guest instead, once the kernel has taken the
    button press: `echo 0 > /sys/bus/pci/slots/<slot>/power`, Linux's own way
    to power a slot off, which cancels the wait. `prompt=False` waits it out.
    ACPI hotplug has no such wait, and nothing is written then.
    """
    since = len(qmp.events())
    try:
        qmp.execute("device_del", {"id": plugged.id})
    except ExecuteError as e:
        raise InfraError(f"QEMU refused device_del {plugged.id}: {e}") from None
    deadline = time.monotonic() + timeout

    def deleted(wait: float) -> dict[str, Any] | None:
        return qmp.wait_event("DEVICE_DELETED", wait, since=since,
                              match=lambda ev: ev.get("data", {}).get("device") == plugged.id)

    def refused() -> list[dict[str, Any]]:
        return [ev for ev in qmp.events()[since:] if ev.get("event") == "DEVICE_UNPLUG_GUEST_ERROR"]

    # ACPI hotplug usually answers within this, with no command in the guest.
    event = deleted(min(0.2, timeout))
    confirmed = not prompt
    while event is None and not confirmed and not refused() and time.monotonic() < deadline:
        confirmed = _confirm_native_removal(guest, plugged.device.bdf)
        event = deleted(0.0 if confirmed else min(0.1, max(0.0, deadline - time.monotonic())))
    if event is None and not refused():
        event = deleted(max(0.0, deadline - time.monotonic()))
    if refused():
        raise HotplugFailure(
            f"guest refused to unplug {plugged.id}: DEVICE_UNPLUG_GUEST_ERROR {refused()[0].get('data')}")
    if event is None:
        raise HotplugFailure(
            f"no DEVICE_DELETED for {plugged.id} within {timeout:.0f} s (the guest did not release it)")
    if not wait_until(lambda: not path_exists(guest, plugged.device.path), timeout):
        raise HotplugFailure(f"guest still shows {plugged.device.bdf} after DEVICE_DELETED")


def _confirm_native_removal(guest: GuestChannel, bdf: str) -> bool:
    """Power off the pciehp slot holding `bdf` if pciehp's last word on it is the button press
    (its blink state); True if done. A slot of ACPI hotplug never says so: False."""
    slot = bdf.rsplit(".", 1)[0]
    out = guest.run(
        f"for s in /sys/bus/pci/slots/*; do a=; read a 2>/dev/null < $s/address; "
        f"[ \"$a\" = {slot} ] && n=${{s##*/}}; done; "
        "[ -n \"$n\" ] || exit 0; l=$(dmesg | grep \"pciehp: Slot($n)\" | tail -n 1); "
        "case \"$l\" in *'Powering off due to button press'*) "
        "echo 0 > /sys/bus/pci/slots/$n/power && echo confirmed;; esac").stdout
    return out.strip() == "confirmed"


@dataclass(frozen=True)
class TioStep:
    """One step of the host side of the TIO workflow and the state it left."""

    step: str
    state: str

    def to_json(self) -> dict[str, str]:
        return {"step": self.step, "state": self.state}


def connect_host_device(bdf: str, root: Path = Path("/"), tsm: str | None = None,
                        timeout: float = 30.0) -> list[TioStep]:
    """Connect a host PCI function to the platform TSM before it is hot-plugged.

    Linux 6.19 PCI TSM ABI (Documentation/ABI/testing/sysfs-bus-pci): write the
    TSM's name to the Device Security Manager's `tsm/connect` (physical function
    0; a virtual function's `tsm/dsm` names it once connected, so before that the
    PF is the function itself or function 0 of the same device); `connect` then
    reads the name back. Returns each step with the state after it; a host
    without the ABI, or a device without `tsm/`, is a recorded step, not an error:
    the workflow goes on as the pre-6.19 RFC trees did. A connect the kernel
    refuses or never completes within `timeout` is InfraError.
    """
    state = read_pci_tsm(root)
    if not state.present:
        return [TioStep("host PCI TSM", state.evidence)]
    steps = [TioStep("host PCI TSM", state.evidence)]
    device = state.device(bdf)
    if device is None:
        return [*steps, TioStep("device", f"{bdf} has no tsm/ directory: not TSM-capable "
                                          "(or the TSM has not evaluated it yet)")]
    steps.append(TioStep("before connect", device.describe()))
    dsm_bdf = device.dsm or f"{bdf.rsplit('.', 1)[0]}.0"
    dsm = state.device(dsm_bdf) or device
    name = tsm or state.tsms[0]
    if dsm.connect:
        steps.append(TioStep("connect", f"{dsm.bdf} already connected to {dsm.connect}"))
    else:
        attr = root / "sys/bus/pci/devices" / dsm.bdf / "tsm/connect"
        try:
            attr.write_text(name)
        except OSError as e:
            raise InfraError(f"TIO: writing {name} to {attr} failed: {e.strerror}") from None
        if not wait_until(lambda: (read_pci_tsm(root).device(dsm.bdf) or dsm).connect == name, timeout):
            raise InfraError(f"TIO: {attr} did not read {name} within {timeout:.0f} s after connect")
        steps.append(TioStep("connect", f"wrote {name} to {attr}"))
    after = read_pci_tsm(root)
    for fn in dict.fromkeys([dsm.bdf, bdf]):
        steps.append(TioStep("after connect", (after.device(fn) or device).describe()))
    return steps
