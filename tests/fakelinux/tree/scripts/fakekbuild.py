#!/usr/bin/env python3
"""The build system of the fake kernel tree (called by ../Makefile, one subcommand a target).

  config TARGET     tinyconfig, allnoconfig, defconfig or olddefconfig -> OBJTREE/.config
  objects           "compile" each obj-y / obj-m of the Kbuild files that .config enables
  bzImage           arch/x86/boot/bzImage (a setup header with the version string), System.map
  modules           a .ko for each obj-m
  modules_install   INSTALL_MOD_PATH/lib/modules/RELEASE/
  kernelrelease     the release: the Makefile's version + CONFIG_LOCALVERSION

Kconfig is read like kconfig reads it, for a small subset (see ../Kconfig): an
option whose `depends on` is not met is left out of .config, whatever was asked.
The "compiler" reads a C file line by line: `#error` and `#warning` are
reported as gcc reports them (`path:LINE:COL: error: #error "text"`). An object
is rebuilt when its source or include/config/auto.conf is newer, as with make,
and auto.conf is only rewritten when the configuration changes, as kbuild does.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TRISTATE = {"n": 0, "m": 1, "y": 2}
OPTION = re.compile(r"^CONFIG_(\w+)=(.*)$|^# CONFIG_(\w+) is not set$")


@dataclass
class Symbol:
    name: str
    type: str = "bool"          # bool | tristate | string
    prompt: bool = False        # a user may set it (else only its default counts)
    default: str | None = None
    depends: list[str] = field(default_factory=list)


def read_kconfig(srctree: Path, rel: str = "Kconfig") -> list[Symbol]:
    symbols: list[Symbol] = []
    current: Symbol | None = None
    help_indent = -1
    for number, line in enumerate((srctree / rel).read_text().splitlines(), 1):
        text = line.strip()
        indent = len(line.expandtabs()) - len(line.expandtabs().lstrip())
        if help_indent >= 0 and (not text or indent > help_indent):
            continue
        help_indent = -1
        if not text or text.startswith("#"):
            continue
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        if word in ("config", "menuconfig"):
            current = Symbol(rest)
            symbols.append(current)
        elif word == "source":
            symbols += read_kconfig(srctree, rest.strip('"'))
            current = None
        elif current is None:
            sys.exit(f"{rel}:{number}: syntax error: {text}")
        elif word in ("bool", "tristate", "string"):
            current.type, current.prompt = word, bool(rest)
        elif word == "def_bool":
            current.type, current.default = "bool", rest
        elif word == "default":
            current.default = rest
        elif text.startswith("depends on "):
            current.depends.append(text.removeprefix("depends on "))
        elif word == "help":
            help_indent = indent
        else:
            sys.exit(f"{rel}:{number}: unknown statement: {text}")
    return symbols


def expr(text: str, values: dict[str, str | None]) -> int:
    """A dependency expression (SYM, !SYM, &&, ||, y/m/n) as n=0, m=1, y=2."""
    def term(t: str) -> int:
        t = t.strip()
        if t.startswith("!"):
            return 2 - term(t[1:])
        return TRISTATE[t] if t in TRISTATE else TRISTATE.get(values.get(t) or "n", 0)
    return max(min(term(t) for t in part.split("&&")) for part in text.split("||"))


def resolve(symbols: list[Symbol], user: dict[str, str]) -> dict[str, str | None]:
    """Each symbol's value (None: dependencies unmet, left out of .config)."""
    values: dict[str, str | None] = {}
    for _ in range(len(symbols) + 1):           # until nothing changes (forward references)
        new: dict[str, str | None] = {}
        for sym in symbols:
            dep = min((expr(d, values) for d in sym.depends), default=2)
            if dep == 0:
                new[sym.name] = None
            elif sym.type == "string":
                new[sym.name] = user[sym.name] if sym.prompt and sym.name in user else (sym.default or '""')
            else:
                raw = user[sym.name] if sym.prompt and sym.name in user else (sym.default or "n")
                level = min(expr(raw, values), dep)
                if level == 1 and (sym.type == "bool" or values.get("MODULES") != "y"):
                    level = 2                   # no modules: m means built in
                new[sym.name] = "nmy"[level]
        if new == values:
            break
        values = new
    return values


def read_options(path: Path, symbols: list[Symbol], into: dict[str, str] | None = None) -> dict[str, str]:
    """CONFIG_ lines of a .config or fragment; a later line of the file wins, as in
    kconfig, which says so. Symbols the Kconfig does not define are ignored."""
    out = {} if into is None else into
    known = {s.name for s in symbols}
    seen: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = OPTION.match(line.strip())
        if not m:
            continue
        name, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), "n")
        if name not in known:
            continue
        if seen.get(name, value) != value:
            print(f"{path.name}:{number}:warning: override: reassigning to symbol {name}")
        out[name] = seen[name] = value
    return out


