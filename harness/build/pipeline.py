"""One kernel build: inputs -> cache key -> (locked) configure, compile, collect -> artifact.

The make phases themselves are `harness.build.kernelbuild`.

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
from harness.build.kconfig import Fragment, load_fragment
from harness.build.kernelbuild import (
    BuildFailed,
    Configure,
    KernelBuild,
    PatchStep,
    changes_kconfig,
    fragment_options,
)
from harness.build.make import ARCH, Progress, toolchain
from harness.build.progress import Terminal
from harness.build.series import Patch, load_series
from harness.build.source import CachedTree, Source, import_tree, imported, resolve_source
from harness.build.spec import BuildSpec
from harness.hashing import file_sha256
from harness.paths import cache_dir


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
    job = _Inputs(source, patches, fragments, tools, per_patch, allow_dropped, start, progress, later)
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
        config = json.dumps([self.base_config, fragment_options(self.fragments)])
        config_key = hashlib.sha256(config.encode()).hexdigest()[:12]
        artifact = self.artifact
        artifact.parent.mkdir(parents=True, exist_ok=True)
        sweep_staging(artifact.parent)
        staging = Path(tempfile.mkdtemp(prefix=".art-", dir=artifact.parent))
        (staging / ".owner").write_text(str(os.getpid()))
        job = KernelBuild(tree, root / f"out-{config_key}", staging / "build.log", self.progress,
                           cache_dir() / "build-history" / f"{config_key}.json",
                           Configure(self.fragments, self.base_config, self.allow_dropped, self.source.identity,
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
                           "options": fragment_options(fragments), "base": base_config, "tools": tools,
                           "per_patch": per_patch, "arch": ARCH}
    if any(changes_kconfig(p) for p in patches):
        # Configured after the series (harness 2026-11): before, on the pristine tree, which
        # a series that changes Kconfig defaults made a different kernel of the same inputs.
        key["configured"] = "after the series"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


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
