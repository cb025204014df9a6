"""One step of `harness bisect`: build a target, run the guest tests on it, decide.

A step builds one target (a prefix of a series, or a commit), runs the guest
tests on it `--repeat` times as ordinary `harness run` children writing normal
run directories into the bisect's directory, and decides: good, bad, or skip
(the target does not build). An infrastructure error (exit 3) is retried and
never taken as bad; bad input (exit 2) or an infrastructure error that outlives
its retries ends the bisect (`StepRecord.abort`). Each step ends with one
progress line, e.g.

    step 3/~4: patch 2/4 'swiotlb: add ...': build 14 s, run 9 s: PASS

The step's record is harness.bisect_record.StepRecord.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from harness.bisect_record import (
    BOOT,
    BisectRecord,
    BisectRequest,
    BuildOutcome,
    RunOutcome,
    StepRecord,
    Target,
    TestFailure,
    Verdict,
)
from harness.build import BuildFailed, BuildResult
from harness.errors import EXIT_BAD_INPUT, EXIT_INFRA, EXIT_KERNEL, EXIT_OK, HarnessError, InfraError, Terminated
from harness.process import die_with_parent, stop_group
from harness.results import read_records
from harness.rundir import is_run_dir, read_run, timestamp

Say = Callable[[str], None]

BuildFn = Callable[[Callable[[str], None]], BuildResult]
"""Builds a step's target, handing progress lines to its argument (harness.build's `progress`)."""

RunFn = Callable[[Path, Path], RunOutcome]
"""One run of the guest tests on a build artifact, its output appended to a log: (artifact, log) -> outcome."""


class Stepper:
    """The steps of one bisect writing into `out`: build, run (`run`: a `harness run`
    child by default, fakes in tests), decide, say one line."""

    def __init__(self, req: BisectRequest, out: Path, say: Say, run: RunFn | None = None) -> None:
        self.req = req
        self.out = out
        self.say = say
        self.run: RunFn = run or (lambda artifact, log: harness_run(req, out, artifact, log))

    def step(self, record: BisectRecord, target: Target, estimate: int, build: BuildFn) -> StepRecord:
        """Build `target`, run the tests on it, decide. The step is in `record.steps` from its
        start, so bisect.json written after an interrupt holds it too. Returns it with a
        verdict, or with `abort` set (bad input; infrastructure that outlived its retries).
        KeyboardInterrupt and Terminated propagate, the step marked with them."""
        step = StepRecord(len(record.steps) + 1, target, started=timestamp())
        record.steps.append(step)
        start = time.monotonic()
        log = self.out / f"step-{step.step:02d}.log"
        try:
            artifact = self._build(step, build, log)
            if artifact is not None:
                self._runs(step, artifact, log)
        except (KeyboardInterrupt, Terminated) as e:
            signum = e.signum if isinstance(e, Terminated) else int(signal.SIGINT)
            step.abort, step.decision = 128 + signum, f"interrupted by signal {signum}"
            raise
        finally:
            step.seconds = round(time.monotonic() - start, 1)
        self.say(self.line(step, estimate))
        return step

    def _build(self, step: StepRecord, build: BuildFn, log: Path) -> Path | None:
        """The artifact to run, or None (the target does not build: skip; or the bisect ends)."""
        retries = self.req.retries
        for attempt in range(1, retries + 2):
            start = time.monotonic()
            try:
                with open(log, "a") as f:
                    result = build(self._progress(f))
            except BuildFailed as e:
                step.build = BuildOutcome("failed", _secs(start), errors=list(e.lines[:8]),
                                          log=self._keep_log(str(e), step.step))
                step.verdict, step.decision = Verdict.SKIP, "does not build: skipped"
                return None
            except InfraError as e:
                step.build = BuildOutcome("error", _secs(start), errors=[str(e)])
                if attempt <= retries:
                    self.say(f"  step {step.step}: build: infrastructure error ({e}), retry {attempt}/{retries}")
                    continue
                step.abort, step.decision = EXIT_INFRA, f"build: infrastructure error in {attempt} attempts: {e}"
                return None
            except HarnessError as e:   # bad input: a patch that does not apply, dropped options
                step.build = BuildOutcome("error", _secs(start), errors=[str(e)])
                step.abort, step.decision = e.exit_code, f"build: {e}"
                return None
            step.build = BuildOutcome("cached" if result.cached else "built", round(result.seconds, 1),
                                      str(result.artifact), result.release)
            return result.artifact
        return None

    def _progress(self, log: TextIO) -> Callable[[str], None]:
        """Build lines go to the step's log; on the terminal, what takes long (an import, make's
        running count) at most once a minute, so a cold build is not silence."""
        last = [time.monotonic()]

        def progress(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            now = time.monotonic()
            if line.startswith(("build: importing", "build: warning")) or (
                    line.startswith("build ") and now - last[0] >= 60):
                last[0] = now
                self.say(f"  {line}")
        return progress

    def _keep_log(self, message: str, number: int) -> str | None:
        """The failed build's log (the cache keeps it; its path ends BuildFailed's message), copied here."""
        m = re.search(r"\(log (\S+)\)$", message)
        if not m or not Path(m.group(1)).is_file():
            return None
        kept = self.out / f"step-{number:02d}-build-failed.log"
        shutil.copyfile(m.group(1), kept)
        return str(kept)

    def _runs(self, step: StepRecord, artifact: Path, log: Path) -> None:
        for _ in range(self.req.repeat):
            if not self._run_once(step, artifact, log):
                return
        decisive = [r for r in step.runs if r.exit_code in (EXIT_OK, EXIT_KERNEL)]
        failed, n = sum(r.exit_code == EXIT_KERNEL for r in decisive), len(decisive)
        if failed == 0:
            step.verdict, step.decision = Verdict.GOOD, f"passed {n} of {n} run(s)"
        elif failed == n:
            step.verdict, step.decision = Verdict.BAD, f"failed {n} of {n} run(s)"
        else:
            step.verdict = Verdict.BAD if self.req.flaky_is == "bad" else Verdict.GOOD
            step.decision = (f"flaky: failed {failed} of {n} runs; --flaky-is {self.req.flaky_is}: "
                             f"taken as {step.verdict}")

    def _run_once(self, step: StepRecord, artifact: Path, log: Path) -> bool:
        """One decisive run (pass or fail), retrying infrastructure errors. False when the bisect ends here."""
        retries = self.req.retries
        for attempt in range(1, retries + 2):
            outcome = self.run(artifact, log)
            outcome.attempts = attempt
            step.runs.append(outcome)
            if outcome.exit_code in (EXIT_OK, EXIT_KERNEL):
                return True
            if outcome.exit_code == EXIT_BAD_INPUT:
                step.abort, step.decision = EXIT_BAD_INPUT, f"bad input: {outcome.note}"
                return False
            # Exit 3, or a run that died of a signal this process did not get: never taken as bad.
            if attempt <= retries:
                self.say(f"  step {step.step}: run: infrastructure error (exit {outcome.exit_code}: "
                         f"{outcome.note}), retry {attempt}/{retries}")
        step.abort = EXIT_INFRA
        step.decision = f"run: infrastructure error in {retries + 1} attempts: {step.runs[-1].note}"
        return False

    def line(self, step: StepRecord, estimate: int) -> str:
        """The step's progress line."""
        parts = [f"step {step.step}/~{max(estimate, step.step)}: {step.target.label}: {_build_text(step.build)}"]
        decisive = [r for r in step.runs if r.exit_code in (EXIT_OK, EXIT_KERNEL)]
        if step.runs:
            times = f"{len(decisive)}x " if self.req.repeat > 1 else ""
            parts.append(f", run {times}{sum(r.seconds for r in step.runs):.0f} s")
        failed = [r for r in decisive if r.exit_code == EXIT_KERNEL]
        names = ", ".join(_short(f) for f in step.failures())
        if step.abort is not None:
            verdict = f"ABORTED: {step.decision}"
        elif step.verdict is Verdict.SKIP:
            verdict = "skipped (does not build)"
        elif failed and len(failed) < len(decisive):
            verdict = f"FLAKY ({len(failed)} of {len(decisive)} failed, taken as {step.verdict}): FAIL {names}"
        elif step.verdict is Verdict.BAD:
            verdict = f"FAIL {names}"
        else:
            verdict = "PASS"
        return "".join(parts) + f": {verdict}"


