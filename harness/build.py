"""Kernel builds: a source, a patch series and config fragments -> a cached artifact.

The user's tree is never touched: each source is imported once into a git
repository in the cache (base commit = the pristine source). A build resets
that tree to the base, applies the series patch by patch with `git apply`,
merges the fragments over their base config, checks that every requested
option survived `olddefconfig`, and runs make out of tree (O=) with ccache.
Resetting with git leaves unchanged files' mtimes alone, so the reused O=
directory makes a changed patch an incremental rebuild. The artifact lands in
a content-addressed cache: same source + series + fragments + toolchain = hit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import BadInput, InfraError, KernelFault
from harness.hashing import file_sha256
from harness.paths import KCONFIGS_DIR, atomic_write, cache_dir, load_yaml

FORMAT = "build-v1"
ARCH = "x86_64"
ARTIFACT_META = "harness-build.json"
_GIT_ID = ["-c", "user.name=harness", "-c", "user.email=harness@localhost", "-c", "commit.gpgsign=false"]
_OPTION = re.compile(r"^(CONFIG_\w+)=(.*)$|^# (CONFIG_\w+) is not set$")


class BuildFailed(KernelFault):
    """The kernel under test does not compile (exit 1). `steps`: the per-patch report."""

    def __init__(self, message: str, lines: tuple[str, ...] = (), steps: list[PatchStep] | None = None) -> None:
        super().__init__(message, lines)
        self.steps = steps or []


# -- inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    path: str
    subject: str
    sha256: str
    data: bytes = field(repr=False)

    def to_json(self) -> dict[str, str]:
        return {"file": self.path, "subject": self.subject, "sha256": self.sha256}


@dataclass(frozen=True)
class Fragment:
    name: str
    path: Path
    base: str | None           # "tinyconfig" / "defconfig" from `# harness-base:`
    options: dict[str, str]    # CONFIG_X -> "y" / "m" / "\"str\"" / "n"
    text: str = field(repr=False)


@dataclass(frozen=True)
class Source:
    spec: str
    kind: str       # tarball | git | directory
    path: Path
    ref: str | None
    identity: str


@dataclass
class BuildSpec:
    source: str
    series: str | None = None
    configs: list[str] = field(default_factory=lambda: ["base"])


def _subject(data: bytes, fallback: str) -> str:
    m = re.search(rb"^Subject: (.*(?:\n[ \t].*)*)", data, re.M)
    if not m:
        return fallback
    text = re.sub(r"\s+", " ", m.group(1).decode("utf-8", "replace")).strip()
    return re.sub(r"^\[[^\]]*PATCH[^\]]*\]\s*", "", text)


def _patch(path: Path, label: str) -> Patch:
    data = path.read_bytes()
    return Patch(label, _subject(data, path.name), hashlib.sha256(data).hexdigest(), data)


def load_series(spec: str | None, workdir: Path) -> list[Patch]:
    """An mbox, a directory of *.patch (ordered by a quilt `series` file if any), or
    a lore message-id fetched with b4. Raises BadInput naming what is wrong."""
    if not spec:
        return []
    path = Path(spec)
    if not path.exists():
        if "@" in spec and "/" not in spec:
            return _b4_series(spec, workdir)
        raise BadInput(f"series {spec}: no such file or directory")
    if path.is_dir():
        order_file = path / "series"
        if order_file.is_file():
            names = [line.split()[0] for line in order_file.read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise BadInput(f"series {order_file}: lists {missing[0]}, which is not in {path}")
        else:
            names = sorted(p.name for p in path.glob("*.patch"))
        if not names:
            raise BadInput(f"series {spec}: no *.patch files and no series file")
        return [_patch(path / n, str(path / n)) for n in names]
    data = path.read_bytes()
    if data.startswith(b"From ") and data.count(b"\nFrom ") >= 1:
        return _split_mbox(path, workdir)
    return [_patch(path, str(path))]


def _split_mbox(path: Path, workdir: Path) -> list[Patch]:
    out = workdir / "mbox"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["git", "mailsplit", f"-o{out}", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BadInput(f"series {path}: not a readable mbox: {proc.stderr.strip()}")
    parts = sorted(out.iterdir())
    return [_patch(p, f"{path}#{i + 1}") for i, p in enumerate(parts)]


def _b4_series(msgid: str, workdir: Path) -> list[Patch]:
    b4 = shutil.which("b4")
    if b4 is None:
        raise BadInput(f"series {msgid}: looks like a message-id, but b4 is not installed")
    out = workdir / "b4"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([b4, "am", "-o", str(out), msgid], capture_output=True, text=True, timeout=300)
    mboxes = sorted(out.glob("*.mbx"))
    if proc.returncode != 0 or not mboxes:
        raise BadInput(f"series {msgid}: b4 could not fetch it: {(proc.stderr or proc.stdout).strip()[-200:]}")
    return _split_mbox(mboxes[0], workdir)


def parse_fragment(text: str) -> tuple[str | None, dict[str, str]]:
    """`# harness-base: tinyconfig` and the CONFIG_ lines of a fragment."""
    base = None
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"#\s*harness-base:\s*(\S+)", line)
        if m:
            base = m.group(1)
            continue
        m = _OPTION.match(line)
        if m:
            if m.group(3):
                options[m.group(3)] = "n"
            else:
                options[m.group(1)] = m.group(2)
    return base, options


def load_fragment(name: str) -> Fragment:
    path = Path(name)
    if not path.is_file():
        path = KCONFIGS_DIR / (name if name.endswith(".config") else f"{name}.config")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in KCONFIGS_DIR.glob("*.config")))
        raise BadInput(f"config fragment {name!r}: not a file and not in kconfigs/ ({known})")
    text = path.read_text()
    base, options = parse_fragment(text)
    if base not in (None, "tinyconfig", "defconfig", "allnoconfig"):
        raise BadInput(f"config fragment {path}: harness-base {base!r} must be tinyconfig, defconfig or allnoconfig")
    if not options:
        raise BadInput(f"config fragment {path}: no CONFIG_ options")
    return Fragment(path.stem, path, base, options, text)


def _file_identity(path: Path) -> str:
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


def resolve_source(spec: str) -> Source:
    """A tarball, a git work tree (optionally @ref) or an unpacked tree. Raises BadInput."""
    path_text, _, ref = spec.partition("@") if "@" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise BadInput(f"source {spec}: no such file or directory")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise BadInput(f"source {spec}: not a tarball")
        return Source(spec, "tarball", path, None, "tar:" + _file_identity(path))
    if not (path / "Makefile").is_file() or not (path / "Kconfig").is_file():
        raise BadInput(f"source {spec}: not a kernel tree (no Makefile and Kconfig)")
    if (path / ".git").exists():
        proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--verify", f"{ref or 'HEAD'}^{{commit}}"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise BadInput(f"source {spec}: {ref or 'HEAD'} is not a commit in {path}")
        commit = proc.stdout.strip()
        if not ref:
            dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "-uno"],
                                   capture_output=True, text=True, timeout=120).stdout
            if dirty.strip():
                # Uncommitted changes are part of what gets built: they go into the identity.
                diff = subprocess.run(["git", "-C", str(path), "diff", "HEAD"], capture_output=True,
                                      timeout=300).stdout
                commit += "+" + hashlib.sha256(diff).hexdigest()[:16]
        return Source(spec, "git", path, ref or None, "git:" + commit)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return Source(spec, "directory", path, None, "dir:" + h.hexdigest())


def toolchain() -> dict[str, str]:
    """Compiler and make versions; InfraError (exit 3) naming every missing piece."""
    missing = [tool for tool in ("gcc", "make", "flex", "bison", "bc", "perl", "git") if shutil.which(tool) is None]
    for header, package in (("/usr/include/libelf.h", "libelf-dev"), ("/usr/include/openssl/ssl.h", "libssl-dev")):
        if not Path(header).exists():
            missing.append(package)
    if missing:
        raise InfraError(f"kernel build toolchain incomplete: missing {', '.join(missing)}")
    versions = {}
    for tool in ("gcc", "make"):
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
        versions[tool] = out.splitlines()[0] if out else "unknown"
    versions["ccache"] = "yes" if shutil.which("ccache") else "no"
    return versions


# -- the cached git tree ---------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _git(tree: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *_GIT_ID, "-C", str(tree), *args], capture_output=True, text=True,
                          timeout=timeout)


def import_tree(source: Source, root: Path) -> Path:
    """The source as a git repository in the cache (tag `base`); imported once."""
    tree = root / "src"
    if (tree / ".git" / "harness-imported").exists():
        return tree
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        if source.kind == "tarball":
            subprocess.run(["tar", "-xf", str(source.path), "-C", str(staging), "--strip-components=1"],
                           check=True, timeout=1800)
        elif source.kind == "git":
            archive = subprocess.Popen(["git", "-C", str(source.path), "archive", source.ref or "HEAD"],
                                       stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(staging)], stdin=archive.stdout, check=True, timeout=1800)
            archive.wait(60)
            if source.ref is None:
                # Uncommitted changes of the user's tree, applied to the copy (never the other way).
                diff = subprocess.run(["git", "-C", str(source.path), "diff", "HEAD", "--binary"],
                                      capture_output=True, timeout=300).stdout
                if diff:
                    subprocess.run(["git", "apply", "--whitespace=nowarn"], input=diff, cwd=staging, check=True,
                                   timeout=300)
        else:
            subprocess.run(["cp", "-a", f"{source.path}/.", str(staging)], check=True, timeout=1800)
            shutil.rmtree(staging / ".git", ignore_errors=True)
        for step in (["init", "-q"], ["add", "-f", "-A", "."], ["commit", "-q", "-m", f"base {source.spec}"],
                     ["tag", "base"]):
            proc = _git(staging, *step, timeout=1800)
            if proc.returncode != 0:
                raise InfraError(f"importing {source.spec}: git {step[0]} failed: {proc.stderr.strip()[-200:]}")
        (staging / ".git" / "harness-imported").write_text(source.identity + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        staging.rename(tree)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return tree


def reset_tree(tree: Path) -> None:
    for args in (["reset", "-q", "--hard", "base"], ["clean", "-q", "-f", "-d", "-x"]):
        proc = _git(tree, *args)
        if proc.returncode != 0:
            raise InfraError(f"cannot reset {tree}: {proc.stderr.strip()}")


def apply_patch(tree: Path, patch: Patch, index: int) -> None:
    """git apply one patch; BadInput naming the patch, subject and failing file/hunk."""
    proc = subprocess.run(["git", "-C", str(tree), "apply", "--index", "--whitespace=nowarn", "-"],
                          input=patch.data, capture_output=True, timeout=300)
    if proc.returncode == 0:
        return
    err = proc.stderr.decode("utf-8", "replace")
    where = re.search(r"patch failed: (\S+)", err) or re.search(r"error: (\S+): (?:No such file|does not exist)", err)
    detail = where.group(0) if where else (err.strip().splitlines() or ["no detail"])[0]
    reset_tree(tree)
    raise BadInput(f"patch {index} {patch.path} ({patch.subject!r}) does not apply: {detail}")


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class Dropped:
    option: str
    requested: str
    actual: str
    exists: bool

    def __str__(self) -> str:
        why = "probably an unmet dependency" if self.exists else "no such option in this tree's Kconfig"
        return f"{self.option}: requested {self.requested}, got {self.actual} ({why})"


def read_config(text: str) -> dict[str, str]:
    return parse_fragment(text)[1]


def dropped_options(fragments: list[Fragment], final: dict[str, str], tree: Path) -> list[Dropped]:
    """Every option a fragment asked for that the final .config does not hold."""
    wanted: dict[str, str] = {}
    for frag in fragments:
        wanted.update(frag.options)
    out = []
    for option, value in wanted.items():
        actual = final.get(option, "n")
        if actual != value:
            out.append(Dropped(option, value, "not set" if actual == "n" else actual,
                               _kconfig_has(tree, option.removeprefix("CONFIG_"))))
    return out


def _kconfig_has(tree: Path, symbol: str) -> bool:
    proc = subprocess.run(["git", "-C", str(tree), "grep", "-q", "-E", f"^\\s*(menu)?config {symbol}\\s*$",
                           "--", "*Kconfig*"], capture_output=True, timeout=120)
    return proc.returncode == 0


# -- make ---------------------------------------------------------------------------


def _make_args(tree: Path, out: Path, jobs: int | None = None) -> list[str]:
    args = ["make", "-C", str(tree), f"O={out}", f"ARCH={ARCH}", "KBUILD_BUILD_USER=harness",
            "KBUILD_BUILD_HOST=harness", "KBUILD_BUILD_TIMESTAMP=Thu Jan  1 00:00:00 UTC 2026"]
    if shutil.which("ccache"):
        args.append("CC=ccache gcc")
    if jobs:
        args.append(f"-j{jobs}")
    return args


def _run_make(args: list[str], log: Path, label: str, progress: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run make, log everything, report progress; returns (status, lines of this run)."""
    lines: list[str] = []
    start = time.monotonic()
    done = threading.Event()

    def report() -> None:
        while not done.wait(10):
            compiled = sum(1 for x in lines if x.lstrip().startswith(("CC ", "CC [M]", "AS ", "LD ")))
            last = next((x.strip() for x in reversed(lines) if x.startswith("  ")), "")
            progress(f"build {label}: {time.monotonic() - start:4.0f}s, {compiled} steps, last {last[:60]}")

    ticker = threading.Thread(target=report, daemon=True)
    ticker.start()
    with open(log, "a") as f:
        f.write(f"\n### {label}: {' '.join(args)}\n")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                lines.append(line.rstrip("\n"))
            status = proc.wait()
        except BaseException:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
        finally:
            done.set()
    return status, lines


