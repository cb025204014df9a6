"""What the export reads of a run directory and a nightly tree: `read_run`, the
adapter from the run directory's files to a `RunView`, and `locate_run`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.errors import BadInput

BOOT_LINES = 25
# A test's status as tests.json records it -> its KCIDB status (the verdicts junit.xml carries).
STATUS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}
# "Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0,
# GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-09)"
_BANNER = re.compile(r"Linux version (\S+) \(([^()]*)\) \((.*)\) #\d+")


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


def read_json(path: Path) -> Any:
    """A JSON file's content. Raises BadInput naming the file that is missing or not JSON."""
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
    meta = read_json(path / "meta.json")
    if not isinstance(meta, dict):
        raise BadInput(f"{path}/meta.json: expected an object")
    raw_tests = read_json(path / "tests.json") if (path / "tests.json").is_file() else []
    tests = []
    for i, t in enumerate(raw_tests if isinstance(raw_tests, list) else []):
        if not isinstance(t, dict) or t.get("status") not in STATUS or not t.get("nodeid"):
            raise BadInput(f"{path}/tests.json: entry {i} has no nodeid or an unknown status {t.get('status')!r}"
                           if isinstance(t, dict) else f"{path}/tests.json: entry {i} is not an object")
        tests.append(TestResult(str(t["nodeid"]), str(t["status"]), str(t.get("message") or ""),
                                str(t.get("details") or ""), float(t.get("seconds") or 0.0),
                                str(t.get("worker") or ""), dict(t.get("properties") or {})))
    kernel = meta.get("kernel") or {}
    profile = meta.get("profile") or {}
    machines = [read_json(p) for p in sorted((path / "machines").glob("*.json"))]
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
    data = read_json(meta_path)
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


def locate_run(night: Path, data: dict[str, Any], outcome: dict[str, Any]) -> Path | None:
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
