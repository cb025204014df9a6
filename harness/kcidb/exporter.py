"""The Exporter collects the objects of runs and nights, deduplicated by id;
`export` drives it over the paths given and validates the document."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from harness.errors import BadInput
from harness.kcidb.document import validate
from harness.kcidb.objects import (
    build_id,
    build_object,
    checkout_object,
    guest_test_object,
    missing_run_objects,
)
from harness.kcidb.run import RunView, locate_run, read_json, read_run

DEFAULT_ORIGIN = "coco_harness"
_ORIGIN_RE = re.compile(r"^[a-z0-9_]+$")


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

    def _url(self, path: Path, root: Path) -> str | None:
        if self.log_url is None or not path.is_file():
            return None
        rel = os.path.relpath(path.resolve(), root.resolve())
        if rel.startswith(".."):
            return None
        return f"{self.log_url}/{quote(rel)}"

    def add_run(self, run: RunView, root: Path, entry: str | None = None, repeat: int | None = None) -> None:
        """The run's checkout, build and tests; `root` is the directory --log-url publishes."""
        checkout = checkout_object(self.origin, run)
        self.checkouts.setdefault(checkout["id"], checkout)
        build = build_id(self.origin, checkout["id"], run)
        if build not in self.builds:
            self.builds[build] = build_object(self.origin, build, checkout["id"], run)
        for test in run.tests:
            obj = guest_test_object(self.origin, build, run, test, root, lambda p: self._url(p, root),
                                    entry, repeat)
            self.tests[obj["id"]] = obj

    def add_night(self, night: Path, root: Path) -> None:
        """Every outcome of a nightly tree (or a merge of shard trees). Raises BadInput
        for a tree that is not finished or whose run directories are gone."""
        data = read_json(night / "nightly.json")
        if not isinstance(data, dict) or not isinstance(data.get("outcomes"), list):
            raise BadInput(f"{night}: not a finished nightly tree (no outcomes in nightly.json)")
        for o in data["outcomes"]:
            run_dir = locate_run(night, data, o)
            if run_dir is not None:
                self.add_run(read_run(run_dir), root, str(o.get("entry")), int(o.get("repeat") or 1))
            else:
                checkout, build, test = missing_run_objects(self.origin, o)
                self.checkouts.setdefault(checkout["id"], checkout)
                self.builds.setdefault(build["id"], build)
                self.tests[test["id"]] = test

    def document(self) -> dict[str, Any]:
        from kcidb_io.schema import LATEST

        return {"version": {"major": LATEST.major, "minor": LATEST.minor},
                "checkouts": list(self.checkouts.values()), "builds": list(self.builds.values()),
                "tests": list(self.tests.values())}


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
