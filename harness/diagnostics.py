"""What a kernel under test can report, read from its configuration.

Every verdict the harness gives rests on the kernel saying something when it
goes wrong. A kernel built without `CONFIG_BUG` compiles every WARN(),
WARN_ON() and BUG() to nothing (tinyconfig's EXPERT lets allnoconfig do that):
the dmesg rules can never fire on it and a patch that warns passes. Such a run
must say so, and `--strict` refuses it.

The configuration comes from beside the image (a build artifact's `config`,
a Debian package's `/boot/config-<release>`, a build tree's `.config`), else
from the image itself when it was built with CONFIG_IKCONFIG (the gzip blob
between the `IKCFG_ST` and `IKCFG_ED` markers inside the compressed payload,
as the kernel's scripts/extract-ikconfig finds it), else from the guest's
`/proc/config.gz` (remote targets).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import process
from harness.errors import InfraError

# A remote target's kernel configuration, as the guest tests read it from the
# target, in the run directory.
REMOTE_CONFIG = "target-kernel.config"

# (key, options any of which turns it on, what the kernel reports with it)
FEATURES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("printk", ("CONFIG_PRINTK",), "messages"),
    ("warn_bug", ("CONFIG_BUG",), "WARN/BUG"),
    ("bug_verbose", ("CONFIG_DEBUG_BUGVERBOSE",), "file:line"),
    ("kallsyms", ("CONFIG_KALLSYMS",), "function names"),
    ("kasan", ("CONFIG_KASAN",), "KASAN"),
    ("kfence", ("CONFIG_KFENCE",), "KFENCE"),
    ("ubsan", ("CONFIG_UBSAN",), "UBSAN"),
    ("lockdep", ("CONFIG_PROVE_LOCKING",), "lockdep"),
    ("dma_api_debug", ("CONFIG_DMA_API_DEBUG",), "DMA-API debug"),
)

# Options the plan itself depends on, kept with their value (y or m): the virtio-serial
# command channel needs the virtio console driver (harness.channel.choose_channel).
PLANNING = ("CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_PCI")


@dataclass(frozen=True)
class Diagnostics:
    """The reporting features of one kernel; `source` says where its config came from."""

    source: str | None                       # None: no configuration found
    features: dict[str, bool] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)  # PLANNING options that are on: "y" or "m"

    def option(self, name: str) -> str | None:
        """"y", "m", or None (off, or the configuration is unknown)."""
        return self.options.get(name)

    @property
    def known(self) -> bool:
        return self.source is not None

    def problems(self) -> list[str]:
        """Why tests on this kernel cannot fail (empty when they can, or when unknown)."""
        if not self.known:
            return []
        out = []
        if not self.features.get("printk"):
            out.append("this kernel cannot report anything: CONFIG_PRINTK is off")
        if not self.features.get("warn_bug"):
            out.append("this kernel cannot report WARN/BUG: CONFIG_BUG is off")
        return out

    def notes(self) -> list[str]:
        """What makes its reports less useful without making tests unable to fail."""
        if not self.known:
            return ["what this kernel can report is unknown: no kernel configuration found "
                    "(beside the image, embedded with CONFIG_IKCONFIG, or /proc/config.gz)"]
        if self.features.get("warn_bug") and not self.features.get("kallsyms"):
            return ["traces from this kernel carry addresses, not function names: CONFIG_KALLSYMS is off"]
        return []

    def summary(self) -> str:
        """One line: `reports: messages, WARN/BUG, ...; debug: KFENCE (config: ...)`."""
        if not self.known:
            return "reports: unknown (no kernel configuration found)"
        basic = [(what, self.features.get(key)) for key, _, what in FEATURES[:4]]
        debug = [what for key, _, what in FEATURES[4:] if self.features.get(key)]
        text = "reports: " + ", ".join(what if on else f"NOT {what}" for what, on in basic)
        return f"{text}; debug: {', '.join(debug) or 'none'} (config: {self.source})"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "features": dict(self.features), "options": dict(self.options),
                "problems": self.problems(), "notes": self.notes()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Diagnostics:
        return cls(data.get("source"), {str(k): bool(v) for k, v in (data.get("features") or {}).items()},
                   {str(k): str(v) for k, v in (data.get("options") or {}).items()})


# `CONFIG_X=y` or `=m` on a line of its own (surrounding blanks allowed, as .config readers strip them).
_ENABLED = re.compile(r"^\s*(CONFIG_\w+)=([ym])\s*$", re.M)


def diagnose(config_text: str, source: str) -> Diagnostics:
    """The reporting features a configuration turns on (built in or as a module), and the
    PLANNING options' values."""
    # Only the options FEATURES names, found in the text: a whole parse of a 10,000-line
    # .config (with the build package it imports) cost every run 50-70 ms.
    wanted = {o for _, opts, _ in FEATURES for o in opts} | set(PLANNING)
    on = {m.group(1): m.group(2) for m in _ENABLED.finditer(config_text) if m.group(1) in wanted}
    features = {key: any(o in on for o in opts) for key, opts, _ in FEATURES}
    return Diagnostics(source, features, {o: on[o] for o in PLANNING if o in on})


def config_beside(image: Path, release: str | None = None) -> Path | None:
    """The configuration file that travels with an image, if any."""
    candidates = [image.parent / "config", image.parent / ".config"]
    if release:
        candidates.insert(0, image.parent / f"config-{release}")
    if image.name.startswith("vmlinuz-"):
        candidates.insert(0, image.parent / f"config-{image.name.removeprefix('vmlinuz-')}")
    if image.parts[-4:-1] == ("arch", "x86", "boot"):
        candidates.append(image.parents[3] / ".config")
    return next((c for c in candidates if c.is_file()), None)


def embedded_config(image: Path) -> str | None:
    """The IKCONFIG text inside a bzImage, or None (not built with it, or a compression we cannot read)."""
    try:
        data = image.read_bytes()
    except OSError:
        return None
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    payload = data[start:start + int.from_bytes(data[0x24C:0x250], "little")]
    vmlinux = _decompress(payload)
    if vmlinux is None:
        return None
    begin = vmlinux.find(b"IKCFG_ST")
    end = vmlinux.find(b"IKCFG_ED", begin + 8)
    if begin < 0 or end < 0:
        return None
    try:
        return gzip.decompress(vmlinux[begin + 8:end]).decode("utf-8", "replace")
    except (OSError, EOFError, zlib.error):
        return None


def _decompress(payload: bytes) -> bytes | None:
    # The payload is one compressed stream followed by its 4-byte decompressed size.
    try:
        if payload[:2] == b"\x1f\x8b":
            return zlib.decompressobj(31).decompress(payload)
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor().decompress(payload)
        if payload[:3] == b"BZh":
            return bz2.BZ2Decompressor().decompress(payload)
        if payload[:1] == b"\x5d":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
        if payload[:4] == b"\x28\xb5\x2f\xfd" and shutil.which("zstd"):
            return process.run(["zstd", "-d", "-c", "-q"], input=payload[:-4], timeout=60).stdout or None
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, InfraError):
        return None
    return None


def diagnose_image(image: Path, release: str | None = None) -> Diagnostics:
    """What the kernel at `image` can report, from the config beside it or inside it."""
    path = config_beside(image, release)
    if path is not None:
        try:
            return diagnose(path.read_text(errors="replace"), str(path))
        except OSError:
            pass
    text = embedded_config(image)
    if text is not None:
        return diagnose(text, f"embedded in {image} (CONFIG_IKCONFIG)")
    return Diagnostics(None)
