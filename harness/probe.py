"""Host capabilities, each with the evidence it was decided on.

KVM is decided by running a guest, never by the existence of /dev/kvm: on
nested hosts /dev/kvm opens and KVM_CREATE_VM works while guests crawl or hang.
The probe guest is a 16 KiB PVH ELF that enables paging, enters 64-bit mode and
writes to an isa-debug-exit port; a working KVM does that in milliseconds.

File reads go through `root` so tests can feed recorded /sys, /proc and /dev trees.

The host's PCI TSM state follows the Linux 6.19 ABI
(Documentation/ABI/testing/sysfs-class-tsm and sysfs-bus-pci): TSM devices in
/sys/class/tsm/tsmN; per PCI function `tsm/connect` (reads the connected TSM's
name, empty when not connected), `tsm/disconnect`, `tsm/dsm` (the function's
Device Security Manager), `tsm/bound` (only on functions that can do TDISP;
names the TSM once VFIO/IOMMUFD has bound the interface) and `authenticated` at
the device root (an alias of the connect state while tsm/ is present).
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

from harness import process
from harness.errors import InfraError
from harness.paths import atomic_write, cache_dir

KVM_PROBE_DEADLINE = 2.0
_PROBE_EXIT = 0x2A
QEMU_CANDIDATES = ("qemu-system-x86_64",)
# Objects whose presence decides profiles and parameters (`-object help`).
QEMU_OBJECTS = ("sev-guest", "sev-snp-guest", "tdx-guest", "igvm-cfg", "iommufd")
# Objects whose properties decide optional profile parameters (QMP qom-list-properties).
QEMU_PROPERTY_OBJECTS = ("sev-guest", "sev-snp-guest", "tdx-guest")


@dataclass(frozen=True)
class Fact:
    """One capability: a value and the evidence it was read from."""

    value: bool | str | int | None
    evidence: str


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
    vfio_iommufd: Fact = Fact(None, "not probed")
    cbitpos: Fact = Fact(None, "not probed")
    firmware: dict[str, Fact] = field(default_factory=dict)
    # Per object type: its properties as a comma-separated list (QMP qom-list-properties).
    qemu_properties: dict[str, Fact] = field(default_factory=dict)
    pci_tsm: PciTsmState = field(default_factory=lambda: PciTsmState((), (), "not probed"))

    def qemu_has_property(self, qom_type: str, prop: str) -> tuple[bool, str]:
        """Whether the probed QEMU's `qom_type` object takes `prop`, and the evidence."""
        fact = self.qemu_properties.get(qom_type)
        where = f"QEMU {self.qemu_version.value} ({self.qemu.value})"
        if fact is None or fact.value is None:
            return False, f"{where} has no {qom_type} object"
        if prop in str(fact.value).split(","):
            return True, f"{where} {qom_type} has {prop}"
        return False, f"{where} {qom_type} has no property {prop!r}"

    @property
    def kvm_usable(self) -> bool:
        return self.kvm.value is True

    def check(self, need: str) -> tuple[bool, str]:
        """Whether this host has one capability a profile needs, and why (the evidence)."""
        if need.startswith("qemu:"):
            if need == "qemu:vfio-tio":
                fact = self.vfio_tio
                return bool(fact.value), f"vfio-pci TIO property: {fact.evidence}"
            if need == "qemu:vfio-iommufd":
                fact = self.vfio_iommufd
                return bool(fact.value), f"vfio-pci iommufd property: {fact.evidence}"
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


def find_qemu(override: str | None = None) -> str | None:
    """`--qemu PATH` if given, else $HARNESS_QEMU, else qemu-system-x86_64 on PATH."""
    if override:
        return override
    env = os.environ.get("HARNESS_QEMU")
    if env:
        return env
    for name in QEMU_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def check_qemu_binary(path: str, what: str) -> None:
    """BadInput (exit 2) unless `path` is an executable file."""
    from harness.errors import BadInput

    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise BadInput(f"{what} {path}: not an executable file")


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
    out = process.run([qemu, "--version"], timeout=10).out
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else "unknown"


