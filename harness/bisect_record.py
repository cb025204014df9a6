"""The records of `harness bisect`: bisect.json and what it holds.

`BisectRecord` is bisect.json: the request, every step (its target, build, runs
and verdict, and how the verdict was reached) and the result. It is written
when the bisect starts (status `incomplete`), after every step, and at the end;
the git-range step script reads it back, adds its step and writes it again.
The records are typed (harness.rundir.Record), so whoever reads bisect.json
gets the same types that wrote it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from harness.errors import EXIT_KERNEL, InfraError
from harness.paths import atomic_write
from harness.rundir import Record, RecordError

FORMAT = "bisect-v1"
BISECT_JSON = "bisect.json"


class Verdict(StrEnum):
    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"          # the target does not build


class BisectStatus(StrEnum):
    INCOMPLETE = "incomplete"    # until the end, and when a signal ended it
    FOUND = "found"              # first_bad named
    NARROWED = "narrowed"        # only targets that do not build are left: candidates
    BAD_INPUT = "bad-input"      # includes ends that do not behave
    INFRA_ERROR = "infra-error"


@dataclass
class BisectRequest(Record):
    """What the user asked for; every step (the git-range step script too) reads it from bisect.json."""

    source: str
    configs: list[str]
    series: str | None = None
    good: str | None = None
    bad: str | None = None
    profile: str = "emulated"
    append: str = ""
    params: dict[str, str] = field(default_factory=dict)
    pytest_args: list[str] = field(default_factory=list)
    repeat: int = 1
    flaky_is: str = "bad"
    retries: int = 2
    timeout: float = 1800.0
    results: str = "results"


@dataclass
class Target(Record):
    """What a step builds: a series prefix (`index` patches; 0 is the base) or a commit."""

    subject: str
    index: int | None = None
    total: int | None = None
    file: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        if self.commit is not None:
            return f"commit {self.commit[:12]} {self.subject!r}"
        if not self.index:
            return "base (no patches)"
        return f"patch {self.index}/{self.total} {self.subject!r}"


BOOT = "(boot)"   # TestFailure.test when the kernel never reached the tests


@dataclass
class TestFailure(Record):
    __test__ = False  # not a pytest test class despite the name

    test: str                    # node id, or "(boot)" when the kernel never reached the tests
    message: str                 # the first failure line
    dmesg_error_ids: list[str] = field(default_factory=list)


@dataclass
class RunOutcome(Record):
    exit_code: int
    seconds: float
    attempts: int = 1
    run_dir: str | None = None
    failures: list[TestFailure] = field(default_factory=list)
    note: str = ""               # why, for an infrastructure error, bad input or a signal


@dataclass
class BuildOutcome(Record):
    status: str                  # built | cached | failed
    seconds: float
    artifact: str | None = None
    release: str | None = None
    errors: list[str] = field(default_factory=list)
    log: str | None = None


@dataclass
class StepRecord(Record):
    step: int
    target: Target
    started: str = ""
    build: BuildOutcome | None = None
    runs: list[RunOutcome] = field(default_factory=list)
    verdict: Verdict | None = None   # None: the step never decided (see abort)
    decision: str = ""               # how the verdict was reached
    seconds: float = 0.0
    abort: int | None = None         # the exit code that ended the bisect here

    def failures(self) -> list[TestFailure]:
        """The failing tests of its failing runs, each test once."""
        seen: dict[str, TestFailure] = {}
        for run in self.runs:
            if run.exit_code == EXIT_KERNEL:
                for f in run.failures:
                    seen.setdefault(f.test, f)
        return list(seen.values())


@dataclass
class BisectRecord(Record):
    """bisect.json: the request, every step, and the verdict."""

    request: BisectRequest
    kind: str                                # series | git
    status: BisectStatus = BisectStatus.INCOMPLETE
    format: str = FORMAT
    started: str = ""
    command: list[str] = field(default_factory=list)
    patches: list[Target] = field(default_factory=list)
    good: Target | None = None               # git: the range's ends
    bad: Target | None = None
    steps: list[StepRecord] = field(default_factory=list)
    first_bad: Target | None = None
    last_good: Target | None = None
    candidates: list[Target] = field(default_factory=list)
    failing_tests: list[TestFailure] = field(default_factory=list)
    reproduce: str | None = None
    message: str = ""
    exit_code: int | None = None
    interrupted_by: int | None = None
    finished: str | None = None


def write_record(out: Path, record: BisectRecord) -> None:
    atomic_write(out / BISECT_JSON, json.dumps(record.to_json(), indent=1) + "\n")


def read_record(out: Path) -> BisectRecord:
    """bisect.json of a bisect directory. Raises InfraError if it is unreadable (the bisect wrote it)."""
    try:
        return BisectRecord.from_json(json.loads((out / BISECT_JSON).read_text()))
    except (OSError, ValueError, RecordError) as e:
        raise InfraError(f"{out / BISECT_JSON}: unreadable: {e}") from None
