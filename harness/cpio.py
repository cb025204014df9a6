"""A deterministic writer for the kernel's initramfs format (cpio "newc").

Every entry gets mtime 0, uid/gid 0 and a fixed inode sequence, so the same
inputs always give the same bytes (and the same cache key).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

_MAGIC = b"070701"


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._offset = 0
        self._dirs: set[str] = set()

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def _pad4(self) -> None:
        pad = (-self._offset) % 4
        if pad:
            self._write(b"\0" * pad)

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        self._write(_MAGIC + b"".join(b"%08X" % f for f in fields))
        self._write(encoded)
        self._pad4()
        if data:
            self._write(data)
            self._pad4()

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)
        self._dirs.add(name)

    def parents(self, name: str) -> None:
        """Directory entries for every parent of `name` not written yet."""
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self.directory(d)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)
        pad = (-self._offset) % 512
        if pad:
            self._write(b"\0" * pad)
