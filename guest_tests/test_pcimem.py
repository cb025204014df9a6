"""MMIO through sysfs resource files with pcimem.

edu (1234:11e8), BAR0: 0x00 id (RO, 0x010000ed), 0x04 liveness (reads back the
inverted value written), 0x80 DMA source address (8 bytes). Below 0x80 the
device model takes only 4-byte accesses. ivshmem-plain (1af4:1110) BAR2 is
plain shared memory: every width works there.
"""

from __future__ import annotations

import re

import pytest

from harness.guest import GuestChannel
from harness.pytest_plugin import RunInfo
from harness.sysfs import PciDevice, bar_sizes, find_pci, path_exists

EDU = ("0x1234", "0x11e8")
IVSHMEM = ("0x1af4", "0x1110")


def enabled_device(guest: GuestChannel, ids: tuple[str, str], name: str) -> PciDevice:
    """The first vendor:device function, enabled for MMIO (skips if the profile has none)."""
    found = find_pci(guest, *ids)
    if not found:
        pytest.skip(f"no {name} device ({ids[0][2:]}:{ids[1][2:]}) in this guest: the profile does not add one")
    dev = found[0]
    if not dev.enabled:
        guest.check(f"echo 1 > {dev.path}/enable")
    return dev


@pytest.fixture(scope="module")
def edu(guest: GuestChannel) -> PciDevice:
    return enabled_device(guest, EDU, "edu")


def _values(output: str) -> list[int]:
    return [int(v, 16) for v in re.findall(r"(?:: |readback )0x([0-9A-Fa-f]+)", output)]


def test_edu_id_register(guest: GuestChannel, edu: PciDevice) -> None:
    assert bar_sizes(guest.read_text(f"{edu.path}/resource")) == {0: 1 << 20}  # BAR0: 1 MiB, nothing else
    out = guest.check(f"pcimem {edu.resource(0)} 0")
    assert out.strip() == "0x0000: 0x010000ED"


def test_edu_liveness_register_inverts(guest: GuestChannel, edu: PciDevice) -> None:
    out = guest.check(f"pcimem {edu.resource(0)} 0x4 w 0x12345678")
    assert out.strip() == "Written 0x12345678; readback 0xEDCBA987"


def test_edu_access_widths(guest: GuestChannel, edu: PciDevice) -> None:
    res = edu.resource(0)
    # 8-byte register at 0x80 (DMA source address): full 64-bit round trip.
    assert _values(guest.check(f"pcimem {res} 0x80 d 0x1122334455667788")) == [0x1122334455667788]
    assert _values(guest.check(f"pcimem {res} 0x80 d")) == [0x1122334455667788]
    assert _values(guest.check(f"pcimem {res} 0x80 w")) == [0x55667788]
    # 1- and 2-byte accesses below 0x80 are refused by the device model: never the id bytes.
    assert _values(guest.check(f"pcimem {res} 0 b")) != [0xED]
    assert _values(guest.check(f"pcimem {res} 0 h")) != [0x00ED]


def test_every_width_on_shared_memory(guest: GuestChannel) -> None:
    res = enabled_device(guest, IVSHMEM, "ivshmem-plain").resource(2)
    assert _values(guest.check(f"pcimem {res} 0x100 d 0x1122334455667788")) == [0x1122334455667788]
    # Little-endian views of the same eight bytes, then narrow writes into them.
    assert _values(guest.check(f"pcimem {res} 0x100 b")) == [0x88]
    assert _values(guest.check(f"pcimem {res} 0x102 h")) == [0x5566]
    assert _values(guest.check(f"pcimem {res} 0x104 w")) == [0x11223344]
    assert _values(guest.check(f"pcimem {res} 0x101 b 0xab")) == [0xAB]
    assert _values(guest.check(f"pcimem {res} 0x106 h 0xcdef")) == [0xCDEF]
    assert _values(guest.check(f"pcimem {res} 0x100 d")) == [0xCDEF33445566AB88]
    reads = _values(guest.check(f"pcimem {res} 0x100 b*8"))
    assert reads == [0x88, 0xAB, 0x66, 0x55, 0x44, 0x33, 0xEF, 0xCD]


def test_tio_rfc_command_line_form(guest: GuestChannel, edu: PciDevice) -> None:
    # The form of the command in the "Secure VFIO, TDISP, SEV TIO" RFC's cover
    # letter: `pcimem <resource> 0 w*4 0xabcd`.
    out = guest.check(f"pcimem {edu.resource(0)} 0x4 w*1 0xabcd")
    assert _values(out) == [0xFFFF5432]
    reads = guest.check(f"pcimem {edu.resource(0)} 0 w*4").strip().splitlines()
    assert len(reads) == 4 and reads[0] == "0x0000: 0x010000ED" and reads[1].startswith("0x0004: ")


def test_pcimem_rejects_bad_input(guest: GuestChannel, edu: PciDevice) -> None:
    assert guest.run(f"pcimem {edu.resource(0)} 0 q").exit_code == 1
    assert guest.run(f"pcimem {edu.resource(0)} 0x2 w").exit_code == 1  # misaligned
    assert guest.run("pcimem /sys/no/such/resource0 0").exit_code == 2


def test_encrypted_resource(guest: GuestChannel, edu: PciDevice, run_info: RunInfo) -> None:
    enc = edu.resource(0, enc=True)
    if not path_exists(guest, enc):
        pytest.skip(f"kernel {run_info.kernel_release} offers no {enc.rsplit('/', 1)[-1]} "
                    "(resourceN_enc comes with the \"Secure VFIO, TDISP, SEV TIO\" RFC series)")
    assert guest.check(f"pcimem {enc} 0").strip() == "0x0000: 0x010000ED"
