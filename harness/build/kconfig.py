"""Config fragments and .config files, and which requested options did not survive.

Pure text in, data out: the one question that needs a kernel tree (does this
Kconfig symbol exist at all?) is asked through a callable the caller passes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import BadInput
from harness.paths import KCONFIGS_DIR

BASES = ("tinyconfig", "defconfig", "allnoconfig")
_OPTION = re.compile(r"^(CONFIG_\w+)=(.*)$|^# (CONFIG_\w+) is not set$")


@dataclass(frozen=True)
class Fragment:
    name: str
    path: Path
    base: str | None           # "tinyconfig" / "defconfig" from `# harness-base:`
    options: dict[str, str]    # CONFIG_X -> "y" / "m" / "\"str\"" / "n"
    text: str = field(repr=False)


_VALUE = re.compile(r'^(y|m|n|-?\d+|0[xX][0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')


def parse_fragment(text: str, where: str = "fragment") -> tuple[str | None, dict[str, str]]:
    """`# harness-base: tinyconfig` and the CONFIG_ lines of a fragment.

    Strict, as a user's file must be: every line is blank, a comment,
    `CONFIG_X=<y|m|n|number|"string">` or `# CONFIG_X is not set`; anything
    else is BadInput naming `where` and the line (a typo would otherwise build
    for minutes and silently ask for nothing)."""
    base = None
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = re.match(r"#\s*harness-base:\s*(\S+)", line)
        if m:
            base = m.group(1)
            continue
        m = _OPTION.match(line)
        if m and m.group(3):
            options[m.group(3)] = "n"
        elif m and _VALUE.match(m.group(2)):
            options[m.group(1)] = m.group(2)
        elif line and not line.startswith("#"):
            raise BadInput(f"config fragment {where}:{number}: not a Kconfig line: {raw.strip()[:80]!r} "
                           '(expected CONFIG_X=y|m|n|number|"string" or # CONFIG_X is not set)')
    return base, options


def read_config(text: str) -> dict[str, str]:
    """A generated .config as CONFIG_X -> value ("n" for `# CONFIG_X is not set`)."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        m = _OPTION.match(line.strip())
        if m:
            options[m.group(3) or m.group(1)] = "n" if m.group(3) else m.group(2)
    return options


def load_fragment(name: str) -> Fragment:
    """A fragment by path, or by name from kconfigs/. Raises BadInput."""
    path = Path(name)
    if not path.is_file():
        path = KCONFIGS_DIR / (name if name.endswith(".config") else f"{name}.config")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in KCONFIGS_DIR.glob("*.config")))
        raise BadInput(f"config fragment {name!r}: not a file and not in kconfigs/ ({known})")
    text = path.read_text()
    base, options = parse_fragment(text, str(path))
    if base not in (None, *BASES):
        raise BadInput(f"config fragment {path}: harness-base {base!r} must be tinyconfig, defconfig or allnoconfig")
    if not options:
        raise BadInput(f"config fragment {path}: no CONFIG_ options")
    return Fragment(path.stem, path, base, options, text)


def kconfig_input(path: str) -> bool:
    """Whether a file can change what make's config targets write: a Kconfig file, a
    config fragment or defconfig (kernel/configs/, arch/*/configs/), kconfig itself and
    the scripts its `$(shell,...)` calls run (scripts/), or the top Makefile (which
    exports the compiler that `$(cc-option,...)` asks)."""
    name = path.rsplit("/", 1)[-1]
    return (name.startswith("Kconfig") or path.startswith(("scripts/", "kernel/configs/")) or path == "Makefile"
            or (path.startswith("arch/") and "/configs/" in path))


_DEFINES = re.compile(r"^\+\s*(?:menu)?config\s+(\w+)\s*$", re.M)


def symbols_added(patch_text: bytes) -> set[str]:
    """The Kconfig symbols a patch defines (`+config FOO`, `+menuconfig FOO` lines)."""
    return {m.group(1) for m in _DEFINES.finditer(patch_text.decode("utf-8", "surrogateescape"))}


@dataclass(frozen=True)
class Dropped:
    option: str
    requested: str
    actual: str
    exists: bool

    def __str__(self) -> str:
        why = "probably an unmet dependency" if self.exists else "no such option in this tree's Kconfig"
        return f"{self.option}: requested {self.requested}, got {self.actual} ({why})"


def dropped_options(fragments: list[Fragment], final: dict[str, str],
                    has_symbol: Callable[[str], bool], later: frozenset[str] = frozenset()) -> list[Dropped]:
    """Every option a fragment asked for that the final .config does not hold.

    `has_symbol("SEV_GUEST")` says whether the tree's Kconfig defines the
    symbol (without its CONFIG_ prefix); it is asked only for dropped options.
    `later`: symbols (no prefix) that patches not applied yet define; not dropped yet.
    """
    wanted: dict[str, str] = {}
    for frag in fragments:
        wanted.update(frag.options)
    out = []
    for option, value in wanted.items():
        actual = final.get(option, "n")
        if actual != value and option.removeprefix("CONFIG_") not in later:
            out.append(Dropped(option, value, "not set" if actual == "n" else actual,
                               has_symbol(option.removeprefix("CONFIG_"))))
    return out
