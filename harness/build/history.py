"""Cached repositories with history: where a bisect over a git range builds.

`build` imports one commit's files as a new tree, so each commit of a range
would be a cold build. A bisect instead checks commits out, one after the
other, in one cached clone of the user's repository, and builds them all in
one O= directory per configuration (`pipeline.build_checkout`): git leaves the
files a step does not change alone, mtimes included, so each step after the
first is an incremental build.

The clone borrows the user's objects (`git clone --shared`: nothing is copied,
the user's repository is only read) and lives in `cache/history/<key>`, one
per user repository (its common git directory, so a worktree and its main
checkout share one). Builds lock `<key>/.lock`; a bisect holds
`<key>/bisect.lock` for as long as it moves the clone's HEAD.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.build.command import Ran, git
from harness.build.source import Source
from harness.errors import BadInput, InfraError
from harness.paths import cache_dir

_CLONED = "harness-history"   # in .git of a finished clone: the repository it borrows from


@dataclass(frozen=True)
class HistoryRepo:
    spec: str       # the repository as the user named it
    origin: Path    # its common git directory
    tree: Path      # the clone's work tree

    def git(self, *args: str, timeout: float = 600) -> Ran:
        return git(self.tree, *args, timeout=timeout)

    def commit(self, rev: str) -> str:
        """The full hash of `rev` in the user's repository; BadInput if it names no commit."""
        proc = git(self.origin, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", timeout=60)
        if not proc.ok:
            raise BadInput(f"source {self.spec}: {rev!r} is not a commit there")
        return proc.out.strip()

    def in_origin(self, *args: str, timeout: float = 300) -> str:
        """What a read-only git command prints in the user's repository; InfraError if it fails."""
        return git(self.origin, *args, timeout=timeout).check(f"git {args[0]} in {self.spec}").out

    def subject(self, commit: str) -> str:
        return self.in_origin("log", "-1", "--format=%s", commit).strip()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD", timeout=60).check("git rev-parse HEAD").out.strip()

    def is_ancestor(self, older: str, newer: str) -> bool:
        return git(self.origin, "merge-base", "--is-ancestor", older, newer, timeout=300).ok

    def checkout(self, commit: str) -> None:
        """The clone's work tree at `commit` (detached), nothing else in it. InfraError if git cannot."""
        self.git("checkout", "-q", "-f", "--detach", commit, timeout=1800).check(f"checking out {commit[:12]}")
        self.git("clean", "-q", "-f", "-d", "-x", timeout=600).check("git clean")

    def source(self, commit: str) -> Source:
        """What `build_checkout` records for `commit`: the identity `--source REPO@<commit>` has,
        so either way of building it is the same cached artifact."""
        return Source(f"{self.spec}@{commit}", "git", self.origin, commit, f"git:{commit}")

    @contextmanager
    def bisecting(self) -> Iterator[None]:
        """Hold the clone for one bisect, cloning first if it is not there yet.
        InfraError at once if another bisect holds it, or if the clone fails."""
        self.tree.parent.mkdir(parents=True, exist_ok=True)
        with open(self.tree.parent / "bisect.lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise InfraError(f"another bisect is using {self.tree} ({f.read().strip() or 'pid unknown'})"
                                 ) from None
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            if not (self.tree / ".git" / _CLONED).is_file():
                _clone(self.origin, self.tree.parent)
            yield


def open_history(spec: str) -> HistoryRepo:
    """The cached clone of the git repository `spec` names (a work tree or a bare
    repository); `bisecting` makes it on first use. Raises BadInput if `spec` is
    not a git repository."""
    path = Path(spec).expanduser()
    if "@" in spec and not path.exists():
        raise BadInput(f"source {spec}: name the repository alone; the range is --good/--bad")
    if not path.is_dir():
        raise BadInput(f"source {spec}: no such directory")
    proc = git(path, "rev-parse", "--path-format=absolute", "--git-common-dir", timeout=60)
    if not proc.ok:
        raise BadInput(f"source {spec}: not a git repository (a range needs history)")
    origin = Path(proc.out.strip()).resolve()
    root = cache_dir() / "history" / hashlib.sha256(str(origin).encode()).hexdigest()[:16]
    return HistoryRepo(spec, origin, root / "src")


def _clone(origin: Path, root: Path) -> None:
    """`git clone --shared --no-checkout` into a staging directory, renamed into place when done."""
    staging = Path(tempfile.mkdtemp(prefix=".clone-", dir=root))
    try:
        git(None, "clone", "-q", "--shared", "--no-checkout", str(origin), str(staging / "src"),
            timeout=1800).check(f"cloning {origin}")
        (staging / "src" / ".git" / _CLONED).write_text(f"{origin}\n")
        tree = root / "src"
        if tree.exists():
            shutil.rmtree(tree)
        (staging / "src").rename(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
