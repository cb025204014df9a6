"""The objects a kernel build will compile, counted from the tree: the total build progress shows
when no earlier build of the configuration says it.

`kbuild_objects` reads the Kbuild files and Makefiles under this .config (obj-y,
obj-m with CONFIG_MODULES, <name>-objs/-y lists, ifdef/ifeq on CONFIG_ options):
an estimate for a cold object directory. `stale_objects` reads an object
directory that holds a previous build: the objects whose recorded dependencies
(.cmd files) are newer than they are, which is what make will rebuild. Pure
functions of the files they read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

_ASSIGN = re.compile(r"^([A-Za-z0-9_./-]+?)-(y|m|objs)\s*(?:\+=|:=|=)\s*(.*)$")
_COND = re.compile(r"^(ifdef|ifndef|ifeq|ifneq)\s*(.*)$")
_VAR = re.compile(r"\$\((CONFIG_\w+|BITS|SRCARCH|ARCH)\)")


def _logical_lines(text: str) -> Iterable[str]:
    """Makefile lines with continuations joined and comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0]
        if raw.rstrip().endswith("\\"):
            pending += line.rstrip().removesuffix("\\") + " "
            continue
        yield (pending + line).strip()
        pending = ""


def _condition(kind: str, arg: str, expand: Callable[[str], str]) -> bool | None:
    """Whether an `ifdef`/`ifndef`/`ifeq`/`ifneq` holds; None when it names something
    other than config options (both branches then count)."""
    if kind in ("ifdef", "ifndef"):
        value = expand(f"$({arg.strip()})")
        if "$(" in value:
            return None
        return (value not in ("", "n")) == (kind == "ifdef")
    m = re.match(r"^\(\s*(.*?)\s*,\s*(.*?)\s*\)$", arg.strip())
    if not m:
        return None
    a, b = expand(m.group(1)), expand(m.group(2))
    if "$(" in a + b:
        return None
    return (a == b) == (kind == "ifeq")


def count_objects(srctree: Path, config: dict[str, str], arch: str = "x86") -> int:
    """An estimate of the objects kbuild compiles for `config` (CONFIG_X -> value):
    the obj-y/obj-m/lib-y entries of the Kbuild files (and Makefiles) reachable from
    the top-level Kbuild, with `ifdef`/`ifeq` on config options, composite objects
    counted by their parts, and the boot image's directories. An estimate: calls
    and variables this reader does not expand are skipped."""
    return len(kbuild_objects(srctree, config, arch))


def kbuild_objects(srctree: Path, config: dict[str, str], arch: str = "x86") -> list[str]:
    """The objects `count_objects` counts, as paths relative to the tree."""
    modules = config.get("CONFIG_MODULES") == "y"
    values = {"BITS": "64" if config.get("CONFIG_64BIT") == "y" else "32", "SRCARCH": arch, "ARCH": arch}

    def expand(text: str) -> str:
        text = _VAR.sub(lambda m: config.get(m.group(1), "") if m.group(1).startswith("CONFIG_")
                        else values[m.group(1)], text)
        return re.sub(r"\$\(subst m,y,(\w*)\)", lambda m: m.group(1).replace("m", "y"), text)

    # The top-level directories: the top Kbuild's, and the core/drivers/libs lists of the Makefiles.
    pending = [Path(".")]
    for makefile in (srctree / "Makefile", srctree / "arch" / arch / "Makefile"):
        lists = _lists(makefile, expand)
        for name in ("core", "drivers", "libs"):
            pending += [Path(os.path.normpath(d)) for d in (*lists.get(f"{name}-y", ()),
                                                            *(lists.get(f"{name}-m", ()) if modules else ()))
                        if d.endswith("/")]
    # The boot image is made by the arch Makefile's own rules, not through the Kbuild lists.
    boot = [Path(f"arch/{arch}/boot"), Path(f"arch/{arch}/boot/compressed")]
    seen: set[Path] = set()
    found: list[str] = []
    while pending or boot:
        rel = pending.pop() if pending else boot.pop()
        if rel in seen:
            continue
        seen.add(rel)
        directory = srctree / rel
        found_file = next((directory / n for n in ("Kbuild", "Makefile") if (directory / n).is_file()), None)
        if found_file is None:
            continue
        lists = _lists(found_file, expand)
        wanted = [*lists.get("obj-y", ()), *lists.get("lib-y", ()), *(lists.get("obj-m", ()) if modules else ())]
        if rel in (Path(f"arch/{arch}/boot"), Path(f"arch/{arch}/boot/compressed")):
            wanted += [*lists.get("setup-y", ()), *lists.get("vmlinux-objs-y", ())]
        counted: set[str] = set()
        while wanted:
            item = wanted.pop()
            if item.endswith("/"):
                pending.append(Path(os.path.normpath(rel / item)))
            elif item.endswith(".o") and item not in counted:
                counted.add(item)
                stem = item.removesuffix(".o")
                parts = [*lists.get(f"{stem}-y", ()), *lists.get(stem, ()),
                         *(lists.get(f"{stem}-m", ()) if modules else ())]
                if parts and parts != [item]:
                    wanted += parts
                else:
                    found.append(os.path.normpath(rel / item))
    return found