def first_errors(lines: list[str], limit: int = 8) -> list[str]:
    errors = [x for x in lines if ": error:" in x or ": fatal error:" in x or "Error " in x and "make" in x]
    return errors[:limit] or lines[-limit:]


def warnings_of(lines: list[str]) -> set[str]:
    """Compiler warnings with line/column numbers dropped (a patch shifts them)."""
    found = set()
    for line in lines:
        if ": warning:" in line:
            found.add(re.sub(r":\d+:\d+:", ":", line.strip()))
    return found


@dataclass
class PatchStep:
    index: int
    subject: str
    status: str                 # ok | FAILED
    new_warnings: list[str]
    seconds: float
    errors: list[str] = field(default_factory=list)


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


def build(spec: BuildSpec, per_patch: bool = False, allow_dropped: bool = False,
          progress: Callable[[str], None] = _say) -> BuildResult:
    """Build (or find in the cache) the kernel for `spec`.

    Raises BadInput (exit 2: missing files, a patch that does not apply, dropped
    options without allow_dropped), BuildFailed (exit 1: the kernel does not
    compile) or InfraError (exit 3: toolchain missing).
    """
    start = time.monotonic()
    tools = toolchain()
    source = resolve_source(spec.source)
    fragments = [load_fragment(name) for name in spec.configs]
    base_config = next((f.base for f in fragments if f.base), "tinyconfig")
    with tempfile.TemporaryDirectory(prefix="harness-series-") as tmp:
        patches = load_series(spec.series, Path(tmp))
    key_src = json.dumps({"format": FORMAT, "source": source.identity, "patches": [p.sha256 for p in patches],
                          "fragments": [f.text for f in fragments], "base": base_config, "tools": tools,
                          "per_patch": per_patch, "arch": ARCH}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    artifact = cache_dir() / "kernels" / key
    if (artifact / ARTIFACT_META).exists():
        meta = json.loads((artifact / ARTIFACT_META).read_text())
        recorded = [PatchStep(**s) for s in meta.get("steps", [])]
        return BuildResult(artifact, meta["release"], True, time.monotonic() - start, meta["dropped"], recorded)
    root = cache_dir() / "src" / hashlib.sha256(source.identity.encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        progress(f"build: importing {source.spec}" if not (root / "src").exists() else f"build: {source.spec}")
        tree = import_tree(source, root)
        config_key = hashlib.sha256(("\n".join(f.text for f in fragments) + base_config).encode()).hexdigest()[:12]
        out = root / f"out-{config_key}"
        out.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".art-", dir=artifact.parent if artifact.parent.exists()
                                        else _mkdir(artifact.parent)))
        log = staging / "build.log"
        kept_log = artifact.parent / f"{key}-failed.log"
        try:
            reset_tree(tree)
            dropped = _configure(tree, out, fragments, base_config, log, allow_dropped, progress)
            steps: list[PatchStep] = []
            if per_patch:
                steps = _per_patch(tree, out, patches, log, progress)
                failed = [s for s in steps if s.status != "ok"]
                if failed:
                    s = failed[0]
                    raise BuildFailed(f"patch {s.index} ({s.subject!r}) breaks the build: "
                                      + " | ".join(s.errors[:3]) + f" (log {log})", tuple(s.errors), steps)
            else:
                for i, patch in enumerate(patches, 1):
                    apply_patch(tree, patch, i)
                _compile(tree, out, log, "build", progress)
            release = _collect(tree, out, staging, log)
            _write_meta(staging, source, patches, fragments, tools, release, dropped, steps, start)
            _publish(staging, artifact)
        except BuildFailed as e:
            # A failed build is never published (it would be a cache hit); its log is kept.
            shutil.copy2(log, kept_log)
            raise BuildFailed(str(e).replace(str(log), str(kept_log)), e.lines, e.steps) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            reset_tree(tree)
    progress(f"build: {release} in {time.monotonic() - start:.0f}s -> {artifact}")
    return BuildResult(artifact, release, False, time.monotonic() - start, [str(d) for d in dropped], steps)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _configure(tree: Path, out: Path, fragments: list[Fragment], base: str, log: Path, allow_dropped: bool,
               progress: Callable[[str], None]) -> list[Dropped]:
    status, lines = _run_make([*_make_args(tree, out), base], log, base, progress)
    if status != 0:
        raise InfraError(f"make {base} failed: {' | '.join(lines[-3:])}")
    config = out / ".config"
    with open(config, "a") as f:
        for frag in fragments:
            f.write(f"\n# --- fragment {frag.path} ---\n{frag.text}\n")
    status, lines = _run_make([*_make_args(tree, out), "olddefconfig"], log, "olddefconfig", progress)
    if status != 0:
        raise InfraError(f"make olddefconfig failed: {' | '.join(lines[-3:])}")
    dropped = dropped_options(fragments, read_config(config.read_text()), tree)
    if dropped and not allow_dropped:
        raise BadInput("config options did not survive olddefconfig: " + "; ".join(map(str, dropped))
                       + " (--allow-dropped to build anyway)")
    for d in dropped:
        progress(f"build: warning: {d}")
    return dropped