class Tree:
    """The source tree (only read) and the object tree O= (written): .config, objects, images."""

    def __init__(self, srctree: Path, objtree: Path, kernelversion: str) -> None:
        self.src = srctree
        self.obj = objtree
        self.kernelversion = kernelversion
        self.config = objtree / ".config"

    def options(self) -> dict[str, str]:
        if not self.config.is_file():
            sys.exit('***\n*** Configuration file ".config" not found!\n***')
        out = {}
        for line in self.config.read_text().splitlines():
            m = OPTION.match(line)
            if m and m.group(1):
                out[m.group(1)] = m.group(2)
        return out

    def release(self) -> str:
        local = self.options().get("LOCALVERSION", '""').strip('"') if self.config.is_file() else ""
        return self.kernelversion + local

    # -- compiling ------------------------------------------------------------------

    def units(self, rel_dir: Path = Path(".")) -> list[tuple[str, str]]:
        """(object path, y or m) for each obj-y / obj-$(CONFIG_X) the configuration enables,
        from the top-level Kbuild down through the directories (`obj-y += dir/`) it names."""
        options = self.options()
        found = []
        for line in (self.src / rel_dir / "Kbuild").read_text().splitlines():
            m = re.match(r"obj-(y|\$\(CONFIG_(\w+)\))\s*\+=\s*(.*)", line)
            if not m:
                continue
            kind = "y" if m.group(1) == "y" else options.get(m.group(2), "n")
            if kind not in ("y", "m"):
                continue
            for name in m.group(3).split():
                if name.endswith("/"):
                    found += self.units(rel_dir / name)
                else:
                    found.append((str(rel_dir / name), kind))
        return found

    def objects(self) -> int:
        # What the harness told ccache (CCACHE_DISABLE on a first compile), for the tests to see.
        print(f"  CCACHE  {'disabled' if os.environ.get('CCACHE_DISABLE') else 'on'}")
        options = self.options()
        auto = self.obj / "include/config/auto.conf"
        text = "".join(f"CONFIG_{k}={v}\n" for k, v in sorted(options.items()))
        if not auto.is_file() or auto.read_text() != text:
            auto.parent.mkdir(parents=True, exist_ok=True)
            auto.write_text(text)
            print("  SYNC    include/config/auto.conf")
        for rel_o, kind in self.units():
            obj = self.obj / rel_o
            src = self.src / (rel_o.removesuffix(".o") + ".c")
            if obj.exists() and obj.stat().st_mtime_ns >= max(src.stat().st_mtime_ns, auto.stat().st_mtime_ns):
                continue
            print(f"  CC {'[M] ' if kind == 'm' else '    '} {rel_o}")
            if not self.compile(src, obj):
                print(f"make[4]: *** [scripts/Makefile.build:229: {rel_o}] Error 1")
                return 2
        return 0

    def compile(self, src: Path, obj: Path) -> bool:
        rel_c = src.relative_to(self.src)
        text = src.read_text()
        # FAKEKBUILD_SLOW=S: each compile takes S seconds (a build to kill half-way).
        time.sleep(float(os.environ.get("FAKEKBUILD_SLOW", "0")))
        ok = True
        for number, line in enumerate(text.splitlines(), 1):
            m = re.match(r"(\s*)#\s*(error|warning)\b\s*(.*)", line)
            if not m:
                continue
            kind, column = m.group(2), len(m.group(1)) + 1
            flag = " [-Wcpp]" if kind == "warning" else ""
            print(f"{rel_c}:{number}:{column}: {kind}: #{kind} {m.group(3)}{flag}")
            ok = ok and kind != "error"
        if ok:
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
            # What kbuild's fixdep leaves beside an object: its command, source and dependencies.
            rel_o = obj.relative_to(self.obj)
            (obj.parent / f".{obj.name}.cmd").write_text(
                f"savedcmd_{rel_o} := fakecc -c -o {rel_o} {src}\n\nsource_{rel_o} := {src}\n\n"
                f"deps_{rel_o} := \\\n    $(wildcard include/config/MODULES) \\\n"
                f"  include/config/auto.conf \\\n\n{rel_o}: $(deps_{rel_o})\n\n$(deps_{rel_o}):\n")
        else:
            obj.unlink(missing_ok=True)
        return ok

    # -- linking and installing ---------------------------------------------------------

    def bzimage(self) -> int:
        built = [rel_o for rel_o, kind in self.units() if kind == "y"]
        digest = hashlib.sha256(b"".join((self.obj / rel_o).read_bytes() for rel_o in built)).digest()
        print("  LD      vmlinux")
        (self.obj / "vmlinux").write_bytes(digest)  # as kbuild leaves it in O= (a directory that has built)
        (self.obj / "System.map").write_text("".join(
            f"ffffffff{0x81000000 + 0x100 * i:08x} T {Path(rel_o).stem.replace('-', '_')}_init\n"
            for i, rel_o in enumerate(built)))
        user = os.environ.get("KBUILD_BUILD_USER", "root")
        host = os.environ.get("KBUILD_BUILD_HOST", "localhost")
        when = os.environ.get("KBUILD_BUILD_TIMESTAMP", "Thu Jan  1 00:00:00 UTC 1970")
        version = f"{self.release()} ({user}@{host}) #1 {when}".encode()
        # The boot protocol's setup header: "HdrS" at 0x202; at 0x20e the version
        # string's offset from 0x200 (harness.kernel.bzimage_release reads both).
        image = bytearray(0x600)
        image[0x1F1] = 1                                # setup_sects
        image[0x1FE:0x200] = b"\x55\xaa"
        image[0x202:0x206] = b"HdrS"
        image[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
        image[0x400:0x400 + len(version)] = version
        out = self.obj / "arch/x86/boot/bzImage"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(bytes(image) + digest)
        print("  BUILD   arch/x86/boot/bzImage")
        print("Kernel: arch/x86/boot/bzImage is ready  (#1)")
        return 0

    def modules(self) -> int:
        names = []
        for rel_o, kind in self.units():
            if kind == "m":
                ko = rel_o.removesuffix(".o") + ".ko"
                print(f"  LD [M]  {ko}")
                (self.obj / ko).write_bytes((self.obj / rel_o).read_bytes())
                names.append(ko)
        (self.obj / "modules.order").write_text("".join(f"{n}\n" for n in names))
        return 0

    def modules_install(self, install_mod_path: str) -> int:
        dest = Path(install_mod_path or "/") / "lib/modules" / self.release()
        order = (self.obj / "modules.order").read_text().split()
        for ko in order:
            target = dest / "kernel" / ko
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.obj / ko).read_bytes())
            print(f"  INSTALL {target}")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "modules.order").write_text("".join(f"kernel/{ko}\n" for ko in order))
        (dest / "modules.dep").write_text("".join(f"kernel/{ko}:\n" for ko in order))
        built = [rel_o for rel_o, kind in self.units() if kind == "y"]
        (dest / "modules.builtin").write_text("".join(f"kernel/{o.removesuffix('.o')}.ko\n" for o in built))
        print(f"  DEPMOD  {self.release()}")
        return 0