def _lists(makefile: Path, expand: Callable[[str], str]) -> dict[str, list[str]]:
    """The `NAME-y`/`NAME-m`/`NAME-objs` lists a Makefile assigns, under the conditions
    that hold (`:=`/`=` start a list again, `+=` adds); `NAME-objs` is kept as NAME."""
    try:
        text = makefile.read_text(errors="replace")
    except OSError:
        return {}
    lists: dict[str, list[str]] = {}

    def local(line: str) -> str:
        return re.sub(r"\$\(([\w.-]+-[ym])\)", lambda m: " ".join(lists.get(m.group(1), ())), line)

    # One entry per open conditional: does its current branch hold (None: unknown, counts)?
    branches: list[bool | None] = []
    for line in _logical_lines(text):
        cond = _COND.match(line)
        if cond:
            branches.append(_condition(cond.group(1), cond.group(2), expand))
            continue
        if (line == "else" or line.startswith("else ")) and branches:
            branches[-1] = None if branches[-1] is None else not branches[-1]
            continue
        if line == "endif" and branches:
            branches.pop()
            continue
        holds = all(b is not False for b in branches)
        assign = _ASSIGN.match(local(expand(line))) if holds else None
        if not assign:
            continue
        name = assign.group(1) if assign.group(2) == "objs" else f"{assign.group(1)}-{assign.group(2)}"
        items = [x for x in assign.group(3).split() if "$(" not in x]
        if "+=" in line:
            lists.setdefault(name, []).extend(items)
        else:
            lists[name] = items
    return lists


def stale_objects(objtree: Path, started: float | None = None) -> int | None:
    """How many objects of a previous build in `objtree` make will compile (again):
    those gone, those whose dependency list (kbuild's `.NAME.o.cmd`: the source and
    `deps_...`, config options as include/config/ files) names a file newer than the
    object, and those written since `started` (make, running meanwhile, has done them).
    None when `objtree` holds no previous build."""
    objects: list[tuple[str, float]] = []
    stale = 0
    for root, _, files in os.walk(objtree):
        for name in files:
            if name.startswith(".") and name.endswith(".o.cmd"):
                try:
                    objects.append((os.path.join(root, name), os.stat(os.path.join(root, name[1:-4])).st_mtime))
                except OSError:
                    stale += 1
    if not objects and not stale:
        return None
    oldest = min((built for _, built in objects), default=0.0)
    # Only files newer than the oldest object can make one stale: find those once, then
    # each object's dependencies are a set intersection, not a stat each.
    mtimes: dict[str, float] = {}
    recent: set[str] = set()
    for cmd, built in objects:
        if started is not None and built >= started:
            stale += 1
            continue
        try:
            with open(cmd, errors="replace") as f:
                text = f.read()
        except OSError:
            stale += 1
            continue
        at = text.find("source_")
        deps = set(text[at:].replace("$(wildcard ", " ").replace(")", " ").split()) if at >= 0 else set()
        for dep in deps.difference(mtimes):
            try:
                mtimes[dep] = os.stat(dep if dep.startswith("/") else objtree / dep).st_mtime
            except (OSError, ValueError):
                mtimes[dep] = 0.0
            if mtimes[dep] > oldest:
                recent.add(dep)
        if any(mtimes[dep] > built for dep in deps & recent):
            stale += 1
    return stale