def _secs(start: float) -> float:
    return round(time.monotonic() - start, 1)


def _build_text(build: BuildOutcome | None) -> str:
    if build is None:
        return "build not started"
    if build.status == "cached":
        return "build cached"
    if build.status == "failed":
        # The first compiler error, its path from the top of the tree (the cached tree's own path is noise).
        error = re.sub(r"^/[^:\s]*/src/", "", build.errors[0].strip()) if build.errors else ""
        return f"build FAILED in {build.seconds:.0f} s" + (f" ({error[:100]})" if error else "")
    if build.status == "error":
        return "build error"
    return f"build {build.seconds:.0f} s"


def _short(failure: TestFailure) -> str:
    if failure.test == BOOT:
        return f"boot ({failure.message[:100]})"
    return failure.test.split("::")[-1]



def harness_run(req: BisectRequest, out: Path, artifact: Path, log: Path) -> RunOutcome:
    """One `harness run` of the guest tests on `artifact`, its run directory in `out`, its
    output appended to `log`. A child process in its own session: on an interrupt it gets
    SIGTERM (it stops its VMs and marks its run interrupted) and the interrupt propagates."""
    argv = [sys.executable, "-m", "harness", "run", "--kernel", str(artifact), "--profile", req.profile,
            "--results", str(out), "--timeout", str(req.timeout)]
    if req.append:
        argv += ["--append", req.append]
    for key, value in req.params.items():
        argv += ["--param", f"{key}={value}"]
    argv += ["--", *req.pytest_args] if req.pytest_args else []
    before = {p.name for p in out.iterdir()}
    deadline = req.timeout + 900   # the tests' own deadline, plus boot and set-up
    start = time.monotonic()
    note = ""
    with open(log, "a") as f:
        f.write(f"\n### {shlex.join(argv)}\n")
        f.flush()
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, preexec_fn=die_with_parent)
        try:
            code = child.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            stop_group(child, term_wait=30.0)
            code, note = EXIT_INFRA, f"harness run still running after {deadline:.0f} s: stopped"
        except BaseException:
            stop_group(child, term_wait=60.0)
            raise
    seconds = _secs(start)
    new = sorted(p for p in out.iterdir() if p.name not in before and is_run_dir(p))
    return outcome_of(code, new[-1] if new else None, seconds, note or _last_line(log))


def outcome_of(code: int, run_dir: Path | None, seconds: float, note: str) -> RunOutcome:
    """A finished run as a step sees it: its failing tests (first failure line, dmesg error
    ids), or for a kernel that never reached them the boot failure; else why it broke."""
    outcome = RunOutcome(code, seconds, run_dir=str(run_dir) if run_dir else None, note=note)
    if run_dir is None:
        return outcome
    if code == EXIT_KERNEL:
        for rec in read_records(run_dir):
            if rec.status == "failed":
                ids = rec.properties.get("dmesg_error_ids") or []
                outcome.failures.append(TestFailure(rec.nodeid, _first_line(rec.message), [str(i) for i in ids]))
    try:
        failure = read_run(run_dir).failure
    except HarnessError:
        failure = None
    if failure is not None and not outcome.failures:
        if code == EXIT_KERNEL:
            outcome.failures.append(TestFailure(failure.test or BOOT, _first_line(failure.message)))
        outcome.note = _first_line(failure.message) or note
    return outcome


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
