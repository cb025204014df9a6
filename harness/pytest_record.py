"""The guest tests' results as pytest reports them: verdicts, the run's records, the event log.

`classify` maps a report to failed / error / skipped / passed with the
harness's exit taxonomy (a kernel fault fails wherever it surfaces, a harness
or host problem is an error wherever it surfaces). `Recorder` runs in the
process that sees every report (main or xdist controller) and writes
`tests.json`, `junit.xml` and `tests/<name>/log.txt` after each test;
`TestStamper` runs where the tests run and stamps their start and end into
events.jsonl. Both let the first non-pass outcome of a test decide (a teardown
error does not hide a failure).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.errors import RESULTS_UNWRITABLE
from harness.events import EventLog, Source
from harness.results import TestRecord, write_records


def classify(when: str, outcome: str, kind: str | None) -> str:
    """Map one pytest report to failed / error / skipped / passed.

    A kernel fault is a failure wherever it surfaces (a panic at boot shows up
    in fixture setup); a harness or host problem is an error wherever it
    surfaces; otherwise pytest's own rule: exceptions in the test body fail it,
    exceptions in setup or teardown are errors.
    """
    if outcome == "skipped":
        return "skipped"
    if outcome == "passed":
        return "passed"
    if kind == "kernel":
        return "failed"
    if kind == "infra":
        return "error"
    return "failed" if when == "call" else "error"


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    return str(report.longrepr or "")


def _worker_of(report: pytest.TestReport) -> str:
    # pytest-xdist sets `node` (the worker controller) on reports it forwards.
    node = getattr(report, "node", None)
    gateway = getattr(node, "gateway", None)
    return str(getattr(gateway, "id", "main"))


class TestStamper:
    """Stamps each test's start and end, with its outcome, into the event log, in the
    process that runs it (so the times are those of the test, beside its VM's)."""

    __test__ = False

    def __init__(self, events: EventLog) -> None:
        self._events = events
        self._status: dict[str, tuple[str, str]] = {}
        self._seconds: dict[str, float] = {}

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._events.emit(Source.HARNESS, "test-start", f"test start {nodeid}", {"nodeid": nodeid})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        status = classify(report.when, report.outcome, str(props.get("harness_kind", "")) or None)
        before = self._status.get(report.nodeid, ("passed", ""))
        # As the Recorder: the first non-pass outcome decides.
        if status != "passed" and before[0] == "passed":
            message = _message(report).strip()
            self._status[report.nodeid] = (status, message.splitlines()[0][:200] if message else "")
        self._seconds[report.nodeid] = self._seconds.get(report.nodeid, 0.0) + report.duration
        if report.when != "teardown":
            return
        status, message = self._status.pop(report.nodeid, ("passed", ""))
        seconds = self._seconds.pop(report.nodeid, 0.0)
        self._events.emit(Source.HARNESS, "test-end",
                          f"test end {report.nodeid}: {status.upper()} in {seconds:.2f} s"
                          + (f": {message}" if message else ""),
                          {"nodeid": report.nodeid, "status": status, "seconds": round(seconds, 3)})

    def pytest_unconfigure(self) -> None:
        self._events.close()


class Recorder:
    """Collects reports in the process that sees all of them; writes results."""

    def __init__(self, run_dir: Path) -> None:
        # junitparser now, while the VM boots, not at the first report (harness.results loads it late).
        import junitparser  # noqa: F401

        self.run_dir = run_dir
        self.records: dict[str, TestRecord] = {}
        self._order: list[str] = []
        self.started = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec = self.records.get(report.nodeid)
        if rec is None:
            rec = self.records[report.nodeid] = TestRecord(report.nodeid)
            self._order.append(report.nodeid)
        rec.worker = _worker_of(report)
        rec.seconds += report.duration
        props = dict(report.user_properties)
        kind = str(props.pop("harness_kind", "")) or None
        infra = props.pop("harness_infra", None)
        for key, value in props.items():
            rec.properties[key] = value
        status = classify(report.when, report.outcome, kind)
        # The first non-pass outcome decides (a teardown error does not hide a failure).
        if status != "passed" and rec.status == "passed":
            rec.status = status
            rec.message = f"{infra}: {_message(report)}" if infra else _message(report)
            rec.details = str(report.longreprtext or "") if status != "skipped" else ""
        if report.when == "teardown":
            try:
                self._write_test(rec, report)
                write_records(self.run_dir, [self.records[n] for n in self._order])
            except OSError as e:
                # A full or read-only results disk: nothing more can be recorded, so
                # running more tests is pointless; the VMs stop as the session ends.
                pytest.exit(f"results directory {self.run_dir}: {e.strerror}", returncode=RESULTS_UNWRITABLE)

    def _write_test(self, rec: TestRecord, report: pytest.TestReport) -> None:
        folder = self.run_dir / "tests" / rec.dirname
        folder.mkdir(parents=True, exist_ok=True)
        parts = [f"{rec.nodeid}: {rec.status.upper()} in {rec.seconds:.2f}s"]
        if rec.message:
            parts.append(rec.message)
        if rec.details:
            parts.append(rec.details)
        for name, content in report.sections:
            parts.append(f"----- {name} -----\n{content}")
        (folder / "log.txt").write_text("\n\n".join(parts) + "\n")
