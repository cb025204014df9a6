"""A probed fact with its evidence, and the one way the probe reads a file under `root`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fact:
    """One capability: a value and the evidence it was read from."""

    value: bool | str | int | None
    evidence: str


def read_attr(path: Path) -> str | None:
    """A sysfs/procfs attribute's text without surrounding whitespace; None if it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None
