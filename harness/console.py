"""Pure parsers over console lines: what ends a boot wait at once.

Input: decoded console lines without their line ending (the serial console
sends CR LF; the CR is stripped by `split_lines`). Kernel lines may carry a
`[    1.234567] ` timestamp prefix, which these patterns tolerate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.dmesg import default_rules

# The dmesg rules that end a boot at once: the same patterns the engine uses.
_FATAL = tuple((r.id, r.pattern) for r in default_rules() if r.id in ("panic", "oops"))
_BANNER = re.compile(r"Linux version \d+\.\d+")


@dataclass(frozen=True)
class BootFault:
    kind: str
    line: str


class BootScanner:
    """Feeds on console lines; reports the first fault that must end a boot.

    A second "Linux version" banner means the guest reset (a triple fault, or
    a reboot the profile did not suppress).
    """

    def __init__(self) -> None:
        self.banners = 0
        self.fault: BootFault | None = None

    def feed(self, line: str) -> BootFault | None:
        if self.fault is not None:
            return self.fault
        if _BANNER.search(line):
            self.banners += 1
            if self.banners > 1:
                self.fault = BootFault("reset", line)
                return self.fault
        for kind, pattern in _FATAL:
            if pattern.search(line):
                self.fault = BootFault(kind, line)
                return self.fault
        return None


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Split raw console bytes into complete decoded lines and the unfinished rest."""
    *complete, rest = buffer.split(b"\n")
    return [c.rstrip(b"\r").decode("utf-8", "replace") for c in complete], rest
