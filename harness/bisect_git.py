"""`harness bisect --good C --bad C`: the first bad commit of a git range, found by git.

The commits are built in a cached clone of the user's repository
(harness.build.history): one work tree that git checks the commits out in and
one O= directory per configuration, so each step after the first is an
incremental build. This process checks the ends as for a series, then runs
`git bisect start BAD GOOD` and `git bisect run` in the clone, with this
module as the script:

    python -m harness.bisect_git BISECT_DIR

Each run of the script is one step: it reads the request from
BISECT_DIR/bisect.json, builds the commit git checked out, runs the guest
tests, adds its step to bisect.json, prints its progress line and exits 0
(good), 1 (bad), 125 (skip: it does not build, as kernel developers expect) or
255, which makes git abort (bad input, infrastructure that never recovered, a
signal: bisect.json says which). git's own output is kept in
BISECT_DIR/git-bisect-run.log, and `git bisect log` in git-bisect.log (for
`git bisect replay`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness.bisect import conclude, end_check, stop_on_abort
from harness.bisect_record import (
    BisectRecord,
    BisectRequest,
    StepRecord,
    Target,
    Verdict,
    read_record,
    write_record,
)
from harness.bisect_step import BuildFn, Stepper
from harness.build import build_checkout, open_history
from harness.build.make import COMPILE_DEADLINE
from harness.errors import BadInput, HarnessError, InfraError, Terminated
from harness.paths import REPO, atomic_write
from harness.process import alive, die_with_parent, raise_on_sigterm

SCRIPT_GOOD, SCRIPT_BAD, SCRIPT_SKIP, SCRIPT_ABORT = 0, 1, 125, 255
STEP_PID = "step.pid"     # in the bisect directory while a script step runs


class GitRange:
    """A range GOOD..BAD of a git repository, bisected by `git bisect run`."""

    kind = "git"

    def __init__(self, req: BisectRequest) -> None:
        self.req = req
        self.repo = open_history(req.source)
        self.good, self.bad = self.repo.commit(str(req.good)), self.repo.commit(str(req.bad))
        if self.good == self.bad:
            raise BadInput(f"--good {req.good} and --bad {req.bad} are the same commit")
        if not self.repo.is_ancestor(self.good, self.bad):
            raise BadInput(f"--good {req.good} is not an ancestor of --bad {req.bad}")
        self.count = int(self.repo.in_origin("rev-list", "--count", f"{self.good}..{self.bad}").strip())

    def target(self, commit: str) -> Target:
        return Target(self.repo.subject(commit), commit=commit)

    def describe(self, record: BisectRecord) -> None:
        record.good, record.bad = self.target(self.good), self.target(self.bad)

    def summary(self) -> str:
        return f"{self.count} commits {self.req.good}..{self.req.bad} of {self.req.source}"

    def search(self, record: BisectRecord, stepper: Stepper, save: Callable[[], None]) -> None:
        with self.repo.bisecting():
            if (self.repo.tree / ".git" / "BISECT_START").exists():
                self.repo.git("bisect", "reset").check("git bisect reset (a bisect left in the clone)")
            estimate = 2 + max(1, self.count - 1).bit_length()
            ends = []
            for commit, end, expected in ((self.good, "good", Verdict.GOOD), (self.bad, "bad", Verdict.BAD)):
                self.repo.checkout(commit)
                step = stepper.step(record, self.target(commit), estimate, self._builder(commit))
                save()
                stop_on_abort(step)
                end_check(step, end, expected)
                ends.append(step)
            if self.count == 1:
                conclude(record, ends[0], ends[1], [])
                return
            try:
                self._git_bisect(record, stepper.out)
            finally:
                self._finish(stepper.out)
                record.steps = read_record(stepper.out).steps

    def _builder(self, commit: str) -> BuildFn:
        return lambda progress: build_checkout(self.repo.tree, self.repo.source(commit), self.req.configs, progress)

    def _git_bisect(self, record: BisectRecord, out: Path) -> None:
        self.repo.git("bisect", "start", self.bad, self.good).check("git bisect start")
        per_step = COMPILE_DEADLINE + self.req.repeat * (self.req.retries + 1) * (self.req.timeout + 900)
        lines = _GitBisectRun(self.repo.tree, out, per_step * (self.count.bit_length() + 2)).run()
        done = read_record(out)
        if done.steps:
            stop_on_abort(done.steps[-1])
        steps = {s.target.commit: s for s in done.steps}
        first, candidates = first_bad_of(lines)
        bad = first or (self.repo.git("rev-parse", "refs/bisect/bad").out.strip() if candidates else None)
        if bad is None or bad not in steps:
            tail = " | ".join(lines[-3:]) or "no output"
            raise InfraError(f"git bisect run ended without naming a commit: {tail}")
        good = self._last_good(done.steps, bad)
        record.steps = done.steps
        conclude(record, good, steps[bad], [] if first else [self.target(c) for c in candidates if c != bad])

    def _last_good(self, steps: list[StepRecord], bad: str) -> StepRecord:
        """The good step nearest below `bad`: of its good ancestors, the one with the most history."""
        good = [s for s in steps if s.verdict is Verdict.GOOD and s.target.commit
                and self.repo.is_ancestor(s.target.commit, bad)]
        return max(good, key=lambda s: int(self.repo.in_origin("rev-list", "--count", str(s.target.commit))))

    def _finish(self, out: Path) -> None:
        """git's log of the bisect kept beside the steps; the clone out of bisect mode."""
        log = self.repo.git("bisect", "log")
        if log.ok:
            atomic_write(out / "git-bisect.log", log.out)
        self.repo.git("bisect", "reset")


