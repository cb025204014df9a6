"""Host capabilities, each with the evidence it was decided on.

KVM is decided by running a guest, never by the existence of /dev/kvm: on
nested hosts /dev/kvm opens and KVM_CREATE_VM works while guests crawl or hang.
The probe guest is a 16 KiB PVH ELF that enables paging, enters 64-bit mode and
writes to an isa-debug-exit port; a working KVM does that in milliseconds.

File reads go through `root` so tests can feed recorded /sys, /proc and /dev trees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.paths import atomic_write, cache_dir

# The probe guest's time includes QEMU's own start-up. Where QEMU itself runs
# emulated (the lab-host twin's L1, under TCG) that start-up alone takes most
# of 2 s, so such a host sets HARNESS_KVM_PROBE_DEADLINE.
KVM_PROBE_DEADLINE = float(os.environ.get("HARNESS_KVM_PROBE_DEADLINE") or 2.0)
_PROBE_EXIT = 0x2A
QEMU_CANDIDATES = ("qemu-system-x86_64",)


@dataclass(frozen=True)
class Fact:
    """One capability: a value and the evidence it was read from."""

    value: bool | str | int | None
    evidence: str


@dataclass
class HostCaps:
    kvm: Fact
    qemu: Fact
    qemu_version: Fact
    qemu_objects: Fact
    sev: Fact
    sev_es: Fact
    sev_snp: Fact
    tdx: Fact
    iommu: Fact
    vfio_pci: Fact
    vfio_tio: Fact = Fact(None, "not probed")
    cbitpos: Fact = Fact(None, "not probed")
    firmware: dict[str, Fact] = field(default_factory=dict)

    @property
    def kvm_usable(self) -> bool:
        return self.kvm.value is True

    def check(self, need: str) -> tuple[bool, str]:
        """Whether this host has one capability a profile needs, and why (the evidence)."""
        if need.startswith("qemu:"):
            if need == "qemu:vfio-tio":
                fact = self.vfio_tio
                return bool(fact.value), f"vfio-pci TIO property: {fact.evidence}"
            obj = need.split(":", 1)[1]
            known = str(self.qemu_objects.value or "").split(",")
            if obj in known:
                return True, f"QEMU {self.qemu_version.value} has {obj}"
            return False, f"QEMU {self.qemu_version.value} lacks {obj} ({self.qemu_objects.evidence})"
        fact = {"kvm": self.kvm, "sev": self.sev, "sev_es": self.sev_es, "sev_snp": self.sev_snp,
                "tdx": self.tdx, "iommu": self.iommu, "vfio_pci": self.vfio_pci}[need]
        if need == "kvm":
            return self.kvm_usable, f"kvm {fact.evidence}"
        return bool(fact.value), f"{need}: {fact.evidence}"

    def firmware_path(self, name: str) -> tuple[str | None, str]:
        """Resolve a firmware name (ovmf, ovmf-amdsev, tdvf) or a path."""
        if "/" in name:
            return (name, "given") if Path(name).is_file() else (None, f"firmware {name}: no such file")
        fact = self.firmware.get(name)
        if fact is None:
            return None, f"firmware {name!r}: unknown name; known: {', '.join(self.firmware)}"
        return (str(fact.value), "found") if fact.value else (None, f"firmware {name}: {fact.evidence}")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


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


def find_qemu() -> str | None:
    env = os.environ.get("HARNESS_QEMU")
    if env:
        return env
    for name in QEMU_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


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


def _boot_id(root: Path) -> str:
    try:
        return (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


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
    key = f"{_boot_id(root)}:{qemu}:{st.st_mtime_ns}:{st.st_size}"
    cache = cache_dir() / "probe" / "kvm.json"
    if use_cache and root == Path("/"):
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return Fact(cached["usable"], cached["evidence"] + " [cached for this host boot]")
        except (OSError, ValueError):
            pass
    ok, why, _ = _run_probe_guest(qemu, "kvm", KVM_PROBE_DEADLINE)
    if not ok:
        tcg_ok, _, tcg_time = _run_probe_guest(qemu, "tcg", KVM_PROBE_DEADLINE)
        if tcg_ok:
            why += f"; under TCG it took {tcg_time:.2f} s"
    evidence = ("usable (" if ok else "unusable (") + why + ")"
    if root == Path("/"):
        atomic_write(cache, json.dumps({"key": key, "usable": ok, "evidence": evidence}))
    return Fact(ok, evidence)


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else "unknown"


def qemu_objects(qemu: str) -> list[str]:
    """Which confidential-guest objects this QEMU was built with (`-object help`)."""
    out = subprocess.run([qemu, "-object", "help"], capture_output=True, text=True, timeout=10).stdout
    listed = {line.strip() for line in out.splitlines()}
    return [o for o in ("sev-guest", "sev-snp-guest", "tdx-guest") if o in listed]


_TIO_PROPERTIES = ("x-tio", "tio", "x-secure-mode", "secure-mode")


def qemu_vfio_tio(qemu: str) -> Fact:
    """The TIO property of vfio-pci, if this QEMU has one (`-device vfio-pci,help`).

    AMD's tree adds `x-tio` (seed 001); Intel's TDX Connect tree `x-secure-mode`.
    """
    proc = subprocess.run([qemu, "-device", "vfio-pci,help"], capture_output=True, text=True, timeout=10)
    names = {m.group(1) for m in re.finditer(r"^\s+([\w-]+)=", proc.stdout, re.M)}
    for prop in _TIO_PROPERTIES:
        if prop in names:
            return Fact(prop, f"{qemu} -device vfio-pci,help lists {prop}")
    if not names:
        return Fact(None, f"{qemu} has no vfio-pci device")
    return Fact(None, f"none of {', '.join(_TIO_PROPERTIES)} in {qemu} -device vfio-pci,help")


def read_cbitpos(root: Path) -> Fact:
    """C-bit position from CPUID 0x8000001F EBX[5:0], through /dev/cpu/0/cpuid."""
    dev = root / "dev/cpu/0/cpuid"
    try:
        fd = os.open(dev, os.O_RDONLY)
    except OSError as e:
        return Fact(None, f"not readable: /dev/cpu/0/cpuid: {e.strerror} (modprobe cpuid)")
    try:
        data = os.pread(fd, 16, 0x8000001F)
    except OSError as e:
        return Fact(None, f"CPUID 0x8000001F not readable: {e.strerror}")
    finally:
        os.close(fd)
    if len(data) < 16:
        return Fact(None, "CPUID 0x8000001F: short read")
    eax, ebx = struct.unpack("<II", data[:8])
    if not eax & 0x2:
        return Fact(None, f"CPUID 0x8000001F EAX={eax:#x}: the CPU reports no SEV")
    return Fact(ebx & 0x3F, f"CPUID 0x8000001F EBX={ebx:#x} bits 5:0")


_DMESG_FACTS = (
    ("sev_api", re.compile(r"SEV API:\s*(\d+\.\d+)")),
    ("snp_api", re.compile(r"SEV-SNP API:\s*(\d+\.\d+)")),
    ("tdx_module", re.compile(r"(?:virt/tdx|tdx): (?:TDX )?module initialized")),
)


def host_dmesg(root: Path) -> str | None:
    """The host's kernel log: `dmesg` here, or a recorded `dmesg` file in a fixture root."""
    if root != Path("/"):
        try:
            return (root / "dmesg").read_text()
        except OSError:
            return None
    try:
        proc = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _with_dmesg(fact: Fact, log: str | None, key: str) -> Fact:
    if log is None:
        return Fact(fact.value, fact.evidence + "; dmesg not readable")
    for name, pattern in _DMESG_FACTS:
        if name == key:
            m = pattern.search(log)
            if m:
                line = next(x for x in log.splitlines() if pattern.search(x)).strip()
                return Fact(fact.value, f"{fact.evidence}; dmesg: {line[-80:]}")
    return fact


