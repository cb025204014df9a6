"""One kernel build: inputs -> cache key -> (locked) configure, compile, collect -> artifact.

The artifact lands in a content-addressed cache: same source + series +
fragments + toolchain = hit, returned without running make. A failed build is
never published (it would be a cache hit); its log is kept beside the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.build.artifact import ARTIFACT_META, FORMAT, locked, publish, sweep_staging, write_meta
from harness.build.command import run
from harness.build.kconfig import (
    Dropped,
    Fragment,
    dropped_options,
    kconfig_input,
    load_fragment,
    read_config,
    symbols_added,
)
from harness.build.make import (
    ARCH,
    COMPILE_DEADLINE,
    Meter,
    Progress,
    first_errors,
    make_args,
    run_make,
    toolchain,
    warnings_of,
)
from harness.build.progress import Plan, Record, Terminal, load_record, plan_for, save_record
from harness.build.series import Patch, load_series
from harness.build.source import CachedTree, Source, import_tree, imported, resolve_source
from harness.build.spec import BuildSpec
from harness.errors import BadInput, InfraError, KernelFault
from harness.hashing import file_sha256
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


@dataclass
class BuildResult:
    artifact: Path
    release: str
    cached: bool
    seconds: float
    dropped: list[str]
    steps: list[PatchStep] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["artifact"] = str(self.artifact)
        data["image"] = str(self.artifact / "bzImage")
        return data


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _default_progress() -> Progress:
    """stderr: a progress bar when it is a terminal, plain lines otherwise (CI logs)."""
    return Terminal() if Terminal.wanted() else _say


def build(spec: BuildSpec, per_patch: bool = False, allow_dropped: bool = False,
          progress: Progress | None = None, patches: list[Patch] | None = None,
          later: list[Patch] | None = None) -> BuildResult:
    """Build (or find in the cache) the kernel for `spec`; `patches`, when given, are
    built instead of the series `spec` names (a bisect builds prefixes of one), and
    `later` are the series' patches after them: a fragment's option that one of those
    adds is not a dropped option yet.
    `progress` takes the build's lines (default: stderr, with a bar on a terminal).

    Raises BadInput (exit 2: missing files, a patch that does not apply, dropped
    options without allow_dropped), BuildFailed (exit 1: the kernel does not
    compile) or InfraError (exit 3: toolchain missing, a git or make step failed
    or outlived its deadline).
    """
    start = time.monotonic()
    progress = progress or _default_progress()
    tools = toolchain()
    source = resolve_source(spec.source)
    fragments = [load_fragment(name) for name in spec.configs]
    if patches is None:
        with tempfile.TemporaryDirectory(prefix="harness-series-") as tmp:
            patches = load_series(spec.series, Path(tmp))
    job = _Inputs(source, patches, fragments, tools, per_patch, allow_dropped, start, progress, later or [])
    hit = _cached(job.artifact, start, progress)
    if hit is not None:
        return hit
    root = cache_dir() / "src" / hashlib.sha256(source.identity.encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    waited = time.monotonic()
    with locked(root / ".lock"):
        job.phases["lock wait"] = time.monotonic() - waited
        # An identical build may have finished while this one waited for the tree.
        hit = _cached(job.artifact, start, lambda _: None)
        if hit is not None:
            return hit
        importing = not imported(root)
        progress(f"build: importing {source.spec}" if importing else f"build: {source.spec}")
        with job.phase("import"):
            tree = import_tree(source, root)
        if importing:
            progress(f"build: imported in {job.phases['import']:.0f}s")
        try:
            with job.phase("reset"):
                tree.reset()
            return job.make(tree, root)
        finally:
            tree.reset()


def build_checkout(tree: Path, source: Source, configs: list[str], progress: Progress | None = None) -> BuildResult:
    """Build (or find in the cache) the commit checked out in `tree`, a cached repository
    with history (harness.build.history) whose builds share `tree`'s parent: its lock
    and one O= directory per configuration, so the next commit is an incremental build.
    `source` names the commit (kind git, identity `git:<sha>`): the artifact is the
    one `build` makes for `--source REPO@<sha>`. Raises as `build` does.
    """
    start = time.monotonic()
    progress = progress or _default_progress()
    job = _Inputs(source, [], [load_fragment(name) for name in configs], toolchain(), False, False, start,
                  progress)
    hit = _cached(job.artifact, start, progress)
    if hit is not None:
        return hit
    with locked(tree.parent / ".lock"):
        hit = _cached(job.artifact, start, lambda _: None)
        if hit is not None:
            return hit
        progress(f"build: {source.spec}")
        return job.make(CachedTree(tree, tree.parent / "pristine"), tree.parent)


def _options(fragments: list[Fragment]) -> list[list[tuple[str, str]]]:
    # What a fragment asks for, in its order: editing a comment is not a new kernel.
    return [list(f.options.items()) for f in fragments]


class _Inputs:
    """Everything that goes into one kernel: its cache key, and the make phases that
    turn it into a published artifact in a tree the caller holds locked. `phases`:
    seconds per phase of this build (lock wait, import, reset, apply, configure, compile, collect),
    recorded with the artifact so a slow build says where its time went."""

    def __init__(self, source: Source, patches: list[Patch], fragments: list[Fragment], tools: dict[str, str],
                 per_patch: bool, allow_dropped: bool, start: float, progress: Progress,
                 later: list[Patch] | None = None) -> None:
        self.source, self.patches, self.fragments, self.tools = source, patches, fragments, tools
        self.later = later or []
        self.per_patch, self.allow_dropped, self.start, self.progress = per_patch, allow_dropped, start, progress
        self.phases: dict[str, float] = {}
        self.base_config = next((f.base for f in fragments if f.base), "tinyconfig")
        self.key = _cache_key(source, patches, fragments, self.base_config, tools, per_patch)
        self.artifact = cache_dir() / "kernels" / self.key

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time what the block does as `name` (added up if the phase comes back)."""
        t = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - t

    def make(self, tree: CachedTree, root: Path) -> BuildResult:
        """Configure, compile and collect in `tree` (out of tree, in `root`/out-<config>),
        then publish. BuildFailed keeps the log beside the cache."""
        config_key = hashlib.sha256(json.dumps([self.base_config, _options(self.fragments)]).encode()).hexdigest()[:12]
        artifact = self.artifact
        artifact.parent.mkdir(parents=True, exist_ok=True)
        sweep_staging(artifact.parent)
        staging = Path(tempfile.mkdtemp(prefix=".art-", dir=artifact.parent))
        (staging / ".owner").write_text(str(os.getpid()))
        job = _KernelBuild(tree, root / f"out-{config_key}", staging / "build.log", self.progress,
                           cache_dir() / "build-history" / f"{config_key}.json",
                           _Configure(self.fragments, self.base_config, self.allow_dropped, self.source.identity,
                                      self.tools))
        kept_log = artifact.parent / f"{self.key}-failed.log"
        try:
            if self.per_patch:
                with self.phase("configure"):
                    job.configure([], self.patches + self.later)
                with self.phase("compile"):
                    steps = job.per_patch(self.patches, self.later)
            else:
                # The whole series first: the configuration is made on the tree it builds
                # (a series may add the Kconfig options its fragments ask for).
                with self.phase("apply"):
                    for i, patch in enumerate(self.patches, 1):
                        tree.apply(patch, i)
                with self.phase("configure"):
                    job.configure(self.patches, self.later)
                with self.phase("compile"):
                    job.compile("build")
                steps = []
            dropped = job.dropped
            with self.phase("collect"):
                release = job.collect(staging)
            write_meta(staging, self.source, self.patches, self.fragments, self.tools, release, dropped, steps,
                        self.start, self.phases)
            publish(staging, artifact)
        except BuildFailed as e:
            # A failed build is never published (it would be a cache hit); its log is kept.
            shutil.copy2(job.log, kept_log)
            raise BuildFailed(str(e).replace(str(job.log), str(kept_log)), e.lines, e.steps) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.progress(f"build: {release} in {time.monotonic() - self.start:.0f}s -> {artifact}")
        return BuildResult(artifact, release, False, time.monotonic() - self.start, [str(d) for d in dropped], steps)