def first_bad_of(lines: list[str]) -> tuple[str | None, list[str]]:
    """git bisect run's verdict from its output: the first bad commit, or (when only
    skipped commits are left) the commits it could be, as git lists them."""
    for line in lines:
        m = re.match(r"([0-9a-f]{40}) is the first bad commit", line)
        if m:
            return m.group(1), []
    if not any("could be any of" in line for line in lines):
        return None, []
    listed = lines[next(i for i, line in enumerate(lines) if "could be any of" in line) + 1:]
    return None, [line.strip() for line in listed if re.fullmatch(r"[0-9a-f]{40}", line.strip())]


class _GitBisectRun:
    """`git bisect run` with this module as the script: git's output read by a thread
    it owns into git-bisect-run.log; a deadline; on an interrupt or the deadline, SIGTERM
    to git and the script (the script stops its build or run and records the step),
    then a wait for the script to finish, SIGKILL past that."""

    def __init__(self, tree: Path, out: Path, deadline: float) -> None:
        self.out = out
        self.deadline = deadline
        self.lines: list[str] = []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.argv = ["git", "-C", str(tree), "bisect", "run", sys.executable, "-m", "harness.bisect_git", str(out)]
        self.env = env

    def run(self) -> list[str]:
        """git's output lines. Raises InfraError past the deadline; interrupts propagate."""
        # git's stdout (its own account of the bisect) goes to the log; stderr, where each
        # step prints its progress line, stays the user's.
        proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
        reader = threading.Thread(target=self._read, args=(proc,), name="git bisect run", daemon=True)
        reader.start()
        try:
            proc.wait(timeout=self.deadline)
        except subprocess.TimeoutExpired:
            self._stop(proc)
            raise InfraError(f"git bisect run still running after {self.deadline:.0f} s: stopped") from None
        except BaseException:
            self._stop(proc)
            raise
        finally:
            reader.join(timeout=30)
        return self.lines

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.out / "git-bisect-run.log", "a") as log:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                self.lines.append(line)

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file = self.out / STEP_PID
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                break
            if not alive(pid):
                break
            time.sleep(0.2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass   # git stuck past SIGKILL (in the kernel): nothing more to do from here


def _steps_left(tree_git: Callable[..., str]) -> int:
    """git's own estimate of the steps after this one (`rev-list --bisect-vars`)."""
    goods = tree_git("for-each-ref", "--format=%(refname)", "refs/bisect/good-*").split()
    out = tree_git("rev-list", "--bisect-vars", "refs/bisect/bad", "--not", *goods)
    m = re.search(r"^bisect_steps=(\d+)", out, re.M)
    return int(m.group(1)) if m else 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def step_main(argv: list[str]) -> int:
    """The `git bisect run` script: one step on the commit checked out. Its exit status is
    git's verdict (the module's docstring)."""
    restore = raise_on_sigterm()
    if len(argv) != 1:
        print("usage: python -m harness.bisect_git BISECT_DIR (run by harness bisect)", file=sys.stderr)
        return SCRIPT_ABORT
    out = Path(argv[0])
    pid_file = out / STEP_PID
    try:
        pid_file.write_text(str(os.getpid()))
        record = read_record(out)
        req = record.request
        repo = open_history(req.source)
        commit = repo.head()
        estimate = len(record.steps) + 1 + _steps_left(lambda *a: repo.git(*a).out)
        target = Target(repo.subject(commit), commit=commit)
        try:
            step = Stepper(req, out, _say).step(
                record, target, estimate,
                lambda progress: build_checkout(repo.tree, repo.source(commit), req.configs, progress))
        finally:
            write_record(out, record)
        if step.abort is not None or step.verdict is None:
            return SCRIPT_ABORT
        return {Verdict.GOOD: SCRIPT_GOOD, Verdict.BAD: SCRIPT_BAD, Verdict.SKIP: SCRIPT_SKIP}[step.verdict]
    except HarnessError as e:
        print(f"harness bisect: step: {e}", file=sys.stderr)
        return SCRIPT_ABORT
    except (KeyboardInterrupt, Terminated):
        return SCRIPT_ABORT
    except Exception as e:  # noqa: BLE001 - git shows the script's stderr: a line, not a traceback
        print(f"harness bisect: step: internal error: {e!r}", file=sys.stderr)
        return SCRIPT_ABORT
    finally:
        pid_file.unlink(missing_ok=True)
        restore()


if __name__ == "__main__":
    sys.exit(step_main(sys.argv[1:]))
