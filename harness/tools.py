"""Guest tools (guest_tests/tools/*.c): compiled static on the host, cached, shipped in the initramfs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from harness import process
from harness.errors import InfraError
from harness.paths import GUEST_TESTS_DIR, cache_dir

TOOLS_DIR = GUEST_TESTS_DIR / "tools"


def _compiler() -> tuple[str, str]:
    """The C compiler and the first line of its `--version` (part of each tool's cache key)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise InfraError("no C compiler for the guest tools: install gcc and libc6-dev")
    return cc, process.version_line(cc)


def build_tools(sources: Path = TOOLS_DIR) -> tuple[tuple[str, Path], ...]:
    """Each tools/<name>.c as a static binary: ((guest path, host path), ...). Raises InfraError."""
    files = sorted(sources.glob("*.c"))
    if not files:
        return ()
    cc, version = _compiler()
    return tuple((f"/usr/bin/{src.stem}", _static_binary(src, cc, version, "guest tool")) for src in files)


def guest_program(src: Path) -> Path:
    """A program of the initramfs itself (the command agent) as a static binary. Raises InfraError."""
    cc, version = _compiler()
    # The agent compresses the kernel log with zlib (zlib1g-dev's static library).
    return _static_binary(src, cc, version, "guest program", ("-lz",))


def _static_binary(src: Path, cc: str, version: str, what: str, libs: tuple[str, ...] = ("-lpthread",)) -> Path:
    """`src` compiled static with `libs`, cached by the compiler's version, the libraries and the source."""
    key = hashlib.sha256(version.encode() + " ".join(libs).encode() + src.read_bytes()).hexdigest()[:20]
    binary = cache_dir() / "tools" / key / src.stem
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        proc = process.run([cc, "-static", "-O2", "-Wall", "-o", str(tmp), str(src), *libs], timeout=300)
        if not proc.ok:
            detail = " | ".join(proc.err.strip().splitlines()[-3:])
            hint = (" (static libc: install libc6-dev)" if "cannot find -lc" in proc.err
                    else " (static zlib: install zlib1g-dev)" if "cannot find -lz" in proc.err or "zlib.h" in proc.err
                    else "")
            raise InfraError(f"{what} {src.name} does not compile{hint}: {detail}")
        tmp.replace(binary)
    return binary