def _compile(tree: Path, out: Path, log: Path, label: str, progress: Callable[[str], None]) -> list[str]:
    config = read_config((out / ".config").read_text())
    targets = ["bzImage"] + (["modules"] if config.get("CONFIG_MODULES") == "y" else [])
    status, lines = _run_make([*_make_args(tree, out, os.cpu_count() or 1), *targets], log, label, progress)
    if status != 0:
        errors = first_errors(lines)
        raise BuildFailed(f"kernel does not compile: {' | '.join(errors[:3])} (log {log})", tuple(errors))
    return lines


def _per_patch(tree: Path, out: Path, patches: list[Patch], log: Path,
               progress: Callable[[str], None]) -> list[PatchStep]:
    """Build the base, then after each patch in order (ktest's patchcheck)."""
    t = time.monotonic()
    base_warnings = warnings_of(_compile(tree, out, log, "base", progress))
    steps = [PatchStep(0, "(base, no patches)", "ok", [], time.monotonic() - t)]
    for i, patch in enumerate(patches, 1):
        t = time.monotonic()
        apply_patch(tree, patch, i)
        try:
            lines = _compile(tree, out, log, f"patch {i}/{len(patches)}", progress)
        except BuildFailed as e:
            steps.append(PatchStep(i, patch.subject, "FAILED", [], time.monotonic() - t, list(e.lines)))
            progress(f"build: patch {i} {patch.subject!r}: FAILED")
            break
        new = sorted(warnings_of(lines) - base_warnings)
        steps.append(PatchStep(i, patch.subject, "ok", new, time.monotonic() - t))
        progress(f"build: patch {i} {patch.subject!r}: ok" + (f", {len(new)} new warnings" if new else ""))
    return steps


