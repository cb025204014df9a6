"""`harness export --kcidb`: runs and nights as KCIDB JSON, KernelCI's common results schema.

One document holds three kinds of object, linked by id:

- a checkout per kernel source: the source identity (a tarball's hash, a git
  commit, a Debian package) and the patchset hash, which KCIDB defines as the
  sha256 over the newline-terminated sha256 of each patch in order, the same
  hashes `harness-build.json` records for the series;
- a build per kernel artifact (or prebuilt image): config fragments, compiler,
  duration and the tail of build.log;
- a test per guest test per run: `coco.<module>.<test>[.<parameter>]`, its
  status (passed/failed/error/skipped -> PASS/FAIL/ERROR/SKIP, the same verdicts
  junit.xml carries), duration, the profile requested -> effective as its
  environment, and the failure message, dmesg error ids and the offending
  kernel lines in `log_excerpt` and `misc`.

Ids are `<origin>:` and a hash of what the object is (source identity and
patchset; kernel image sha256; build, run id and node id), so exporting the
same results again yields the same ids and a re-submission updates the objects
instead of adding copies. The schema version is the newest that kcidb-io
validates; every document is validated before it is written.

Log URLs: with `--log-url BASE` a file's URL is BASE/<its path relative to the
directory holding the exported RESULT or NIGHT>, i.e. BASE is where that
directory is published (a CI job's artifact URL). Without it no URLs are
written and `misc` keeps the paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from harness.dmesg import errors, scan
from harness.errors import BadInput, InfraError
from harness.results import TestRecord

DEFAULT_ORIGIN = "coco_harness"
EXCERPT_MAX = 16384               # the schema's maxLength for log_excerpt
BUILD_LOG_LINES = 40
BOOT_LINES = 25
_ORIGIN_RE = re.compile(r"^[a-z0-9_]+$")
_STATUS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}
# "Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0,
# GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-09)"
_BANNER = re.compile(r"Linux version (\S+) \(([^()]*)\) \((.*)\) #\d+")


# -- what the exporter reads of a run directory -----------------------------------


@dataclass(frozen=True)
class TestResult:
    nodeid: str
    status: str                   # passed / failed / error / skipped
    message: str
    details: str
    seconds: float
    worker: str
    properties: dict[str, Any]


@dataclass(frozen=True)
class BuildArtifact:
    """A kernel built by `harness build`: its directory and harness-build.json."""

    path: Path
    release: str
    source_spec: str
    source_identity: str
    patches: list[dict[str, str]]          # file, subject, sha256; in order of application
    fragments: list[str]
    toolchain: dict[str, str]
    dropped: list[str]
    seconds: float | None


@dataclass(frozen=True)
class RunView:
    """One results/<run-id>/ directory, as much of it as the export needs."""

    path: Path
    run_id: str
    status: str
    started: str | None                    # RFC 3339
    kernel_spec: str
    release: str
    image: str
    image_sha256: str
    package: str | None
    series: list[str]
    profile_requested: str
    profile_effective: str
    fallback_reasons: list[str]
    accel: str | None
    qemu_version: str | None
    target: str | None
    tests: list[TestResult]
    boot_seconds: float | None
    boot_failure: str | None
    boot_lines: list[str]                  # the console's last lines when the boot failed
    banner: tuple[str, str, str] | None    # release, builder, compiler from "Linux version ..."
    artifact: BuildArtifact | None
    features: dict[str, bool] = field(default_factory=dict)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise BadInput(f"{path}: not JSON ({e})") from None


def read_run(path: Path) -> RunView:
    """The adapter from the run directory's files to what the export needs.

    Reads meta.json, tests.json, machines/*.json, the console banner and, for
    a kernel built by the harness, the artifact's harness-build.json beside its
    bzImage. Raises BadInput naming the file that is missing or malformed.
    """
    meta = _json(path / "meta.json")
    if not isinstance(meta, dict):
        raise BadInput(f"{path}/meta.json: expected an object")
    raw_tests = _json(path / "tests.json") if (path / "tests.json").is_file() else []
    tests = []
    for i, t in enumerate(raw_tests if isinstance(raw_tests, list) else []):
        if not isinstance(t, dict) or t.get("status") not in _STATUS or not t.get("nodeid"):
            raise BadInput(f"{path}/tests.json: entry {i} has no nodeid or an unknown status {t.get('status')!r}"
                           if isinstance(t, dict) else f"{path}/tests.json: entry {i} is not an object")
        tests.append(TestResult(str(t["nodeid"]), str(t["status"]), str(t.get("message") or ""),
                                str(t.get("details") or ""), float(t.get("seconds") or 0.0),
                                str(t.get("worker") or ""), dict(t.get("properties") or {})))
    kernel = meta.get("kernel") or {}
    profile = meta.get("profile") or {}
    machines = [_json(p) for p in sorted((path / "machines").glob("*.json"))]
    boots = [m.get("boot_seconds") for m in machines if isinstance(m, dict) and m.get("boot_seconds") is not None]
    failed = [m for m in machines if isinstance(m, dict) and m.get("status") == "boot-failed"]
    image = str(kernel.get("image") or "")
    artifact = _read_artifact(Path(image).parent) if image else None
    features = ((kernel.get("diagnostics") or {}).get("features") or {})
    return RunView(
        path=path, run_id=str(meta.get("run_id") or path.name), status=str(meta.get("status", "unknown")),
        started=rfc3339(meta.get("started")), kernel_spec=str(kernel.get("spec") or ""),
        release=str(kernel.get("release") or "unknown"), image=image,
        image_sha256=str(kernel.get("sha256") or ""), package=kernel.get("package"),
        series=[str(s) for s in meta.get("series") or []],
        profile_requested=str(profile.get("requested") or "unknown"),
        profile_effective=str(profile.get("effective") or profile.get("requested") or "unknown"),
        fallback_reasons=[str(r) for r in profile.get("reasons") or []], accel=profile.get("accel"),
        qemu_version=(meta.get("qemu") or {}).get("version"), target=meta.get("target"), tests=tests,
        boot_seconds=boots[0] if boots else None, boot_failure=str(failed[0].get("error")) if failed else None,
        boot_lines=[str(line) for line in failed[0].get("lines") or []][-BOOT_LINES:] if failed else [],
        banner=_banner(path), artifact=artifact,
        features={str(k): bool(v) for k, v in features.items()})


def _read_artifact(folder: Path) -> BuildArtifact | None:
    meta_path = folder / "harness-build.json"
    if not meta_path.is_file():
        return None
    data = _json(meta_path)
    source = data.get("source") or {}
    return BuildArtifact(
        path=folder, release=str(data.get("release", "")), source_spec=str(source.get("spec", "")),
        source_identity=str(source.get("identity", "")),
        patches=[{k: str(v) for k, v in p.items()} for p in data.get("patches") or []],
        fragments=[str(f) for f in data.get("fragments") or []],
        toolchain={str(k): str(v) for k, v in (data.get("toolchain") or {}).items()},
        dropped=[str(d) for d in data.get("dropped") or []], seconds=data.get("seconds"))


def _banner(run_dir: Path) -> tuple[str, str, str] | None:
    """The kernel's own "Linux version" line: the compiler that built a prebuilt kernel."""
    for name in ("dmesg.txt", "console.log"):
        path = run_dir / name
        if not path.is_file():
            continue
        with open(path, errors="replace") as f:
            for _, line in zip(range(2000), f, strict=False):
                m = _BANNER.search(line)
                if m:
                    return m.group(1), m.group(2), m.group(3)
    return None


def rfc3339(stamp: object) -> str | None:
    """meta.json's `2026-11-01T09:48:55+0000` as RFC 3339 (`+00:00`), which the schema requires."""
    if not isinstance(stamp, str) or not stamp:
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"):
        try:
            parsed = datetime.strptime(stamp, fmt)
        except ValueError:
            continue
        return parsed.isoformat() if parsed.tzinfo else parsed.astimezone().isoformat()
    return None


# -- the objects ------------------------------------------------------------------------


def _hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def patchset_hash(patch_sha256s: list[str]) -> str:
    """KCIDB's patchset hash: sha256 over each patch's sha256 and a newline, in order; "" for none."""
    if not patch_sha256s:
        return ""
    return hashlib.sha256("".join(f"{h}\n" for h in patch_sha256s).encode()).hexdigest()


def kcidb_path(nodeid: str) -> str:
    """`test_dma.py::test_dma_stress_verifies[4-nvme]` -> `coco.dma.stress_verifies.4-nvme`.

    The module loses `test_` and `.py` (its directories become levels), a
    class loses `Test`, the test loses `test_` and its module's name as a
    prefix, a parameter set is the last level; characters the schema does not
    allow in a level become `_`.
    """
    head, _, param = nodeid.partition("[")
    module, *inner = head.split("::")
    *dirs, stem = module.removesuffix(".py").split("/")
    stem = stem.removeprefix("test_")
    levels = [*dirs, stem, *(c.removeprefix("Test") for c in inner[:-1])]
    if inner:
        levels.append(inner[-1].removeprefix("test_").removeprefix(f"{stem}_"))
    if param:
        levels.append(param.removesuffix("]"))
    clean = [re.sub(r"[^A-Za-z0-9_-]+", "_", level).strip("_") or "_" for level in levels]
    return ".".join(["coco", *clean])


@dataclass
class Exporter:
    """Collects checkouts, builds and tests (deduplicated by id) from runs and nights."""

    origin: str = DEFAULT_ORIGIN
    log_url: str | None = None
    checkouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _ORIGIN_RE.match(self.origin):
            raise BadInput(f"--origin {self.origin!r}: KCIDB origins are lower-case letters, digits and _")
        if self.log_url is not None:
            parts = urlsplit(self.log_url)
            if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.scheme == "file"):
                raise BadInput(f"--log-url {self.log_url!r}: expected an http(s):// or file:// URL")
            self.log_url = self.log_url.rstrip("/")

    def _id(self, kind: str, *parts: str) -> str:
        return f"{self.origin}:{kind}-{_hash(kind, *parts)[:32]}"

    def _url(self, path: Path, root: Path) -> str | None:
        if self.log_url is None or not path.is_file():
            return None
        rel = os.path.relpath(path.resolve(), root.resolve())
        if rel.startswith(".."):
            return None
        return f"{self.log_url}/{quote(rel)}"

    # -- one run ------------------------------------------------------------------

    def add_run(self, run: RunView, root: Path, entry: str | None = None, repeat: int | None = None) -> None:
        build_id = self._add_build(run)
        for test in run.tests:
            self._add_test(run, test, build_id, root, entry, repeat)

    def _add_checkout(self, run: RunView) -> str:
        art = run.artifact
        misc: dict[str, Any] = {"kernel_spec": run.kernel_spec}
        obj: dict[str, Any] = {"origin": self.origin, "valid": True}
        if art is not None:
            hashes = [p.get("sha256", "") for p in art.patches]
            identity, patches = art.source_identity, patchset_hash(hashes)
            obj["patchset_hash"] = patches
            m = re.fullmatch(r"git:([0-9a-f]{40})", identity)
            if m:
                obj["git_commit_hash"] = m.group(1)
            n = len(art.patches)
            obj["comment"] = f"{Path(art.source_spec).name or art.source_spec}" + (
                f" + {n} patch{'es' if n != 1 else ''}: " + "; ".join(p.get("subject", "") for p in art.patches)
                if n else "")
            misc.update(source=art.source_spec, source_identity=identity, patches=art.patches)
        elif run.package:
            identity, patches = f"debian:{run.package}:{run.image_sha256}", ""
            obj.update(tree_name="debian", comment=f"Debian package {run.package}", patchset_hash="")
            misc.update(package=run.package)
        elif run.image_sha256:
            identity, patches = f"image:{run.image_sha256}", ""
            obj.update(comment=f"prebuilt image {Path(run.image).name or run.kernel_spec}", patchset_hash="")
        else:
            # A remote target's kernel: all that is known is its release, on that machine.
            identity, patches = f"release:{run.release}@{run.target or run.kernel_spec}", ""
            obj.update(comment=f"kernel {run.release} of {run.target or 'an unknown machine'}", patchset_hash="")
        misc["source_identity"] = identity
        checkout_id = self._id("checkout", identity, patches)
        obj.update(id=checkout_id, misc=misc)
        self.checkouts.setdefault(checkout_id, obj)
        return checkout_id

    def _add_build(self, run: RunView) -> str:
        checkout_id = self._add_checkout(run)
        build_id = self._id("build", checkout_id, run.image_sha256 or run.kernel_spec)
        if build_id in self.builds:
            return build_id
        art = run.artifact
        misc: dict[str, Any] = {"release": run.release, "image_sha256": run.image_sha256,
                                "kernel_spec": run.kernel_spec}
        if run.features:
            misc["reports"] = run.features
        obj: dict[str, Any] = {"id": build_id, "origin": self.origin, "checkout_id": checkout_id,
                               "architecture": "x86_64", "status": "PASS"}
        if art is not None:
            obj["config_name"] = "+".join(Path(f).stem for f in art.fragments) or "default"
            if art.toolchain.get("gcc"):
                obj["compiler"] = art.toolchain["gcc"]
            if isinstance(art.seconds, (int, float)):
                obj["duration"] = float(art.seconds)
            obj["comment"] = f"{run.release} built by the harness"
            log = art.path / "build.log"
            excerpt = _tail(log, BUILD_LOG_LINES)
            if excerpt:
                obj["log_excerpt"] = excerpt
            misc.update(artifact=str(art.path), fragments=art.fragments, toolchain=art.toolchain,
                        dropped_options=art.dropped, log_path=str(log), config_path=str(art.path / "config"))
        else:
            if run.package:
                obj["config_name"] = _debian_flavour(run.release)
                obj["comment"] = f"{run.release} from Debian package {run.package}"
                config = Path(run.image).parent / f"config-{run.release}"
                if config.is_file():
                    misc["config_path"] = str(config)
            else:
                obj["comment"] = f"{run.release} prebuilt image"
            if run.banner is not None:
                obj["compiler"] = run.banner[2].split(", ")[0]
                misc["built_by"] = run.banner[1]
        self.builds[build_id] = {**obj, "misc": misc}
        return build_id

    def _add_test(self, run: RunView, test: TestResult, build_id: str, root: Path,
                  entry: str | None, repeat: int | None) -> None:
        test_id = self._id("test", build_id, run.run_id, test.nodeid)
        record = TestRecord(test.nodeid)  # the writer's own names for the JUnit case and the test's folder
        profile = run.profile_requested
        env_comment = profile if profile == run.profile_effective else f"{profile} -> {run.profile_effective}"
        if run.fallback_reasons:
            env_comment += f" (fallback: {'; '.join(run.fallback_reasons)})"
        env_misc: dict[str, Any] = {"requested_profile": profile, "effective_profile": run.profile_effective,
                                    "fallback_reasons": run.fallback_reasons, "accel": run.accel,
                                    "qemu_version": run.qemu_version, "worker": test.worker}
        if run.target:
            env_misc["target"] = run.target
        misc: dict[str, Any] = {
            "nodeid": test.nodeid, "run_id": run.run_id, "kernel_release": run.release,
            "junit": {"classname": record.classname, "name": record.name},
        }
        if entry is not None:
            misc.update(nightly_entry=entry, repeat=repeat)
        folder = run.path / "tests" / record.dirname
        ids = [str(i) for i in test.properties.get("dmesg_error_ids") or []]
        if ids:
            misc["dmesg_error_ids"] = ids
        figures = {k: v for k, v in test.properties.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if figures:
            misc["figures"] = figures
        obj: dict[str, Any] = {
            "id": test_id, "origin": self.origin, "build_id": build_id, "path": kcidb_path(test.nodeid),
            "status": _STATUS[test.status], "duration": round(test.seconds, 3),
            "environment": {"comment": env_comment, "misc": env_misc}, "misc": misc,
        }
        if run.started:
            obj["start_time"] = run.started    # the run's: a test's own start is not recorded
        rate = next(((k, v) for k, v in figures.items() if k.endswith("_MBps")), None)
        if rate is not None:
            obj["number"] = {"value": float(rate[1]), "unit": "MB/s", "prefix": "metric"}
            misc["number_is"] = rate[0]
        excerpt = _test_excerpt(test, folder, run)
        if excerpt:
            obj["log_excerpt"] = excerpt
        log = folder / "log.txt"
        url = self._url(log, root)
        if url:
            obj["log_url"] = url
        outputs = [{"name": name, "url": u} for name, p in (("dmesg.txt", folder / "dmesg.txt"),
                                                             ("console.log", run.path / "console.log"),
                                                             ("meta.json", run.path / "meta.json"))
                   if (u := self._url(p, root))]
        if outputs:
            obj["output_files"] = outputs
        misc["run_dir"] = os.path.relpath(run.path.resolve(), root.resolve())
        self.tests[test_id] = obj

    # -- a night ------------------------------------------------------------------

    def add_night(self, night: Path, root: Path) -> None:
        data = _json(night / "nightly.json")
        if not isinstance(data, dict) or not isinstance(data.get("outcomes"), list):
            raise BadInput(f"{night}: not a finished nightly tree (no outcomes in nightly.json)")
        for o in data["outcomes"]:
            run_dir = _locate_run(night, data, o)
            if run_dir is not None:
                self.add_run(read_run(run_dir), root, str(o.get("entry")), int(o.get("repeat") or 1))
            else:
                self._add_missing_run(o)

    def _add_missing_run(self, outcome: dict[str, Any]) -> None:
        """An entry that left no run directory: the merged JUnit has one error case for it, so has KCIDB."""
        kernel, entry = str(outcome.get("kernel")), str(outcome.get("entry"))
        checkout_id = self._id("checkout", f"spec:{kernel}", "")
        self.checkouts.setdefault(checkout_id, {
            "id": checkout_id, "origin": self.origin, "patchset_hash": "",
            "comment": f"kernel {kernel} (no run started, so nothing more is known)",
            "misc": {"kernel_spec": kernel}})
        build_id = self._id("build", checkout_id, kernel)
        self.builds.setdefault(build_id, {
            "id": build_id, "origin": self.origin, "checkout_id": checkout_id, "architecture": "x86_64",
            "comment": f"kernel {kernel}", "misc": {"kernel_spec": kernel}})
        repeat = int(outcome.get("repeat") or 1)
        test_id = self._id("test", build_id, f"{entry}#{repeat}", "harness_run")
        message = str(outcome.get("message") or outcome.get("status") or "")
        self.tests[test_id] = {
            "id": test_id, "origin": self.origin, "build_id": build_id, "path": "coco.harness_run",
            "status": "ERROR", "duration": float(outcome.get("seconds") or 0.0),
            "comment": f"nightly entry {entry} left no run directory",
            "environment": {"comment": str(outcome.get("profile")),
                            "misc": {"requested_profile": str(outcome.get("profile"))}},
            "log_excerpt": _clip(message),
            "misc": {"nightly_entry": entry, "repeat": repeat, "exit_code": outcome.get("exit_code"),
                     "junit": {"classname": entry, "name": "harness_run"}}}

    # -- the document ---------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        from kcidb_io.schema import LATEST

        return {"version": {"major": LATEST.major, "minor": LATEST.minor},
                "checkouts": list(self.checkouts.values()), "builds": list(self.builds.values()),
                "tests": list(self.tests.values())}


def _locate_run(night: Path, data: dict[str, Any], outcome: dict[str, Any]) -> Path | None:
    """An outcome's run directory: where it was recorded, or where the tree now is.

    Shard trees move between machines (CI artifacts): <night>/<entry>/<run-id>
    is searched in the night itself and in each tree a merged night came from.
    """
    recorded = outcome.get("run_dir")
    if not recorded:
        return None
    path = Path(str(recorded))
    if (path / "meta.json").is_file():
        return path
    tail = Path(str(outcome.get("entry"))) / path.name
    for base in [night, *(Path(str(d)) for d in data.get("merged") or [])]:
        if (base / tail / "meta.json").is_file():
            return base / tail
    raise BadInput(f"{night}/nightly.json: run directory {recorded} of entry {outcome.get('entry')} is gone")


def _debian_flavour(release: str) -> str:
    """`6.1.0-56-cloud-amd64` -> `debian-cloud-amd64`: the configuration Debian built it with."""
    m = re.match(r"^\d+\.\d+(?:\.\d+)*(?:\+deb\d+)?(?:-\d+)?-(.+)$", release)
    return f"debian-{m.group(1)}" if m else "debian"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return _clip("\n".join(text.rstrip("\n").splitlines()[-lines:]), keep="tail")


def _clip(text: str, keep: str = "head") -> str:
    text = text.replace("\0", "")
    if len(text) <= EXCERPT_MAX:
        return text
    mark = "\n[... cut ...]\n"
    room = EXCERPT_MAX - len(mark)
    return text[:room] + mark if keep == "head" else mark + text[-room:]


def _test_excerpt(test: TestResult, folder: Path, run: RunView) -> str:
    """What a person reads first: the message, the kernel lines that failed it, the traceback."""
    if test.status == "passed":
        return ""
    parts = [test.message.strip()] if test.message.strip() else []
    dmesg = folder / "dmesg.txt"
    if dmesg.is_file():
        bad = errors(scan(dmesg.read_text(errors="replace").splitlines()))
        if bad:
            parts.append("kernel log:\n" + "\n".join(f"{h.error_id}: {h.line}" for h in bad[:20]))
    if run.boot_failure and test.status != "skipped":
        if run.boot_failure not in test.message:
            parts.append(f"boot: {run.boot_failure}")
        if run.boot_lines:
            parts.append("console before the boot failed:\n" + "\n".join(run.boot_lines))
    if test.details.strip() and test.status != "skipped":
        parts.append(test.details.strip())
    return _clip("\n\n".join(parts))


# -- entry points ---------------------------------------------------------------------


def export(paths: list[Path], origin: str = DEFAULT_ORIGIN, log_url: str | None = None) -> dict[str, Any]:
    """KCIDB JSON for run directories and nightly trees, validated. Raises BadInput for
    a path that is neither, InfraError if the document does not validate (a harness bug)."""
    if not paths:
        raise BadInput("harness export: give RESULT directories or a NIGHT directory")
    exporter = Exporter(origin, log_url)
    for path in paths:
        root = path.resolve().parent
        if (path / "nightly.json").is_file():
            exporter.add_night(path, root)
        elif (path / "meta.json").is_file():
            exporter.add_run(read_run(path), root)
        else:
            raise BadInput(f"{path}: not a run directory (meta.json) or a nightly tree (nightly.json)")
    doc = exporter.document()
    validate(doc)
    return doc


def validate(doc: dict[str, Any]) -> None:
    """kcidb-io's verdict on the document, for its own version of the schema. Raises InfraError."""
    import jsonschema
    from kcidb_io.schema import LATEST

    try:
        LATEST.validate_exactly(doc)
    except jsonschema.exceptions.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise InfraError(f"KCIDB export does not validate at {where or 'the top'}: {e.message}") from None


def write(doc: dict[str, Any], output: Path | None) -> str:
    """The document as text; written atomically to `output` when given."""
    from harness.paths import atomic_write

    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if output is not None:
        atomic_write(output, text)
    return text
