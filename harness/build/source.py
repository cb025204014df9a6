"""Kernel sources: what the user named, its identity, and its git copy in the cache.

The user's tree is never touched: each source is imported once into a git
repository in the cache (tag `base` = the pristine source). A build resets that
tree to `base` and applies its series with `git apply`. Resetting with git
leaves unchanged files' mtimes alone, so a reused O= directory makes a changed
patch an incremental rebuild. Every git command goes through `command.git`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.build.command import git, run
from harness.build.series import Patch
from harness.errors import BadInput, InfraError
from harness.hashing import file_sha256
from harness.paths import atomic_write, cache_dir

_IMPORTED = "harness-imported"   # in .git of a finished import


@dataclass(frozen=True)
class Source:
    spec: str
    kind: str       # tarball | git | directory
    path: Path
    ref: str | None
    identity: str


def resolve_source(spec: str) -> Source:
    """A tarball, a git work tree (optionally @ref) or an unpacked tree. Raises BadInput."""
    path_text, _, ref = spec.partition("@") if "@" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise BadInput(f"source {spec}: no such file or directory")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise BadInput(f"source {spec}: not a tarball")
        return Source(spec, "tarball", path, None, "tar:" + _tarball_identity(path))
    if not (path / "Makefile").is_file() or not (path / "Kconfig").is_file():
        raise BadInput(f"source {spec}: not a kernel tree (no Makefile and Kconfig)")
    if (path / ".git").exists():
        return Source(spec, "git", path, ref or None, "git:" + _git_identity(spec, path, ref))
    return Source(spec, "directory", path, None, "dir:" + _directory_identity(path))


def _tarball_identity(path: Path) -> str:
    """The tarball's sha256, remembered per path, size and mtime (hashing 150 MB takes a while)."""
    st = path.stat()
    ids = cache_dir() / "sources" / "ids.json"
    try:
        known = json.loads(ids.read_text())
    except (OSError, ValueError):
        known = {}
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in known:
        known[key] = file_sha256(path)
        atomic_write(ids, json.dumps(known, indent=1))
    return str(known[key])


def _git_identity(spec: str, path: Path, ref: str) -> str:
    proc = git(path, "rev-parse", "--verify", f"{ref or 'HEAD'}^{{commit}}", timeout=60)
    if not proc.ok:
        raise BadInput(f"source {spec}: {ref or 'HEAD'} is not a commit in {path}")
    commit = proc.out.strip()
    if not ref and git(path, "status", "--porcelain", "-uno", timeout=120).out.strip():
        # Uncommitted changes are part of what gets built: they go into the identity.
        diff = git(path, "diff", "HEAD", timeout=300).stdout
        commit += "+" + hashlib.sha256(diff).hexdigest()[:16]
    return commit


def _directory_identity(path: Path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CachedTree:
    """The git copy of a source in the cache: reset to `base`, patched, searched."""

    path: Path

    def reset(self) -> None:
        """Back to the pristine source; InfraError if git cannot."""
        for args in (["reset", "-q", "--hard", "base"], ["clean", "-q", "-f", "-d", "-x"]):
            proc = git(self.path, *args)
            if not proc.ok:
                raise InfraError(f"cannot reset {self.path}: {proc.err.strip()}")

    def apply(self, patch: Patch, index: int) -> None:
        """git apply one patch; BadInput naming the patch, subject and failing file/hunk
        (the tree is reset first)."""
        proc = git(self.path, "apply", "--index", "--whitespace=nowarn", "-", input=patch.data, timeout=300)
        if proc.ok:
            return
        err = proc.err
        where = re.search(r"patch failed: (\S+)", err) or re.search(r"error: (\S+): (?:No such file|does not exist)",
                                                                      err)
        detail = where.group(0) if where else (err.strip().splitlines() or ["no detail"])[0]
        self.reset()
        raise BadInput(f"patch {index} {patch.path} ({patch.subject!r}) does not apply: {detail}")

    def has_symbol(self, symbol: str) -> bool:
        """Whether a Kconfig file of the tree defines `symbol` (no CONFIG_ prefix)."""
        return git(self.path, "grep", "-q", "-E", f"^\\s*(menu)?config {symbol}\\s*$", "--", "*Kconfig*",
                   timeout=120).ok


def import_tree(source: Source, root: Path) -> CachedTree:
    """The source as a git repository in `root`/src (tag `base`); imported once.
    Raises InfraError if a copy or git step fails."""
    tree = root / "src"
    if (tree / ".git" / _IMPORTED).exists():
        return CachedTree(tree)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    what = f"importing {source.spec}"
    try:
        if source.kind == "tarball":
            run(["tar", "-xf", str(source.path), "-C", str(staging), "--strip-components=1"],
                timeout=1800).check(f"{what}: tar")
        elif source.kind == "git":
            _check_out(source, staging, root / ".import-index")
        else:
            run(["cp", "-a", f"{source.path}/.", str(staging)], timeout=1800).check(f"{what}: cp")
            shutil.rmtree(staging / ".git", ignore_errors=True)
        for step in (["init", "-q"], ["add", "-f", "-A", "."], ["commit", "-q", "-m", f"base {source.spec}"],
                     ["tag", "base"]):
            git(staging, *step, timeout=1800).check(f"{what}: git {step[0]}")
        (staging / ".git" / _IMPORTED).write_text(source.identity + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        staging.rename(tree)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return CachedTree(tree)


def _check_out(source: Source, staging: Path, index: Path) -> None:
    """The commit's files into `staging` through a private index file, so the user's
    repository and its index stay as they are; then its uncommitted changes, if
    no ref was named (applied to the copy, never the other way)."""
    what = f"importing {source.spec}"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    try:
        for args in (["read-tree", source.ref or "HEAD"], ["checkout-index", "-a", "-f"]):
            git(source.path, f"--work-tree={staging}", *args, timeout=1800, env=env).check(f"{what}: git {args[0]}")
    finally:
        index.unlink(missing_ok=True)
    if source.ref is None:
        diff = git(source.path, "diff", "HEAD", "--binary", timeout=300).stdout
        if diff:
            git(staging, "apply", "--whitespace=nowarn", input=diff, timeout=300).check(f"{what}: git apply")