def qemu_objects(qemu: str) -> list[str]:
    """Which confidential-guest (and IGVM, iommufd) objects this QEMU was built with (`-object help`)."""
    out = process.run([qemu, "-object", "help"], timeout=10).out
    listed = {line.strip() for line in out.splitlines()}
    return [o for o in QEMU_OBJECTS if o in listed]


def parse_property_help(text: str) -> list[str]:
    """Property names from `-device <dev>,help` output.

    QEMU prints a header (`vfio-pci options:`) and then one indented
    `  name=<type>  - description` line per property.
    """
    return sorted({m.group(1) for m in re.finditer(r"^\s+([\w.-]+)=", text, re.M)})


def qemu_object_properties(qemu: str, qom_types: list[str]) -> dict[str, Fact]:
    """The properties of each object type, through QMP `qom-list-properties`.

    Not `-object <type>,help`: that lists class properties only, and tdx-guest
    adds all of its properties per instance ("There are no options for
    tdx-guest" in QEMU 10.2). qom-list-properties makes an instance, so it sees
    them. One `-machine none` QEMU answers for all types.
    """
    requests = [{"execute": "qmp_capabilities"},
                *({"execute": "qom-list-properties", "arguments": {"typename": t}} for t in qom_types),
                {"execute": "quit"}]
    what = f"{qemu} QMP qom-list-properties"
    try:
        proc = process.run([qemu, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                           input=("\n".join(json.dumps(r) for r in requests) + "\n").encode(), timeout=20)
    except InfraError as e:
        return {t: Fact(None, f"{what}: {e}") for t in qom_types}
    answers = []
    for line in proc.out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "return" in msg or "error" in msg:
            answers.append(msg)
    found: dict[str, Fact] = {}
    for qom_type, answer in zip(qom_types, answers[1:], strict=False):
        if isinstance(answer.get("return"), list):
            names = sorted(str(p["name"]) for p in answer["return"] if p.get("name") != "type")
            found[qom_type] = Fact(",".join(names), f"{what} {qom_type}")
        else:
            found[qom_type] = Fact(None, f"{what} {qom_type}: {answer.get('error', {}).get('desc', 'no answer')}")
    for qom_type in qom_types:
        found.setdefault(qom_type, Fact(None, f"{what} {qom_type}: no answer"))
    return found


_TIO_PROPERTIES = ("x-tio", "tio", "x-secure-mode", "secure-mode")


def qemu_vfio_tio(qemu: str) -> Fact:
    """The TIO property of vfio-pci, if this QEMU has one (`-device vfio-pci,help`).

    AMD's SEV-TIO tree adds `x-tio` (SEV-TIO RFC, linux-coco, 2024-25); Intel's TDX Connect tree
    (intel/lkvs) `x-secure-mode`.
    """
    names = set(_vfio_pci_properties(qemu))
    for prop in _TIO_PROPERTIES:
        if prop in names:
            return Fact(prop, f"{qemu} -device vfio-pci,help lists {prop}")
    if not names:
        return Fact(None, f"{qemu} has no vfio-pci device")
    return Fact(None, f"none of {', '.join(_TIO_PROPERTIES)} in {qemu} -device vfio-pci,help")


def _vfio_pci_properties(qemu: str) -> list[str]:
    return parse_property_help(process.run([qemu, "-device", "vfio-pci,help"], timeout=10).out)


def qemu_vfio_iommufd(qemu: str) -> Fact:
    """Whether vfio-pci takes `iommufd=` (QEMU 8.2+ with iommufd support built in)."""
    if "iommufd" in _vfio_pci_properties(qemu):
        return Fact(True, f"{qemu} -device vfio-pci,help lists iommufd")
    return Fact(False, f"no iommufd property in {qemu} -device vfio-pci,help")


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
    # `virt/tdx: module initialized` until Linux 6.15; newer kernels print
    # `virt/tdx: TDX-Module initialized` (Documentation/arch/x86/tdx.rst).
    ("tdx_module", re.compile(r"(?:virt/tdx|tdx): (?:TDX )?(?:module|TDX-Module) initialized")),
)


