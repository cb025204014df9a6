"""The make phases of one kernel build in a (locked) cached tree: configure (base
config, fragments, olddefconfig, the dropped-option check, the configured .config
kept in the cache), compile (with build progress), the per-patch report, collect.
`harness.build.pipeline` decides what to build and publishes what this makes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.build.command import run
from harness.build.kconfig import Dropped, Fragment, dropped_options, kconfig_input, read_config, symbols_added
from harness.build.make import (
    ARCH,
    COMPILE_DEADLINE,
    Meter,
    Progress,
    first_errors,
    make_args,
    run_make,
    warnings_of,
)
from harness.build.progress import Plan, Record, load_record, plan_for, save_record
from harness.build.series import Patch
from harness.build.source import CachedTree
from harness.errors import BadInput, InfraError, KernelFault
from harness.paths import atomic_write, cache_dir


@dataclass
class PatchStep:
    index: int
    subject: str
    status: str                 # ok | FAILED
    new_warnings: list[str]
    seconds: float
    errors: list[str] = field(default_factory=list)


class BuildFailed(KernelFault):
    """The kernel under test does not compile (exit 1). `steps`: the per-patch report."""

    def __init__(self, message: str, lines: tuple[str, ...] = (), steps: list[PatchStep] | None = None) -> None:
        super().__init__(message, lines)
        self.steps = steps or []


def fragment_options(fragments: list[Fragment]) -> list[list[tuple[str, str]]]:
    # What a fragment asks for, in its order: editing a comment is not a new kernel.
    return [list(f.options.items()) for f in fragments]


def changes_kconfig(patch: Patch) -> bool:
    return any(kconfig_input(path) for path in patch.paths)


@dataclass(frozen=True)
class Configure:
    """What a build's configuration is made of: a base target, fragments merged over it
    in order, whether dropped options are allowed, the pristine source's identity and
    the toolchain (Kconfig asks the compiler what it supports)."""

    fragments: list[Fragment]
    base: str
    allow_dropped: bool
    source: str
    tools: dict[str, str]


class KernelBuild:
    """The make phases of one build: in the (locked) cached tree, out of tree in `out`
    (reused by builds with the same fragments, hence incremental), logged to `log`."""

    def __init__(self, tree: CachedTree, out: Path, log: Path, progress: Progress, record: Path,
                 settings: Configure) -> None:
        self.tree = tree
        self.out = out
        self.log = log
        self.progress = progress
        self.record = record     # the last cold compile of this configuration: its objects and pace
        self.settings = settings
        self.dropped: list[Dropped] = []
        out.mkdir(exist_ok=True)

    def _make(self, *targets: str, label: str, jobs: int | None = None, timeout: float = 600,
              quiet: bool = False, meter: Meter | None = None, cache: bool = True) -> tuple[int, list[str]]:
        return run_make([*make_args(self.tree.path, self.out, jobs), *targets], self.log, label,
                        (lambda _: None) if quiet else self.progress, timeout, meter, cache)

    def _config(self) -> dict[str, str]:
        return read_config((self.out / ".config").read_text())

    def configure(self, applied: list[Patch], pending: list[Patch]) -> None:
        """The base config, the fragments merged over it in order, olddefconfig, on the tree
        with `applied` patched in; then the check that every requested option survived
        (BadInput unless allowed; options that `pending` patches define are not checked
        yet). Sets `dropped`.

        The result depends only on the pristine source, the applied patches that change
        what the config targets read (Kconfig files, kconfig, configs/), the base, the
        options and the toolchain: it is kept in the cache (`configs/`) under a hash of
        them, and the next build with the same ones (a new series on the same source and
        fragments, an edited patch, the same configuration in a new O= directory) starts
        from a copy instead of two runs of make over every Kconfig file. (A copy, as the
        build's own syncconfig writes to .config.)"""
        settings = self.settings
        stamp = json.dumps([settings.source, [p.sha256 for p in applied if changes_kconfig(p)], settings.base,
                            fragment_options(settings.fragments), settings.tools, ARCH], sort_keys=True)
        kept = cache_dir() / "configs" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:24]}.config"
        for old in (".harness-config", ".harness-config.source"):     # kept by harness versions before 2026-11
            (self.out / old).unlink(missing_ok=True)
        if kept.is_file():
            shutil.copyfile(kept, self.out / ".config")
            with open(self.log, "a") as f:
                f.write(f"\n### configure: {kept} (made by an earlier build of {settings.source} with the same "
                        "Kconfig, options and toolchain)\n")
        else:
            # With -j: the first make in a new O= directory compiles kconfig's own programs
            # (conf, its lexer and parser), which a serial make did one file at a time.
            jobs = os.cpu_count() or 1
            status, lines = self._make(settings.base, label=settings.base, jobs=jobs)
            if status != 0:
                raise InfraError(f"make {settings.base} failed: {' | '.join(lines[-3:])}")
            with open(self.out / ".config", "a") as f:
                for frag in settings.fragments:
                    f.write(f"\n# --- fragment {frag.path} ---\n{frag.text}\n")
            status, lines = self._make("olddefconfig", label="olddefconfig", jobs=jobs)
            if status != 0:
                raise InfraError(f"make olddefconfig failed: {' | '.join(lines[-3:])}")
            atomic_write(kept, (self.out / ".config").read_text())
        later = frozenset().union(*(symbols_added(p.data) for p in pending))
        dropped = dropped_options(settings.fragments, self._config(), self.tree.has_symbol, later)
        if dropped and not settings.allow_dropped:
            raise BadInput("config options did not survive olddefconfig: " + "; ".join(map(str, dropped))
                           + " (--allow-dropped to build anyway)")
        for d in dropped:
            if d not in self.dropped:
                self.progress(f"build: warning: {d}")
        self.dropped = dropped

    def compile(self, label: str) -> list[str]:
        """bzImage (and modules if enabled); BuildFailed with the first compiler errors."""
        config = self._config()
        targets = ["bzImage"] + (["modules"] if config.get("CONFIG_MODULES") == "y" else [])
        cold = not (self.out / "vmlinux").exists()
        started = time.time()

        def plan() -> Plan:
            return plan_for(self.tree.path, self.out, config, load_record(self.record), cold, started)

        meter = Meter(label, plan)
        # ccache only where this directory has built before (see make.make_env).
        status, lines = self._make(*targets, label=label, jobs=os.cpu_count() or 1, timeout=COMPILE_DEADLINE,
                                   meter=meter, cache=not cold)
        if status != 0:
            errors = first_errors(lines)
            raise BuildFailed(f"kernel does not compile: {' | '.join(errors[:3])} (log {self.log})", tuple(errors))
        record = Record.of(meter.times, time.monotonic() - meter.start)
        if cold and record is not None:
            save_record(self.record, record)
        return lines

    def per_patch(self, patches: list[Patch], later: list[Patch]) -> list[PatchStep]:
        """Build the base, then after each patch in order (ktest's patchcheck), configured
        again after a patch that changes Kconfig; BuildFailed naming the first patch that
        breaks the build, with the report so far."""
        t = time.monotonic()
        base_warnings = warnings_of(self.compile("base"))
        steps = [PatchStep(0, "(base, no patches)", "ok", [], time.monotonic() - t)]
        for i, patch in enumerate(patches, 1):
            t = time.monotonic()
            self.tree.apply(patch, i)
            if changes_kconfig(patch):
                self.configure(patches[:i], patches[i:] + later)
            try:
                lines = self.compile(f"patch {i}/{len(patches)}")
            except BuildFailed as e:
                steps.append(PatchStep(i, patch.subject, "FAILED", [], time.monotonic() - t, list(e.lines)))
                self.progress(f"build: patch {i} {patch.subject!r}: FAILED")
                s = steps[-1]
                raise BuildFailed(f"patch {s.index} ({s.subject!r}) breaks the build: "
                                  + " | ".join(s.errors[:3]) + f" (log {self.log})", tuple(s.errors), steps) from None
            new = sorted(warnings_of(lines) - base_warnings)
            steps.append(PatchStep(i, patch.subject, "ok", new, time.monotonic() - t))
            self.progress(f"build: patch {i} {patch.subject!r}: ok" + (f", {len(new)} new warnings" if new else ""))
        return steps

    def collect(self, staging: Path) -> str:
        """bzImage, config, System.map and installed modules into `staging`; the release."""
        # kbuild writes the release during the build; asking make costs a parse of the top Makefile.
        written = self.out / "include" / "config" / "kernel.release"
        release = (written.read_text().strip() if written.is_file() else
                   run([*make_args(self.tree.path, self.out), "-s", "kernelrelease"], timeout=120).out.strip())
        shutil.copy2(self.out / "arch/x86/boot/bzImage", staging / "bzImage")
        for name in (".config", "System.map"):
            shutil.copy2(self.out / name, staging / name.lstrip("."))
        if self._config().get("CONFIG_MODULES") == "y":
            status, lines = self._make(f"INSTALL_MOD_PATH={staging / 'modules'}", "modules_install",
                                       label="modules_install", timeout=1800, quiet=True)
            if status != 0:
                raise InfraError(f"modules_install failed: {' | '.join(lines[-3:])}")
        return release