def _cache_key(source: Source, patches: list[Patch], fragments: list[Fragment], base_config: str,
               tools: dict[str, str], per_patch: bool) -> str:
    """The artifact's name: a hash of everything that goes into the kernel."""
    key: dict[str, Any] = {"format": FORMAT, "source": source.identity, "patches": [p.sha256 for p in patches],
                           "options": _options(fragments), "base": base_config, "tools": tools,
                           "per_patch": per_patch, "arch": ARCH}
    if any(_changes_kconfig(p) for p in patches):
        # Configured after the series (harness 2026-11): before, on the pristine tree, which
        # a series that changes Kconfig defaults made a different kernel of the same inputs.
        key["configured"] = "after the series"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _changes_kconfig(patch: Patch) -> bool:
    return any(kconfig_input(path) for path in patch.paths)


@dataclass(frozen=True)
class _Configure:
    """What a build's configuration is made of: a base target, fragments merged over it
    in order, whether dropped options are allowed, the pristine source's identity and
    the toolchain (Kconfig asks the compiler what it supports)."""

    fragments: list[Fragment]
    base: str
    allow_dropped: bool
    source: str
    tools: dict[str, str]


def _cached(artifact: Path, start: float, progress: Progress) -> BuildResult | None:
    """The published artifact, if there is one whose image still matches its recorded hash.

    A damaged entry (a truncated or edited bzImage, unreadable metadata) is
    removed with a line saying so, and the kernel is built again."""
    meta_path = artifact / ARTIFACT_META
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        intact = file_sha256(artifact / "bzImage") == meta["image_sha256"]
        result = BuildResult(artifact, meta["release"], True, time.monotonic() - start, meta["dropped"],
                             [PatchStep(**s) for s in meta.get("steps", [])])
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        progress(f"build: cached artifact {artifact} is damaged (image hash or metadata): building it again")
        shutil.rmtree(artifact, ignore_errors=True)
        return None
    return result


class _KernelBuild:
    """The make phases of one build: in the (locked) cached tree, out of tree in `out`
    (reused by builds with the same fragments, hence incremental), logged to `log`."""

    def __init__(self, tree: CachedTree, out: Path, log: Path, progress: Progress, record: Path,
                 settings: _Configure) -> None:
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
        stamp = json.dumps([settings.source, [p.sha256 for p in applied if _changes_kconfig(p)], settings.base,
                            _options(settings.fragments), settings.tools, ARCH], sort_keys=True)
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
            if _changes_kconfig(patch):
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


