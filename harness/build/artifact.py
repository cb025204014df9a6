"""The kernel artifact cache's entries: their metadata, the lock builds of one tree take, and
publishing a finished build in one rename (what builds killed half-way leave is swept).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from harness.build.kconfig import Dropped, Fragment
from harness.build.series import Patch
from harness.build.source import Source
from harness.hashing import file_sha256
from harness.process import alive

if TYPE_CHECKING:
    from harness.build.kernelbuild import PatchStep

FORMAT = "build-v2"
ARTIFACT_META = "harness-build.json"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_meta(staging: Path, source: Source, patches: list[Patch], fragments: list[Fragment],
                tools: dict[str, str], release: str, dropped: list[Dropped], steps: list[PatchStep],
                start: float, phases: dict[str, float]) -> None:
    meta = {"format": FORMAT, "release": release, "source": {"spec": source.spec, "identity": source.identity},
            "patches": [p.to_json() for p in patches], "fragments": [str(f.path) for f in fragments],
            "toolchain": tools, "dropped": [str(d) for d in dropped], "steps": [asdict(s) for s in steps],
            "seconds": round(time.monotonic() - start, 1),
            "phases": {name: round(seconds, 1) for name, seconds in phases.items()},
            "image_sha256": file_sha256(staging / "bzImage")}
    (staging / ARTIFACT_META).write_text(json.dumps(meta, indent=1) + "\n")


def sweep_staging(kernels: Path) -> None:
    """Remove what builds killed half-way (SIGKILL: no `finally` ran) left in the
    cache: their staging directories and replaced entries. A live build's stay."""
    for leftover in [*kernels.glob(".art-*"), *kernels.glob(".old-*")]:
        try:
            if alive(int((leftover / ".owner").read_text())):
                continue
        except (OSError, ValueError):
            # No owner yet: a build that is starting right now, unless it is old.
            with contextlib.suppress(OSError):
                if leftover.name.startswith(".art-") and time.time() - leftover.stat().st_mtime < 60:
                    continue
        shutil.rmtree(leftover, ignore_errors=True)


def publish(staging: Path, artifact: Path) -> None:
    """Move the finished artifact into place in one rename: a reader (or a harness
    killed half-way) never sees a half-copied entry."""
    os.chmod(staging, 0o755)
    (staging / ".owner").unlink(missing_ok=True)
    if artifact.exists():
        old = artifact.with_name(f".old-{artifact.name}-{os.getpid()}")
        artifact.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(artifact)
