"""Firmware images by name (seabios, ovmf, ovmf-amdsev, tdvf), searched where distributions put them."""

from __future__ import annotations

from pathlib import Path

from harness.probe.facts import Fact

# Where distributions put each image, most specific first. -bios takes a
# combined image (code + vars), not the split _CODE files. Debian/Ubuntu:
# /usr/share/ovmf/; Fedora/RHEL (edk2-ovmf): /usr/share/edk2/ovmf/; older
# layouts and SUSE: /usr/share/OVMF/. TDX: Ubuntu's ovmf ships OVMF.inteltdx.fd
# on some releases, and canonical/tdx boots TDs with the plain
# /usr/share/ovmf/OVMF.fd (built with TDX support), so that is the last resort.
_FIRMWARE = {
    "seabios": ("usr/share/seabios/bios-256k.bin",),
    "ovmf": ("usr/share/ovmf/OVMF.fd", "usr/share/qemu/OVMF.fd", "usr/share/edk2/ovmf/OVMF.fd",
             "usr/share/OVMF/OVMF.fd"),
    "ovmf-amdsev": ("usr/share/ovmf/OVMF.amdsev.fd", "usr/share/edk2/ovmf/OVMF.amdsev.fd",
                    "usr/share/OVMF/OVMF.amdsev.fd"),
    "tdvf": ("usr/share/ovmf/OVMF.inteltdx.fd", "usr/share/qemu/OVMF.inteltdx.fd",
             "usr/share/edk2/ovmf/OVMF.inteltdx.fd", "usr/share/OVMF/OVMF.inteltdx.fd",
             "usr/share/ovmf/OVMF.fd"),
}


def find_firmware(root: Path) -> dict[str, Fact]:
    """Each firmware name: the first image found under `root`, or the places searched."""
    found: dict[str, Fact] = {}
    for name, candidates in _FIRMWARE.items():
        hit = next((c for c in candidates if (root / c).is_file()), None)
        found[name] = Fact(f"/{hit}" if hit else None, "found" if hit else "none of " + ", ".join(
            f"/{c}" for c in candidates))
    return found