def _param(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text().strip()
    except OSError:
        return None


def _module_flag(root: Path, module: str, param: str) -> Fact:
    rel = f"sys/module/{module}/parameters/{param}"
    value = _param(root, rel)
    if value is None:
        return Fact(False, f"no /{rel}")
    return Fact(value in ("Y", "1"), f"/{rel} = {value}")


def probe_host(root: Path = Path("/"), use_cache: bool = True) -> HostCaps:
    """Read the host's capabilities. Never raises for a missing capability."""
    qemu = find_qemu()
    version = qemu_version(qemu) if qemu else None
    objects = qemu_objects(qemu) if qemu else []
    sev = _module_flag(root, "kvm_amd", "sev")
    if sev.value and not (root / "dev/sev").exists():
        sev = Fact(False, sev.evidence + ", but /dev/sev is missing")
    groups = root / "sys/kernel/iommu_groups"
    n_groups = len(list(groups.iterdir())) if groups.is_dir() else 0
    iommus = root / "sys/class/iommu"
    n_iommu = len(list(iommus.iterdir())) if iommus.is_dir() else 0
    vfio = (root / "sys/bus/pci/drivers/vfio-pci").is_dir()
    log = host_dmesg(root)
    return HostCaps(
        kvm=probe_kvm(qemu, root, use_cache),
        qemu=Fact(qemu, "found on PATH" if qemu else "qemu-system-x86_64 not on PATH"),
        qemu_version=Fact(version, f"{qemu} --version" if qemu else "no QEMU"),
        qemu_objects=Fact(",".join(objects), f"{qemu} -object help" if qemu else "no QEMU"),
        sev=_with_dmesg(sev, log, "sev_api"),
        sev_es=_module_flag(root, "kvm_amd", "sev_es"),
        sev_snp=_with_dmesg(_module_flag(root, "kvm_amd", "sev_snp"), log, "snp_api"),
        tdx=_with_dmesg(_module_flag(root, "kvm_intel", "tdx"), log, "tdx_module"),
        iommu=Fact(n_iommu > 0, f"{n_iommu} in /sys/class/iommu, {n_groups} IOMMU groups"),
        vfio_pci=Fact(vfio, "/sys/bus/pci/drivers/vfio-pci " + ("present" if vfio else "absent")),
        vfio_tio=qemu_vfio_tio(qemu) if qemu else Fact(None, "no QEMU"),
        cbitpos=read_cbitpos(root),
        firmware=_firmware(root),
    )


_FIRMWARE = {
    "seabios": ("usr/share/seabios/bios-256k.bin",),
    # -bios takes a combined image (code + vars), not the split _CODE files.
    "ovmf": ("usr/share/ovmf/OVMF.fd", "usr/share/qemu/OVMF.fd"),
    "ovmf-amdsev": ("usr/share/ovmf/OVMF.amdsev.fd", "usr/share/OVMF/OVMF.amdsev.fd"),
    "tdvf": ("usr/share/ovmf/OVMF.inteltdx.fd", "usr/share/qemu/OVMF.inteltdx.fd"),
}


def _firmware(root: Path) -> dict[str, Fact]:
    found: dict[str, Fact] = {}
    for name, candidates in _FIRMWARE.items():
        hit = next((c for c in candidates if (root / c).is_file()), None)
        found[name] = Fact(f"/{hit}" if hit else None, "found" if hit else "none of " + ", ".join(
            f"/{c}" for c in candidates))
    return found
