"""Probe answers kept per host boot and QEMU binary.

Asking QEMU what it can do takes four QEMU start-ups and reading the host's
dmesg (about 0.2 s on 2 cores), on every `harness run`. Neither answer changes
while the host stays up and the QEMU binary stays the same file: QEMU's
objects and properties are compiled in, and the dmesg lines the probe looks
for (SEV/SNP firmware API, TDX module) are printed once at boot. So they are
kept in `<cache>/probe/qemu-<hash of the path>.json`, keyed by the host's boot
id and the binary's path, size and mtime; a reboot or a new QEMU (an upgrade,
a rebuild, another `--qemu`) probes again. What can change while the host is
up (module parameters, /dev, IOMMU groups, vfio-pci, the PCI TSM state,
firmware files) is always read afresh, and so is nothing here decided without
a key: a host whose boot id cannot be read is probed every time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.paths import atomic_write, cache_dir
from harness.probe.facts import read_attr

# A module attribute so tests can stand in another boot.
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class CacheKey:
    """What a cached answer is valid for: this host boot and this QEMU file."""

    boot_id: str
    qemu: str
    size: int
    mtime_ns: int

    def text(self) -> str:
        return f"{self.boot_id}:{self.qemu}:{self.mtime_ns}:{self.size}"

    def describe(self) -> str:
        return f"host boot {self.boot_id}, {self.qemu} ({self.size} bytes, mtime {self.mtime_ns})"


def cache_key(qemu: str) -> CacheKey | None:
    """The key for `qemu` on this host boot; None (no caching) if either cannot be read."""
    boot_id = read_attr(BOOT_ID)
    try:
        st = os.stat(qemu)
    except OSError:
        return None
    if not boot_id:
        return None
    return CacheKey(boot_id, qemu, st.st_size, st.st_mtime_ns)


def _path(qemu: str) -> Path:
    return cache_dir() / "probe" / f"qemu-{hashlib.sha256(qemu.encode()).hexdigest()[:16]}.json"


@dataclass(frozen=True)
class Cached:
    """A cached answer and when it was probed (UTC, ISO 8601)."""

    probed_at: str
    data: dict[str, Any]


def load(key: CacheKey) -> Cached | None:
    """The answer stored for `key`, or None (none stored, another key, unreadable)."""
    try:
        doc = json.loads(_path(key.qemu).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key.text() or not isinstance(doc.get("data"), dict):
        return None
    return Cached(str(doc.get("probed_at", "unknown")), doc["data"])


def store(key: CacheKey, data: dict[str, Any]) -> Cached:
    """Keep `data` for `key`; a cache that cannot be written only costs the next run a probe."""
    cached = Cached(datetime.now(UTC).isoformat(timespec="seconds"), data)
    try:
        atomic_write(_path(key.qemu), json.dumps({"key": key.text(), "probed_at": cached.probed_at,
                                                  "data": data}, indent=1) + "\n")
    except OSError:
        pass
    return cached
