"""Whether KVM is usable, decided by running a guest.

KVM is decided by running a guest, never by the existence of /dev/kvm: on
nested hosts /dev/kvm opens and KVM_CREATE_VM works while guests crawl or hang.
The probe guest is a 16 KiB PVH ELF that enables paging, enters 64-bit mode and
writes to an isa-debug-exit port; a working KVM does that in milliseconds.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from harness.paths import atomic_write, cache_dir
from harness.probe.facts import Fact, read_attr

# The probe guest's time includes QEMU's own start-up. Where QEMU itself runs
# emulated (the lab-host twin's L1, under TCG) that start-up alone takes most
# of 2 s, so such a host sets HARNESS_KVM_PROBE_DEADLINE.
KVM_PROBE_DEADLINE = float(os.environ.get("HARNESS_KVM_PROBE_DEADLINE") or 2.0)
_PROBE_EXIT = 0x2A


def pvh_probe_image() -> bytes:
    """The KVM probe guest: PVH entry (32-bit, paging off) -> long mode -> out 0xf4."""
    base = 0x100000
    gdt_off, pml4_off, pdpt_off, pd_off = 0x100, 0x1000, 0x2000, 0x3000
    seg = bytearray(0x4000)
    seg[gdt_off:gdt_off + 16] = struct.pack("<QQ", 0, 0x00AF9A000000FFFF)
    seg[gdt_off + 16:gdt_off + 22] = struct.pack("<HI", 15, base + gdt_off)
    seg[pml4_off:pml4_off + 8] = struct.pack("<Q", (base + pdpt_off) | 3)
    seg[pdpt_off:pdpt_off + 8] = struct.pack("<Q", (base + pd_off) | 3)
    seg[pd_off:pd_off + 8] = struct.pack("<Q", 0x83)  # one 2 MiB identity page
    code = bytearray()
    code += bytes.fromhex("0F20E0 83C820 0F22E0")  # cr4 |= PAE
    code += b"\xB8" + struct.pack("<I", base + pml4_off) + bytes.fromhex("0F22D8")  # cr3
    code += bytes.fromhex("B9800000C0 0F32 0D00010000 0F30")  # EFER.LME
    code += bytes.fromhex("0F20C0 0D01000080 0F22C0")  # cr0 |= PG | PE
    code += bytes.fromhex("0F0115") + struct.pack("<I", base + gdt_off + 16)  # lgdt
    far = len(code)
    code += b"\xEA\0\0\0\0\x08\x00"  # ljmp 0x08:long
    code[far + 1:far + 5] = struct.pack("<I", base + len(code))
    code += bytes.fromhex("31C0 B9E8030000 01C8 E2FC")  # a little 64-bit work
    code += bytes([0xB0, _PROBE_EXIT]) + bytes.fromhex("E6F4 F4 EBFD")  # out 0xf4; hlt
    seg[:len(code)] = code
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", base)  # PHYS32_ENTRY
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, base, base, len(seg), len(seg), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, 64 + 2 * 56, 0, 0, len(note), len(note), 4)
    head = ehdr + load + pnote + note
    return head + b"\0" * (0x1000 - len(head)) + bytes(seg)


def _run_probe_guest(qemu: str, accel: str, deadline: float) -> tuple[bool, str, float]:
    with tempfile.TemporaryDirectory(prefix="harness-kvmprobe-") as tmp:
        image = Path(tmp) / "probe.elf"
        image.write_bytes(pvh_probe_image())
        argv = [qemu, "-machine", f"pc,accel={accel}", "-nodefaults", "-no-user-config",
                "-display", "none", "-kernel", str(image),
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            return False, f"probe guest did not reach 64-bit mode within {deadline:.1f} s", deadline
        elapsed = time.monotonic() - start
        if proc.returncode == (_PROBE_EXIT << 1) | 1:
            return True, f"probe guest reached 64-bit mode in {elapsed:.2f} s", elapsed
        text = out.decode(errors="replace").strip().splitlines()
        noise = [t for t in text if "warning: host doesn't support requested feature" not in t]
        last = noise[-1] if noise else f"exit status {proc.returncode}"
        return False, f"QEMU failed: {last}", elapsed


def probe_kvm(qemu: str | None, root: Path = Path("/"), use_cache: bool = True) -> Fact:
    """Decide whether KVM is usable by running the probe guest under it.

    The answer is cached per host boot and QEMU binary (a nested host does not
    change its mind while it is up); `use_cache=False` re-runs it.
    """
    dev = root / "dev/kvm"
    if not dev.exists():
        return Fact(False, "unusable (/dev/kvm missing)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return Fact(False, "unusable (/dev/kvm not readable and writable by this user)")
    if qemu is None:
        return Fact(None, "unknown (no QEMU to run the probe guest)")
    st = os.stat(qemu)
    boot_id = read_attr(root / "proc/sys/kernel/random/boot_id")
    key = f"{'unknown' if boot_id is None else boot_id}:{qemu}:{st.st_mtime_ns}:{st.st_size}"
    cache = cache_dir() / "probe" / "kvm.json"
    if use_cache and root == Path("/"):
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                when = f", probed at {cached['probed_at']}" if cached.get("probed_at") else ""
                return Fact(cached["usable"], cached["evidence"] + f" [cached for this host boot{when}]")
        except (OSError, ValueError):
            pass
    ok, why, _ = _run_probe_guest(qemu, "kvm", KVM_PROBE_DEADLINE)
    if not ok:
        tcg_ok, _, tcg_time = _run_probe_guest(qemu, "tcg", KVM_PROBE_DEADLINE)
        if tcg_ok:
            why += f"; under TCG it took {tcg_time:.2f} s"
    evidence = ("usable (" if ok else "unusable (") + why + ")"
    if root == Path("/"):
        probed_at = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write(cache, json.dumps({"key": key, "usable": ok, "evidence": evidence, "probed_at": probed_at}))
    return Fact(ok, evidence)
