"""The host's PCI TSM state.

It follows the Linux 6.19 ABI (Documentation/ABI/testing/sysfs-class-tsm and
sysfs-bus-pci): TSM devices in /sys/class/tsm/tsmN; per PCI function
`tsm/connect` (reads the connected TSM's name, empty when not connected),
`tsm/disconnect`, `tsm/dsm` (the function's Device Security Manager),
`tsm/bound` (only on functions that can do TDISP; names the TSM once
VFIO/IOMMUFD has bound the interface) and `authenticated` at the device root
(an alias of the connect state while tsm/ is present).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.probe.facts import read_attr


@dataclass(frozen=True)
class TsmDevice:
    """One PCI function with a `tsm/` directory (Linux 6.19 PCI TSM ABI).

    `connect` is what tsm/connect reads ("" = not connected); `bound` is None
    when the function has no tsm/bound (it cannot do TDISP), "" when it can but
    is not bound; `authenticated` is None when the attribute is absent.
    """

    bdf: str
    connect: str
    authenticated: str | None
    dsm: str | None
    bound: str | None
    ide_streams: tuple[str, ...] = ()

    @property
    def connected(self) -> bool:
        return bool(self.connect)

    @property
    def ide(self) -> str:
        """Whether the link to the device is protected (SPDM session, IDE where the TSM wants it)."""
        if not self.connected:
            return "IDE not connected"
        streams = f" ({', '.join(self.ide_streams)})" if self.ide_streams else ""
        return f"IDE connected to {self.connect}{streams}"

    @property
    def tdi_bind(self) -> str:
        """Whether an interface of the device can be bound to a confidential guest (TDISP)."""
        if self.bound is None:
            return "TDI bind not available (no tsm/bound: the function cannot do TDISP)"
        if self.bound:
            return f"TDI bound to {self.bound}"
        if not self.connected:
            return "TDI bind available after connect"
        return "TDI bind available (not bound)"

    def describe(self) -> str:
        auth = {None: "no authenticated attribute", "1": "authenticated", "0": "not authenticated"}.get(
            self.authenticated, f"authenticated={self.authenticated}")
        dsm = f", DSM {self.dsm}" if self.dsm and self.dsm != self.bdf else ""
        return f"{self.bdf}: {auth}; {self.ide}; {self.tdi_bind}{dsm}"


@dataclass(frozen=True)
class PciTsmState:
    """The host's PCI TSM state: TSM devices and the functions that have tsm/."""

    tsms: tuple[str, ...]
    devices: tuple[TsmDevice, ...]
    evidence: str

    @property
    def present(self) -> bool:
        return bool(self.tsms)

    def device(self, bdf: str) -> TsmDevice | None:
        return next((d for d in self.devices if d.bdf == bdf), None)

    def summary(self) -> str:
        if not self.tsms:
            return self.evidence
        parts = [", ".join(self.tsms)] + [d.describe() for d in self.devices]
        return "; ".join(parts) if self.devices else f"{parts[0]}; no PCI function has tsm/"


def read_pci_tsm(root: Path = Path("/")) -> PciTsmState:
    """Read /sys/class/tsm and each PCI function's tsm/ directory under `root`."""
    cls = root / "sys/class/tsm"
    tsms = tuple(sorted(p.name for p in cls.iterdir())) if cls.is_dir() else ()
    if not tsms:
        return PciTsmState((), (), "no /sys/class/tsm/tsmN (no PCI TSM: Linux 6.19+ with a TSM driver)")
    # /sys/class/tsm/tsmN/pciDDDD:BB appears while a host bridge has IDE streams with that TSM.
    streams: dict[str, list[str]] = {}
    for tsm in tsms:
        for link in sorted((cls / tsm).glob("pci*:*")):
            streams.setdefault(tsm, []).append(link.name)
    devices = []
    pci = root / "sys/bus/pci/devices"
    for dev in sorted(pci.iterdir()) if pci.is_dir() else ():
        tsm_dir = dev / "tsm"
        if not tsm_dir.is_dir():
            continue
        connect = read_attr(tsm_dir / "connect") or ""
        bridge = f"pci{dev.name.rsplit(':', 1)[0]}"
        ide = tuple(s for s in streams.get(connect, []) if s == bridge) if connect else ()
        devices.append(TsmDevice(
            bdf=dev.name, connect=connect, authenticated=read_attr(dev / "authenticated"),
            dsm=read_attr(tsm_dir / "dsm"), bound=read_attr(tsm_dir / "bound"), ide_streams=ide))
    return PciTsmState(tsms, tuple(devices), f"/sys/class/tsm: {', '.join(tsms)}")
