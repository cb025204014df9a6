"""The guest userspace: a busybox initramfs built and cached by the harness.

Contents: static busybox with its applet links, /init and the command agent
from `harness/guestfs/`, the kernel modules a profile asks for (with their
dependencies, decompressed, in load order) and any extra files (guest tools).
The image is an uncompressed cpio: decompressing it in the guest under TCG
costs more boot time than copying a few extra megabytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness import process
from harness.cpio import CpioWriter
from harness.errors import InfraError
from harness.kernel import Kernel
from harness.paths import atomic_write, cache_dir
from harness.tools import guest_program

FORMAT = "initramfs-v1"
GUESTFS = Path(__file__).resolve().parent / "guestfs"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


@dataclass(frozen=True)
class Initramfs:
    path: Path
    sha256: str
    modules: tuple[str, ...]
    missing_modules: tuple[str, ...]


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            return path
    raise InfraError("busybox not found: install the busybox-static package")


def _busybox_applets(busybox: Path) -> list[str]:
    out = process.run([str(busybox), "--list-full"], timeout=10).check(f"{busybox} --list-full").out
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return _norm(base.split(".ko", 1)[0])


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse depmod's modules.dep: `path.ko: dep1.ko dep2.ko` per line.

    Returns {module name: (path, [dependency paths])}.
    """
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[_module_name(path.strip())] = (path.strip(), deps.split())
    return table


def resolve_modules(
    wanted: tuple[str, ...], modules_dep: str, builtin: str
) -> tuple[list[str], list[str]]:
    """Module paths to insmod in order (dependencies first), and names not found.

    Names built into the kernel (modules.builtin) need nothing and are neither.
    """
    table = parse_modules_dep(modules_dep)
    builtin_names = {_module_name(line.strip()) for line in builtin.splitlines() if line.strip()}
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    missing: list[str] = []

    def visit(name: str) -> None:
        path, deps = table[name]
        if path in order:
            return
        for dep in deps:
            visit(by_path.get(dep, _module_name(dep)))
        order.append(path)

    for raw in wanted:
        name = _norm(raw)
        if name in builtin_names:
            continue
        if name not in table:
            missing.append(raw)
            continue
        visit(name)
    return order, missing


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        zstd = shutil.which("zstd")
        if not zstd:
            raise InfraError(f"module {path.name} is zstd-compressed: install the zstd package")
        return process.run([zstd, "-dc", str(path)], timeout=60).check(f"zstd -dc {path}").stdout
    return data


DROPBEAR = "/usr/sbin/dropbear"


def elf_with_libraries(binary: str) -> list[Path]:
    """A dynamically linked program and the shared objects `ldd` says it loads."""
    path = Path(binary)
    if not path.is_file():
        raise InfraError(f"{binary} not found: install the dropbear-bin package for the ssh channel")
    out = process.run(["ldd", binary], timeout=30).check(f"ldd {binary}").out
    libs = [Path(m) for m in (line.split("=>")[-1].split("(")[0].strip() for line in out.splitlines())
            if m.startswith("/")]
    return [path, *libs]


def ssh_overlay(authorized_key: str, host_key: Path) -> bytes:
    """A cpio to append to the cached image: this run's keys, never in the cache."""
    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    for d in ("root", "root/.ssh", "etc", "etc/harness"):
        cpio.directory(d, 0o700 if d.startswith("root") else 0o755)
    # dropbear refuses authorized_keys that group or others can write.
    cpio.file("root/.ssh/authorized_keys", (authorized_key + "\n").encode(), 0o600)
    cpio.file("etc/harness/ssh_host_key", host_key.read_bytes(), 0o600)
    cpio.finish()
    return buf.getvalue()


def build_initramfs(
    kernel: Kernel,
    modules: tuple[str, ...] = (),
    extra_files: tuple[tuple[str, Path], ...] = (),
    ssh: bool = False,
) -> Initramfs:
    """Build (or take from the cache) the initramfs for `kernel`.

    Raises InfraError when busybox is missing. Modules the kernel does not have
    are reported in `missing_modules`, not raised: the tests that need them say so.
    """
    busybox = _busybox()
    agent = guest_program(GUESTFS / "harness-agent.c")
    if ssh:
        extra_files = (*extra_files, *((str(p), p) for p in elf_with_libraries(DROPBEAR)))
    order: list[str] = []
    missing: list[str] = list(modules) if modules and kernel.modules_dir is None else []
    if modules and kernel.modules_dir is not None:
        dep = kernel.modules_dir / "modules.dep"
        builtin = kernel.modules_dir / "modules.builtin"
        order, missing = resolve_modules(
            modules,
            dep.read_text() if dep.exists() else "",
            builtin.read_text() if builtin.exists() else "",
        )
    key = hashlib.sha256()
    for part in (FORMAT, kernel.release, kernel.sha256, *order, *missing):
        key.update(part.encode() + b"\0")
    key.update(busybox.read_bytes())
    key.update(agent.read_bytes())
    for script in sorted(GUESTFS.iterdir()):
        key.update(script.name.encode() + script.read_bytes())
    for name, src in extra_files:
        key.update(name.encode() + b"\0" + src.read_bytes())
    digest = key.hexdigest()
    path = cache_dir() / "initramfs" / f"{digest[:24]}.cpio"
    if not path.exists():
        atomic_write(path, _render(busybox, agent, kernel, order, extra_files))
    return Initramfs(path=path, sha256=digest, modules=tuple(order), missing_modules=tuple(missing))


def _render(
    busybox: Path, agent: Path, kernel: Kernel, order: list[str], extra_files: tuple[tuple[str, Path], ...]
) -> bytes:
    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/harness", "proc", "sys",
              "dev", "tmp", "run", "mnt", "root", "lib", "lib/modules"):
        cpio.directory(d)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        target = applet.lstrip("/")
        if target != "bin/busybox" and target.split("/")[0] in ("bin", "sbin", "usr"):
            cpio.symlink(target, "/bin/busybox")
    cpio.file("init", (GUESTFS / "init").read_bytes(), 0o755)
    cpio.file("bin/harness-agent", agent.read_bytes(), 0o755)
    cpio.file("etc/profile", (GUESTFS / "profile").read_bytes())
    cpio.file("etc/fstab", (GUESTFS / "fstab").read_bytes())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    if order and kernel.modules_dir is not None:
        for rel in order:
            target = "lib/modules/" + rel.split(".ko", 1)[0] + ".ko"
            cpio.parents(target)
            cpio.file(target, _read_module(kernel.modules_dir / rel))
        listing = "".join(rel.split(".ko", 1)[0] + ".ko\n" for rel in order)
        cpio.file("etc/harness/modules", listing.encode())
    for name, src in extra_files:
        target = name.lstrip("/")
        cpio.parents(target)
        cpio.file(target, src.read_bytes(), 0o755)
    cpio.finish()
    return buf.getvalue()