def _collect(tree: Path, out: Path, staging: Path, log: Path) -> str:
    release = subprocess.run([*_make_args(tree, out), "-s", "kernelrelease"], capture_output=True, text=True,
                             timeout=120).stdout.strip()
    shutil.copy2(out / "arch/x86/boot/bzImage", staging / "bzImage")
    for name in (".config", "System.map"):
        shutil.copy2(out / name, staging / name.lstrip("."))
    if read_config((out / ".config").read_text()).get("CONFIG_MODULES") == "y":
        status, lines = _run_make([*_make_args(tree, out), f"INSTALL_MOD_PATH={staging / 'modules'}",
                                   "modules_install"], log, "modules_install", lambda _: None)
        if status != 0:
            raise InfraError(f"modules_install failed: {' | '.join(lines[-3:])}")
    return release


def _write_meta(staging: Path, source: Source, patches: list[Patch], fragments: list[Fragment],
                tools: dict[str, str], release: str, dropped: list[Dropped], steps: list[PatchStep],
                start: float) -> None:
    meta = {"format": FORMAT, "release": release, "source": {"spec": source.spec, "identity": source.identity},
            "patches": [p.to_json() for p in patches], "fragments": [str(f.path) for f in fragments],
            "toolchain": tools, "dropped": [str(d) for d in dropped], "steps": [asdict(s) for s in steps],
            "seconds": round(time.monotonic() - start, 1)}
    (staging / ARTIFACT_META).write_text(json.dumps(meta, indent=1) + "\n")


def _publish(staging: Path, artifact: Path) -> None:
    if artifact.exists():
        shutil.rmtree(artifact)
    shutil.copytree(staging, artifact)


# -- build specs --------------------------------------------------------------------


def load_spec(path: Path) -> BuildSpec:
    """A build spec YAML: {source, series, configs}; relative paths are relative to the file."""
    data = load_yaml(path, "build spec")
    if not isinstance(data, dict) or "source" not in data:
        raise BadInput(f"build spec {path}: needs a 'source' key")
    unknown = set(data) - {"source", "series", "configs"}
    if unknown:
        raise BadInput(f"build spec {path}: unknown key {sorted(unknown)[0]!r}; known: source, series, configs")

    def rel(value: str | None) -> str | None:
        if value is None or "@" in value and "/" not in value or Path(value).is_absolute():
            return value
        return str((path.parent / value).resolve())

    configs = data.get("configs", ["base"])
    if not isinstance(configs, list):
        raise BadInput(f"build spec {path}: key 'configs' must be a list")
    return BuildSpec(source=str(rel(str(data["source"]))), series=rel(data.get("series")),
                     configs=[c if (KCONFIGS_DIR / f"{c}.config").exists() else str(rel(c)) for c in configs])