def configure(tree: Tree, target: str) -> int:
    """Write OBJTREE/.config for a config target, as kconfig would."""
    if tree.obj != tree.src and (tree.src / ".config").exists():
        print(f"***\n*** The source tree is not clean, please run 'make mrproper'\n*** in {tree.src}\n***")
        return 2
    symbols = read_kconfig(tree.src)
    user: dict[str, str] = {}
    if target in ("allnoconfig", "tinyconfig"):
        user = {s.name: "n" for s in symbols if s.prompt and s.type != "string"}
    if target == "tinyconfig":
        for rel in ("kernel/configs/tiny.config", "arch/x86/configs/tiny.config"):
            if (tree.src / rel).is_file():
                read_options(tree.src / rel, symbols, user)
    elif target == "defconfig":
        read_options(tree.src / "arch/x86/configs/x86_64_defconfig", symbols, user)
    elif target == "olddefconfig" and tree.config.is_file():
        read_options(tree.config, symbols, user)
    values = resolve(symbols, user)
    lines = ["#", "# Automatically generated file; DO NOT EDIT.",
             f"# Linux/x86_64 {tree.kernelversion} Kernel Configuration", "#"]
    for sym in symbols:
        value = values[sym.name]
        if value is None or value == "n" and not sym.prompt:
            continue
        lines.append(f"# CONFIG_{sym.name} is not set" if value == "n" else f"CONFIG_{sym.name}={value}")
    tree.obj.mkdir(parents=True, exist_ok=True)
    tree.config.write_text("\n".join(lines) + "\n")
    print("#\n# configuration written to .config\n#")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--srctree", type=Path, required=True)
    ap.add_argument("--objtree", type=Path, required=True)
    ap.add_argument("--kernelversion", required=True)
    ap.add_argument("--install-mod-path", default="")
    ap.add_argument("step", choices=["config", "objects", "bzImage", "modules", "modules_install", "kernelrelease"])
    ap.add_argument("target", nargs="?")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    tree = Tree(args.srctree, args.objtree, args.kernelversion)
    if args.step == "config":
        return configure(tree, args.target)
    if args.step == "kernelrelease":
        print(tree.release())
        return 0
    if args.step == "modules_install":
        return tree.modules_install(args.install_mod_path)
    return {"objects": tree.objects, "bzImage": tree.bzimage, "modules": tree.modules}[args.step]()


if __name__ == "__main__":
    sys.exit(main())
