"""A run's verdict: from the guest tests' exit status and records to the run's
status, exit code and failure, and the summary printed at the end; the run
directory's first files and its final meta.json (with room kept for it).

Exit codes (errors.py): 0 passed, 1 the kernel failed a test, 2 bad input (a
selection of no tests, arguments pytest rejects), 3 infrastructure (internal
timeout, pytest broke, only errors), 128+N interrupted by signal N.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.diagnostics import Diagnostics
from harness.errors import EXIT_BAD_INPUT, EXIT_INFRA, EXIT_KERNEL, EXIT_OK, RESULTS_UNWRITABLE, InfraError
from harness.results import TestRecord, counts, exit_code_for, summary_table
from harness.rundir import (
    Failure,
    Invocation,
    MachineRecord,
    MachineStatus,
    RunRecord,
    RunStatus,
    Timings,
    timestamp,
    write_run,
)

# What a launcher returns when the guest tests overran --timeout (it has stopped them);
# otherwise it returns pytest's exit status.
TIMED_OUT = -1

# pytest's own exit statuses (pytest.ExitCode), as a child process returns them.
_PYTEST_INTERRUPTED, _PYTEST_USAGE_ERROR, _PYTEST_NO_TESTS = 2, 4, 5


@dataclass(frozen=True)
class Verdict:
    status: RunStatus
    exit_code: int
    note: str = ""     # why, when the tests' own records do not say it
    kind: str | None = None

    @classmethod
    def infra(cls, note: str) -> Verdict:
        return cls(RunStatus.ERROR, EXIT_INFRA, note)

    @classmethod
    def bad_input(cls, note: str) -> Verdict:
        return cls(RunStatus.ERROR, EXIT_BAD_INPUT, note)

    @classmethod
    def interrupted(cls, signum: int, note: str = "") -> Verdict:
        return cls(RunStatus.INTERRUPTED, 128 + signum, note or f"interrupted by signal {signum}")


def judge(rc: int, records: list[TestRecord], inv: Invocation) -> Verdict:
    """The verdict on a launcher's return code and the test records it left."""
    if rc == RESULTS_UNWRITABLE:
        return Verdict(RunStatus.ERROR, EXIT_INFRA, "the results directory could not be written (full or "
                       "read-only): the guest tests were stopped", kind="results-full")
    if rc == TIMED_OUT:
        return Verdict.infra(f"internal timeout: guest tests exceeded --timeout {inv.timeout:.0f} s")
    if rc == _PYTEST_NO_TESTS:
        return Verdict.bad_input(f"no guest tests selected in {inv.tests} by {shlex.join(inv.pytest_args)}")
    if rc == _PYTEST_USAGE_ERROR:
        return Verdict.bad_input(f"pytest rejected the arguments {shlex.join(inv.pytest_args)}")
    if rc == _PYTEST_INTERRUPTED:
        return Verdict.interrupted(signal.SIGINT, "guest tests interrupted")
    if rc not in (0, 1):
        return Verdict.infra(f"pytest exited with status {rc}")
    code = exit_code_for(records)
    status = {EXIT_OK: RunStatus.PASSED, EXIT_KERNEL: RunStatus.FAILED, EXIT_INFRA: RunStatus.ERROR}[code]
    return Verdict(status, code)


def failure(note: str, records: list[TestRecord], machines: list[MachineRecord]) -> Failure | None:
    """What failed first: a VM's boot, else what the verdict notes, else the first failing test."""
    boot = next((m for m in machines if m.status is MachineStatus.BOOT_FAILED), None)
    if boot is not None:
        return Failure(boot.error or "boot failed", kind=boot.error_type, lines=boot.lines[-20:])
    if note:
        return Failure(note)
    bad = next((r for r in records if r.status in ("failed", "error")), None)
    if bad is not None:
        return Failure(bad.message, kind=bad.status, test=bad.nodeid)
    return None


