"""Which build a kernel is, and what people call it.

A kernel in results is identified by its build, not by its release string:
the sample series and a series on top of it, built from one source, both
report `6.12.117+`. The key of a build is the artifact's cache key
(`artifact:<key>`: source, series, config fragments and toolchain) or, for a
bzImage or a Debian package, the image's hash (`image:<sha256>`). A kernel
known only by its release (a remote target's) is `release:<release>@<where>`.

The rest names the build for people: the release, then what tells it from
other builds of that release (the series' name and patch count; the config
fragments and the distribution's package version when those are what differs).
`--label NAME` replaces the name where a run was given one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# How much a name says, in the order it is added when two builds would share a name.
SERIES, FRAGMENTS, VERSION, KEY = 0, 1, 2, 3


@dataclass(frozen=True)
class BuildIdentity:
    key: str
    release: str
    series: str | None = None          # the series' name, when the build applied one
    patches: int = 0
    fragments: tuple[str, ...] = ()    # config fragments by name, in the order merged
    version: str | None = None         # the distribution's build of it ("Debian 6.1.192-2")

    @property
    def short_key(self) -> str:
        """`artifact:466cc815580f`: enough of the key to tell builds apart on a screen."""
        kind, sep, value = self.key.partition(":")
        return f"{kind}:{value[:12]}" if sep and kind in ("artifact", "image") else self.key

    def name(self, detail: int = SERIES) -> str:
        """The release and the series; from `detail` FRAGMENTS on also the fragments, then the
        package version, then the short key."""
        parts = [self.release or "unknown"]
        if self.series is not None:
            parts.append(f"{self.series} ({self.patches} patch{'' if self.patches == 1 else 'es'})")
        if detail >= FRAGMENTS and self.fragments:
            parts.append(f"[{'+'.join(self.fragments)}]")
        if detail >= VERSION and self.version:
            parts.append(f"({self.version})")
        if detail >= KEY:
            parts.append(self.short_key)
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "release": self.release, "series": self.series, "patches": self.patches,
                "fragments": list(self.fragments), "version": self.version}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildIdentity:
        """Raises KeyError or TypeError for data that is not an identity."""
        fragments = data.get("fragments") or []
        if not isinstance(data["key"], str) or not isinstance(fragments, list):
            raise TypeError("expected a key string and a list of fragments")
        return cls(key=data["key"], release=str(data.get("release") or ""),
                   series=str(data["series"]) if data.get("series") is not None else None,
                   patches=int(data.get("patches") or 0), fragments=tuple(str(f) for f in fragments),
                   version=str(data["version"]) if data.get("version") else None)


def unique_names(builds: Sequence[tuple[BuildIdentity, str | None]]) -> list[str]:
    """A name for each (identity, label) of distinct builds, in order, no two alike.

    A label is kept as given; a build without one is named with as little
    detail as tells it from the others. A label two builds share, or a name no
    detail separates, gets the short key.
    """
    detail = [SERIES] * len(builds)

    def name(i: int) -> str:
        identity, label = builds[i]
        if label:
            return label if detail[i] < KEY else f"{label} {identity.short_key}"
        return identity.name(detail[i])

    while True:
        names = [name(i) for i in range(len(builds))]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and detail[i] < KEY]
        if not clashing:
            return names
        for i in clashing:
            detail[i] = KEY if builds[i][1] else detail[i] + 1


# -- what a build's record says about it -------------------------------------------------

_NUMBERED = re.compile(r"^\d{4}-")
_MBOX_PART = re.compile(r"#\d+$")


def series_name(files: Sequence[str]) -> str | None:
    """The name of the series a build applied, from the file each patch came from as the build
    recorded it: `MBOX#N` for an mbox's parts (the mbox's name), `DIR/NAME` for a directory's
    patches in the order of its `series` file (the directory's name, even when the file lists
    patches that live elsewhere), a single patch file (its name without the number)."""
    if not files:
        return None
    if any(_MBOX_PART.search(f) for f in files):
        return _stem(Path(_MBOX_PART.sub("", files[0])).name)
    if len(files) > 1:
        # The directory the series was given as prefixes every entry, un-normalised.
        common = Path(os.path.commonpath(files)).name
        return common or "series"
    path = Path(files[0])
    if (path.parent / "series").is_file():
        return path.parent.name
    return _NUMBERED.sub("", _stem(path.name))


def _stem(name: str) -> str:
    for suffix in (".patch", ".diff", ".mbox", ".mbx", ".eml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def fragment_names(paths: Sequence[str]) -> tuple[str, ...]:
    """`kconfigs/base.config` -> `base`."""
    return tuple(_stem(Path(p).name).removesuffix(".config") for p in paths)


def distro_version(version_text: str) -> str | None:
    """The distribution's build from a kernel's version string (`... SMP PREEMPT_DYNAMIC Debian
    6.1.192-2 (2026-11-16)` -> `Debian 6.1.192-2`); None for a kernel built elsewhere."""
    m = re.search(r"\bDebian (\S+)", version_text)
    return f"Debian {m.group(1)}" if m else None


def names_by_key(runs: Sequence[tuple[BuildIdentity, str | None]]) -> dict[str, str]:
    """The name of each build among `runs` (each run's identity and label), by key, in the order the
    builds first appear: runs of one build are one build whatever their labels (its labels are
    joined), and builds that share a release are told apart (see unique_names)."""
    builds: dict[str, BuildIdentity] = {}
    labels: dict[str, list[str]] = {}
    for identity, label in runs:
        builds.setdefault(identity.key, identity)
        seen = labels.setdefault(identity.key, [])
        if label and label not in seen:
            seen.append(label)
    names = unique_names([(identity, ", ".join(labels[key]) or None) for key, identity in builds.items()])
    return dict(zip(builds, names, strict=True))
