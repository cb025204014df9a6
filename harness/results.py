"""The guest tests' records in a run directory: tests.json and junit.xml
(meta.json and the per-VM records are harness/rundir.py's).

Test outcomes stay in three kinds: failed (the kernel under test misbehaved or
an assertion about it failed), error (the harness or host broke), skipped
(with the reason). junit.xml is rewritten after every test, atomically, so a
run that dies half-way leaves a well-formed file for what finished.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import EXIT_INFRA, EXIT_KERNEL, EXIT_OK
from harness.paths import atomic_write

if TYPE_CHECKING:
    # junitparser is loaded when a JUnit file is written: a run's start does not wait for it.
    from junitparser import JUnitXml

STATUSES = ("passed", "failed", "error", "skipped")


@dataclass
class TestRecord:
    __test__ = False  # not a pytest test class despite the name

    nodeid: str
    status: str = "passed"
    message: str = ""
    details: str = ""
    seconds: float = 0.0
    worker: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.nodeid.split("::")[-1]

    @property
    def classname(self) -> str:
        parts = self.nodeid.split("::")
        return parts[0].removesuffix(".py").replace("/", ".") + "".join(f".{p}" for p in parts[1:-1])

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.nodeid.replace(".py::", ".").replace("::", "."))


def write_records(run_dir: Path, records: list[TestRecord]) -> None:
    atomic_write(run_dir / "tests.json", json.dumps([asdict(r) for r in records], indent=1) + "\n")
    write_junit(run_dir / "junit.xml", records, suite=run_dir.name)


def read_records(run_dir: Path) -> list[TestRecord]:
    try:
        return [TestRecord(**r) for r in json.loads((run_dir / "tests.json").read_text())]
    except (OSError, ValueError):
        return []


def write_junit(path: Path, records: list[TestRecord], suite: str) -> None:
    if not records:
        # What junitparser writes for no tests, without importing it (17 ms; xml.sax's escaping
        # would import urllib, 20 ms): a run writes this before its VM starts, which waits for it.
        name = suite.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
        atomic_write(path, '<?xml version="1.0" encoding="utf-8"?>\n'
                           '<testsuites tests="0" failures="0" errors="0" skipped="0" time="0.0">\n'
                           f'\t<testsuite name="{name}" tests="0" errors="0" failures="0" skipped="0" '
                           'time="0"/>\n</testsuites>\n')
        return
    from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

    ts = TestSuite(suite)
    for rec in records:
        case = TestCase(rec.name, classname=rec.classname, time=round(rec.seconds, 3))
        if rec.status == "failed":
            case.result = [Failure(rec.message[:500])]
        elif rec.status == "error":
            case.result = [Error(rec.message[:500])]
        elif rec.status == "skipped":
            case.result = [Skipped(rec.message[:500])]
        if rec.details:
            case.system_out = rec.details
        ts.add_testcase(case)
    ts.update_statistics()  # type: ignore[no-untyped-call]
    xml = JUnitXml()
    xml.add_testsuite(ts)
    write_junit_xml(path, xml)


def write_junit_xml(path: Path, xml: JUnitXml) -> None:
    """Every JUnit file the harness writes goes through here: statistics updated, written atomically."""
    xml.update_statistics()  # type: ignore[no-untyped-call]
    buf = io.BytesIO()
    xml.write(buf, pretty=True)
    atomic_write(path, buf.getvalue())


def counts(records: list[TestRecord]) -> dict[str, int]:
    return {s: sum(1 for r in records if r.status == s) for s in STATUSES}


def exit_code_for(records: list[TestRecord]) -> int:
    c = counts(records)
    if c["failed"]:
        return EXIT_KERNEL
    if c["error"]:
        return EXIT_INFRA
    return EXIT_OK


def summary_table(records: list[TestRecord]) -> str:
    if not records:
        return "(no test results)"
    width = max(len(r.nodeid) for r in records)
    lines = [f"{'STATUS':8} {'TIME':>7}  {'TEST':{width}}  DETAIL"]
    for r in records:
        detail = r.message.strip().splitlines()[0][:100] if r.message.strip() else ""
        lines.append(f"{r.status.upper():8} {r.seconds:6.2f}s  {r.nodeid:{width}}  {detail}".rstrip())
    c = counts(records)
    lines.append(", ".join(f"{c[s]} {s}" for s in STATUSES))
    return "\n".join(lines)
