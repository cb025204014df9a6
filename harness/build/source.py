"""Kernel sources: what the user named, its identity, and its copy in the cache.

The user's tree is never touched: each source is imported once into the cache
(a tarball extracted, a git commit checked out, a directory copied). A build
applies its series with `git apply`, saving each file a patch touches first,
and puts those files back afterwards (`CachedTree.reset`). Files no patch
touched keep their mtimes, so a reused O= directory makes a changed patch an
incremental rebuild. Every git command goes through `command.git`.

(Until 2026-11 the import was a git repository with the tree committed as
`base`: hashing and compressing 1.5 GB of source cost about as much as
extracting it. Such imports are still used as they are.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.build.command import git, run
from harness.build.series import Patch
from harness.errors import BadInput, InfraError
from harness.hashing import file_sha256
from harness.paths import atomic_write, cache_dir

_IMPORTED = "imported.json"           # beside the tree: a finished import (its identity and spec)
_IMPORTED_BY_GIT = "harness-imported"  # in src/.git: an import by earlier versions (a git repository, reset by
                                       # them with git; kept, as the tree in it is the pristine source)
_TOUCHED = "touched.json"             # in the journal: the files the current series changed or added


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
    """A source's tree in the cache: patched, reset to the pristine source, searched.

    No git: before a patch changes a file, the pristine file (or the fact that there
    was none) is saved in `journal`; `reset` writes those back (with new mtimes, so
    make recompiles what the patches had changed) and removes what the patches
    added. Every other file keeps its mtime, which keeps the O= directory's
    objects valid: an edited series is an incremental build."""

    path: Path
    journal: Path

    def _touched(self) -> dict[str, Any]:
        try:
            data = json.loads((self.journal / _TOUCHED).read_text())
        except FileNotFoundError:
            return {"files": {}, "dirs": []}
        except (OSError, ValueError) as e:
            raise InfraError(f"cannot read {self.journal / _TOUCHED}: {e} (remove {self.path.parent} to import "
                             "the source again)") from None
        return dict(data)

    def _write_touched(self, touched: dict[str, Any]) -> None:
        atomic_write(self.journal / _TOUCHED, json.dumps(touched, indent=0))

    def reset(self) -> None:
        """Back to the pristine source; InfraError if a file cannot be put back."""
        touched = self._touched()
        if not touched["files"]:
            return
        saved = self.journal / "files"
        try:
            for rel, existed in touched["files"].items():
                target = self.path / rel
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
                if existed:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _restore(saved / rel, target)
            for rel in sorted(touched["dirs"], key=len, reverse=True):
                with contextlib.suppress(OSError):
                    (self.path / rel).rmdir()
        except OSError as e:
            raise InfraError(f"cannot reset {self.path}: {e}") from None
        self._write_touched({"files": {}, "dirs": []})
        shutil.rmtree(saved, ignore_errors=True)

    def apply(self, patch: Patch, index: int) -> None:
        """git apply one patch (the files it touches saved first); BadInput naming the patch,
        subject and failing file/hunk (the tree is reset first)."""
        paths, err = self._paths(patch)
        if paths is not None:
            self._save(paths)
            proc = git(self.path, "apply", "--whitespace=nowarn", "-", input=patch.data, timeout=300,
                       env=_apply_env(self.path))
            if proc.ok:
                return
            err = proc.err
        where = re.search(r"patch failed: (\S+)", err) or re.search(r"error: (\S+): (?:No such file|does not exist)",
                                                                      err)
        detail = where.group(0) if where else (err.strip().splitlines() or ["no detail"])[0]
        self.reset()
        raise BadInput(f"patch {index} {patch.path} ({patch.subject!r}) does not apply: {detail}")

    def _paths(self, patch: Patch) -> tuple[list[str] | None, str]:
        """The files `patch` touches (git's own reading of it), or None and git's error."""
        proc = git(self.path, "apply", "--numstat", "-z", "-", input=patch.data, timeout=300,
                   env=_apply_env(self.path))
        if not proc.ok:
            return None, proc.err
        # `added<TAB>deleted<TAB>path` per file; for a rename only the new path, so the old
        # one comes from the patch's own `rename from` line.
        paths = [entry.split("\t", 2)[2] for entry in proc.out.split("\0") if entry.count("\t") >= 2]
        for m in re.finditer(rb"^rename from (.+)$", patch.data, re.M):
            old = m.group(1).decode("utf-8", "surrogateescape")
            paths.append(old[1:-1].encode().decode("unicode_escape") if old.startswith('"') else old)
        return paths, ""

    def _save(self, paths: list[str]) -> None:
        """Record each path's pristine state before a patch changes it (once per build)."""
        touched = self._touched()
        saved = self.journal / "files"
        new = [rel for rel in paths if rel not in touched["files"]]
        if not new:
            return
        for rel in new:
            source = self.path / rel
            existed = source.is_symlink() or source.is_file()
            if existed:
                (saved / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, saved / rel, follow_symlinks=False)
            else:
                parent = Path(rel).parent
                while parent != Path(".") and not (self.path / parent).exists():
                    touched["dirs"].append(str(parent))
                    parent = parent.parent
            touched["files"][rel] = existed
        self._write_touched(touched)

    def has_symbol(self, symbol: str) -> bool:
        """Whether a Kconfig file of the tree defines `symbol` (no CONFIG_ prefix)."""
        return run(["grep", "-r", "-q", "-E", "--include=Kconfig*", "--exclude-dir=.git",
                    f"^\\s*(menu)?config {symbol}\\s*$", str(self.path)], timeout=120).ok


def _apply_env(tree: Path) -> dict[str, str]:
    # git apply inside a repository applies paths relative to that repository's top:
    # never let it find one above the cached tree (a cache inside someone's work tree).
    return {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}


def _restore(saved: Path, target: Path) -> None:
    """A saved pristine file back in place, written now (a new mtime: make must see the change)."""
    if saved.is_symlink():
        os.symlink(os.readlink(saved), target)
    else:
        shutil.copyfile(saved, target)
        shutil.copymode(saved, target)


def imported(root: Path) -> bool:
    """Whether `root` holds a finished import (made by this version or an earlier one)."""
    return (root / _IMPORTED).is_file() or (root / "src" / ".git" / _IMPORTED_BY_GIT).exists()


def import_tree(source: Source, root: Path) -> CachedTree:
    """The source's files in `root`/src; imported once. Raises InfraError if a copy fails.

    A tarball is extracted by tar (xz with as many threads as there are cores); a
    git source is checked out through a private index; a directory is copied."""
    tree = root / "src"
    journal = root / "pristine"
    if imported(root):
        return CachedTree(tree, journal)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    what = f"importing {source.spec}"
    try:
        if source.kind == "tarball":
            xz = ["-I", "xz -T0"] if _is_xz(source.path) and shutil.which("xz") else []
            run(["tar", "-x", *xz, "-f", str(source.path), "-C", str(staging), "--strip-components=1"],
                timeout=1800).check(f"{what}: tar")
        elif source.kind == "git":
            _check_out(source, staging, root / ".import-index")
        else:
            run(["cp", "-a", f"{source.path}/.", str(staging)], timeout=1800).check(f"{what}: cp")
            shutil.rmtree(staging / ".git", ignore_errors=True)
        if tree.exists():
            shutil.rmtree(tree)
        shutil.rmtree(journal, ignore_errors=True)
        staging.rename(tree)
        atomic_write(root / _IMPORTED, json.dumps({"identity": source.identity, "spec": source.spec}) + "\n")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return CachedTree(tree, journal)


def _is_xz(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\xfd7zXZ\x00"


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
            git(staging, "apply", "--whitespace=nowarn", input=diff, timeout=300,
                env=_apply_env(staging)).check(f"{what}: git apply")