def host_dmesg(root: Path) -> str | None:
    """The host's kernel log: `dmesg` here, or a recorded `dmesg` file in a fixture root."""
    if root != Path("/"):
        try:
            return (root / "dmesg").read_text()
        except OSError:
            return None
    try:
        proc = process.run(["dmesg"], timeout=10)
    except InfraError:
        return None
    return proc.out if proc.ok else None


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


def probe_host(root: Path = Path("/"), use_cache: bool = True, qemu: str | None = None) -> HostCaps:
    """Read the host's capabilities. Never raises for a missing capability.

    `qemu` overrides the QEMU binary (`harness probe --qemu PATH`); otherwise
    $HARNESS_QEMU, then qemu-system-x86_64 on PATH.
    """
    given = qemu
    qemu = find_qemu(given)
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
        qemu=Fact(qemu, _qemu_origin(given, qemu)),
        qemu_version=Fact(version, f"{qemu} --version" if qemu else "no QEMU"),
        qemu_objects=Fact(",".join(objects), f"{qemu} -object help" if qemu else "no QEMU"),
        qemu_properties=qemu_object_properties(qemu, [t for t in QEMU_PROPERTY_OBJECTS if t in objects])
        if qemu else {},
        sev=_with_dmesg(sev, log, "sev_api"),
        sev_es=_module_flag(root, "kvm_amd", "sev_es"),
        sev_snp=_with_dmesg(_module_flag(root, "kvm_amd", "sev_snp"), log, "snp_api"),
        tdx=_with_dmesg(_module_flag(root, "kvm_intel", "tdx"), log, "tdx_module"),
        iommu=Fact(n_iommu > 0, f"{n_iommu} in /sys/class/iommu, {n_groups} IOMMU groups"),
        vfio_pci=Fact(vfio, "/sys/bus/pci/drivers/vfio-pci " + ("present" if vfio else "absent")),
        vfio_tio=qemu_vfio_tio(qemu) if qemu else Fact(None, "no QEMU"),
        vfio_iommufd=qemu_vfio_iommufd(qemu) if qemu else Fact(None, "no QEMU"),
        cbitpos=read_cbitpos(root),
        firmware=_firmware(root),
        pci_tsm=read_pci_tsm(root),
    )


def _qemu_origin(given: str | None, qemu: str | None) -> str:
    if qemu is None:
        return "qemu-system-x86_64 not on PATH (set HARNESS_QEMU or pass --qemu)"
    if given:
        return "given with --qemu"
    return "from HARNESS_QEMU" if os.environ.get("HARNESS_QEMU") else "found on PATH"


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


def _firmware(root: Path) -> dict[str, Fact]:
    found: dict[str, Fact] = {}
    for name, candidates in _FIRMWARE.items():
        hit = next((c for c in candidates if (root / c).is_file()), None)
        found[name] = Fact(f"/{hit}" if hit else None, "found" if hit else "none of " + ", ".join(
            f"/{c}" for c in candidates))
    return found


def _read_attr(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


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
        connect = _read_attr(tsm_dir / "connect") or ""
        bridge = f"pci{dev.name.rsplit(':', 1)[0]}"
        ide = tuple(s for s in streams.get(connect, []) if s == bridge) if connect else ()
        devices.append(TsmDevice(
            bdf=dev.name, connect=connect, authenticated=_read_attr(dev / "authenticated"),
            dsm=_read_attr(tsm_dir / "dsm"), bound=_read_attr(tsm_dir / "bound"), ide_streams=ide))
    return PciTsmState(tsms, tuple(devices), f"/sys/class/tsm: {', '.join(tsms)}")