def finish(record: RunRecord, verdict: Verdict, records: list[TestRecord], machines: list[MachineRecord],
           tests: float, total: float) -> None:
    """Fill in the end of the run record: status, exit code, timings, VMs, counts, failure."""
    boots = [m.boot_seconds for m in sorted(machines, key=lambda m: m.worker) if m.boot_seconds is not None]
    record.status, record.exit_code, record.finished = verdict.status, verdict.exit_code, timestamp()
    record.timings = Timings(boots[0] if boots else None, round(tests, 3), round(total, 3))
    record.machines, record.tests = machines, counts(records)
    record.failure = failure(verdict.note, records, machines)
    if verdict.kind is not None and record.failure is not None:
        record.failure.kind = verdict.kind


def print_diagnostics(diagnostics: Diagnostics | None) -> None:
    """What the kernel can report; a kernel whose tests cannot fail is said loudly."""
    if diagnostics is None:
        return
    for problem in diagnostics.problems():
        print(f"WARNING: {problem}: no test on it can fail on a WARN or BUG it hits", flush=True)
    for note in diagnostics.notes():
        print(f"note: {note}", flush=True)


def print_summary(run_dir: Path, record: RunRecord, records: list[TestRecord]) -> None:
    print()
    print(summary_table(records))
    prof = record.profile
    if record.target:
        print(f"remote target {record.target}")
    build = record.kernel.identity(record.target)
    print(f"kernel {record.kernel.name(record.target)} ({build.short_key})  profile {prof.requested}"
          + (f" -> {prof.effective} (fallback)" if prof.fell_back else "") + f"  accel {prof.accel}")
    for reason in prof.reasons:
        print(f"  {'because' if prof.fell_back else 'forced despite'}: {reason}")
    diagnostics = record.kernel.diagnostics
    if diagnostics is not None:
        print(f"kernel {diagnostics.summary()}")
        print_diagnostics(diagnostics)
    t = record.timings or Timings()
    boot = f"{t.boot:.2f}s" if t.boot is not None else "-"
    print(f"boot {boot}  tests {t.tests:.2f}s  total {t.total:.2f}s")
    if record.failure is not None:
        print(f"{record.status.upper()}: {record.failure.message}")
        for line in (record.failure.lines or [])[-8:]:
            print(f"  | {line}")
    print(f"status {record.status} (exit {record.exit_code}); results: {run_dir}")


# Room kept for the run's last words: meta.json's final version must fit even when
# the console logs filled the results disk (a file of this size, freed at the end).
_RESERVE = 64 * 1024


@contextlib.contextmanager
def creating_run_dir(run_dir: Path) -> Iterator[None]:
    """The run directory, its first files and the reserve for its final meta.json, or
    InfraError (exit 3) naming the results directory and nothing left of the run."""
    try:
        run_dir.mkdir(parents=True)
        yield
        with open(run_dir / ".reserve", "wb") as f:
            f.write(bytes(_RESERVE))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise InfraError(f"results directory {run_dir.parent}: {e.strerror}") from None


def write_final(run_dir: Path, record: RunRecord) -> bool:
    """meta.json with the run's final status. On a full disk the reserve (and any
    temp file) is freed first; if not even then, say so on stderr with the path."""
    reserve = run_dir / ".reserve"
    try:
        write_run(run_dir, record)
        return True
    except OSError as first:
        for tmp in run_dir.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        reserve.unlink(missing_ok=True)
        if record.status is not RunStatus.INTERRUPTED:
            record.status, record.exit_code = RunStatus.ERROR, EXIT_INFRA
            record.failure = Failure(f"results directory {run_dir.parent}: {first.strerror}", kind="results-full")
        try:
            write_run(run_dir, record)
            print(f"harness: results directory {run_dir.parent}: {first.strerror}", file=sys.stderr)
            return True
        except OSError as e:
            print(f"harness: results directory {run_dir.parent}: {e.strerror}: {run_dir / 'meta.json'} could not "
                  "be finished (its status still says incomplete)", file=sys.stderr)
            return False
    finally:
        reserve.unlink(missing_ok=True)
