"""`harness bisect`: the first bad patch of a series, or the first bad commit of a
git range, for a failing boot or guest test.

Both kinds check their ends first: the good end (the base without patches, or
`--good`) must pass and the bad end (the whole series, or `--bad`) must fail,
else the bisect is bad input (exit 2) saying which end does not behave. A
series is then searched by binary search over its prefixes (`next_prefix`); a
git range by `git bisect run` in a cached clone with history, with the harness
as its script (harness.bisect_git). Each step is a build and one or more
ordinary runs (harness.bisect_step).

Results: `RESULTS/bisect-<time>/` holds a normal run directory per run of each
step, a log per step, and bisect.json (harness.bisect_step.BisectRecord),
rewritten after every step. Exit codes: 0 a culprit was named, 1 only patches
or commits that do not build were left between the last good and the first
bad (they are named), 2 bad input, 3 infrastructure that never recovered,
128+N a signal (bisect.json stays `incomplete`; no build or VM is left).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from harness.bisect_record import (
    BisectRecord,
    BisectRequest,
    BisectStatus,
    StepRecord,
    Target,
    Verdict,
    write_record,
)
from harness.bisect_step import RunFn, Say, Stepper
from harness.build import BuildSpec, Patch, build, load_fragment, load_series, load_spec, resolve_source
from harness.errors import EXIT_KERNEL, EXIT_OK, BadInput, HarnessError, InfraError, Terminated
from harness.paths import KCONFIGS_DIR, load_yaml
from harness.profiles import load_profile
from harness.rundir import timestamp

RANGE_KEYS = ("good", "bad")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def spec_request(path: Path, options: BisectRequest) -> BisectRequest:
    """`options` (the command line's) with the kernel a spec YAML names: a build spec
    ({source, series, configs}), or {source, configs, good, bad} for a git range."""
    data = load_yaml(path, "bisect spec")
    spec = load_spec(path, extra_keys=RANGE_KEYS)
    ends = {key: str(data[key]) if isinstance(data, dict) and data.get(key) is not None else None
            for key in RANGE_KEYS}
    return replace(options, source=spec.source, series=spec.series, configs=spec.configs, good=ends["good"],
                   bad=ends["bad"])


def bisect_command(kernel: str, profile: str, append: str = "", params: Mapping[str, str] | None = None,
                   pytest_args: Sequence[str] = ()) -> str | None:
    """The `harness bisect` command line for a kernel that went red, when it is a build
    spec with a series; None for anything else (a bzImage, a Debian package: nothing to bisect)."""
    path = Path(kernel)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return None
    try:
        if not load_spec(path).series:
            return None
    except BadInput:
        return None
    argv = ["harness", "bisect", kernel, "--profile", profile]
    argv += ["--append", append] if append else []
    for key, value in (params or {}).items():
        argv += ["--param", f"{key}={value}"]
    args = list(pytest_args)
    argv += args if len(args) == 2 and args[0] == "-k" else ["--", *args] if args else []
    return shlex.join(argv)


class NightEntry(Protocol):
    """What `bisect_hints` reads of a nightly entry (harness.nightly.Entry)."""

    name: str
    kernel: str
    profile: str
    append: str
    params: dict[str, str]
    pytest_args: list[str]


def bisect_hints(night: Path, failed: list[str], entries: Sequence[NightEntry]) -> list[str]:
    """For each entry of a night whose kernel failed a test (`failed`: entry names) but not
    the last time an earlier night beside it ran that entry (a new regression), the
    `harness bisect` command for its kernel spec and suite; none for kernels that are not
    build specs with a series. Lines for the night's summary; none when nothing is new."""
    by_name = {e.name: e for e in entries}
    lines = []
    for name in dict.fromkeys(failed):
        entry = by_name.get(name)
        if entry is None or _last_exit_code(night, name) == EXIT_KERNEL:
            continue
        command = bisect_command(entry.kernel, entry.profile, entry.append, entry.params, entry.pytest_args)
        if command:
            lines.append(f"  {name}: {command}")
    return ["new regressions, to bisect:", *lines] if lines else []


def _last_exit_code(night: Path, entry: str) -> int | None:
    """The entry's exit code in the newest earlier night beside `night` (its nightly.json) that ran it."""
    for earlier in sorted((p for p in night.parent.glob("nightly-*") if p.name < night.name), reverse=True):
        try:
            done = json.loads((earlier / "nightly.json").read_text()).get("outcomes", [])
        except (OSError, ValueError, AttributeError):
            continue
        codes = [o["exit_code"] for o in done if isinstance(o, dict) and o.get("entry") == entry
                 and isinstance(o.get("exit_code"), int)]
        if codes:
            return EXIT_KERNEL if EXIT_KERNEL in codes else int(codes[-1])
    return None


def next_prefix(good: int, bad: int, skipped: set[int]) -> int | None:
    """The series prefix to try between a good and a bad one: the middle; when that does
    not build, the untried prefix nearest to it (the shorter on a tie). None when only
    prefixes that do not build are left."""
    left = [i for i in range(good + 1, bad) if i not in skipped]
    if not left:
        return None
    middle = (good + bad) / 2
    return min(left, key=lambda i: (abs(i - middle), i))


def steps_left(good: int, bad: int) -> int:
    """Roughly how many steps a binary search needs between a good and a bad position."""
    return math.ceil(math.log2(bad - good)) if bad - good > 1 else 0


def bisect(req: BisectRequest, argv: list[str], as_json: bool = False, say: Say = _say,
           run: RunFn | None = None) -> int:
    """Run the bisect `req` asks for; returns its exit code (the module's docstring).

    Raises BadInput before anything runs (unknown profile, missing files, a request
    that is neither a series nor a range); everything after the bisect directory
    exists ends in bisect.json and the return value. `run` replaces the `harness run`
    child of each step (tests)."""
    _check(req)
    req = _absolute(req)
    load_profile(req.profile)
    for name in req.configs:
        load_fragment(name)
    if req.good is not None:
        from harness.bisect_git import GitRange

        job: _Series | GitRange = GitRange(req)
    else:
        job = _Series(req)
    out = _new_dir(Path(req.results))
    record = BisectRecord(req, job.kind, started=timestamp(), command=["harness", *argv])
    job.describe(record)
    write_record(out, record)
    say(f"bisect {out.name}: {job.summary()}; profile {req.profile}"
        + (f", tests {' '.join(req.pytest_args)}" if req.pytest_args else "") + f"; results {out}")
    start = time.monotonic()
    try:
        job.search(record, Stepper(req, out, say, run), lambda: write_record(out, record))
    except HarnessError as e:
        record.status = BisectStatus.BAD_INPUT if isinstance(e, BadInput) else BisectStatus.INFRA_ERROR
        record.message, record.exit_code = str(e), e.exit_code
    except (KeyboardInterrupt, Terminated) as e:
        signum = e.signum if isinstance(e, Terminated) else int(signal.SIGINT)
        record.interrupted_by, record.exit_code = signum, 128 + signum
        record.message = f"interrupted by signal {signum}"
    record.finished = timestamp()
    write_record(out, record)
    if as_json:
        print(json.dumps(record.to_json(), indent=1))
    else:
        # A verdict is the command's output; a bisect that ended without one says why on stderr.
        found = record.status in (BisectStatus.FOUND, BisectStatus.NARROWED)
        print(report(record, out, time.monotonic() - start), file=sys.stdout if found else sys.stderr)
    return record.exit_code if record.exit_code is not None else EXIT_OK


def _check(req: BisectRequest) -> None:
    if req.repeat < 1 or req.retries < 0 or req.timeout <= 0:
        raise BadInput("harness bisect: --repeat >= 1, --retries >= 0 and --timeout > 0")
    if req.flaky_is not in ("good", "bad"):
        raise BadInput(f"harness bisect: --flaky-is {req.flaky_is!r}: good or bad")
    if (req.good is None) != (req.bad is None):
        raise BadInput("harness bisect: a git range needs both --good and --bad")
    if req.good is not None and req.series:
        raise BadInput("harness bisect: a series or a git range (--good/--bad), not both")
    if req.good is None and not req.series:
        raise BadInput("harness bisect: give a series (--series, or a spec with one) or a git range (--good/--bad)")


def _absolute(req: BisectRequest) -> BisectRequest:
    """The request with the paths it names made absolute: the git-range script runs elsewhere."""
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    return replace(req, source=absolute(req.source), series=absolute(req.series) if req.series else req.series,
                   configs=[c if (KCONFIGS_DIR / f"{c}.config").exists() else absolute(c) for c in req.configs],
                   results=str(Path(req.results).resolve()))


def _new_dir(results: Path) -> Path:
    """RESULTS/bisect-<time> (-2, -3... when two start in the same second). BadInput if RESULTS is unusable."""
    stamp = time.strftime("bisect-%Y%m%d-%H%M%S")
    try:
        results.mkdir(parents=True, exist_ok=True)
        for n in range(1, 100):
            out = results.resolve() / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                out.mkdir()
                return out
            except FileExistsError:
                continue
    except OSError as e:
        raise BadInput(f"--results {results}: {e.strerror}") from None
    raise InfraError(f"{results}: cannot make a bisect directory named {stamp}")


def end_check(step: StepRecord, end: str, expected: Verdict) -> None:
    """An end of the range must behave: the good end pass, the bad end fail. BadInput saying which does not."""
    if step.verdict is expected:
        return
    what = f"the {end} end, {step.target.label},"
    if step.verdict is Verdict.SKIP:
        errors = step.build.errors if step.build else []
        raise BadInput(f"{what} does not build" + (f": {errors[0].strip()}" if errors else "")
                       + ("; `harness build --per-patch` names the patch that breaks it" if end == "bad" else ""))
    if expected is Verdict.GOOD:
        raise BadInput(f"{what} does not pass ({step.decision}): FAIL "
                       + ", ".join(f"{f.test} ({f.message[:120]})" for f in step.failures())
                       + ": a bisect needs a good end that passes")
    raise BadInput(f"{what} passes ({step.decision}): the selected tests do not fail on it, nothing to bisect")


def stop_on_abort(step: StepRecord) -> None:
    """A step that ended the bisect (its `abort`) as the error to end it with."""
    if step.abort is None:
        return
    message = f"step {step.step} ({step.target.label}): {step.decision}"
    if step.abort == BadInput.exit_code:
        raise BadInput(message)
    if step.abort > 128:
        raise Terminated(step.abort - 128)
    raise InfraError(message)


def conclude(record: BisectRecord, good: StepRecord, bad: StepRecord, candidates: list[Target]) -> None:
    """The verdict: the first bad target (or, when targets that do not build are left between,
    the candidates), the last good one, the failing tests and how to reproduce them."""
    record.last_good = good.target
    record.failing_tests = bad.failures()
    failing = next((r for r in bad.runs if r.exit_code == EXIT_KERNEL and r.run_dir), None)
    record.reproduce = f"harness reproduce {failing.run_dir}" if failing else None
    if candidates:
        record.status, record.exit_code = BisectStatus.NARROWED, EXIT_KERNEL
        record.candidates = [*candidates, bad.target]
        record.message = (f"the first bad one is one of {len(record.candidates)}: "
                          + ", ".join(t.label for t in record.candidates)
                          + " (all but the last do not build)")
    else:
        record.status, record.exit_code = BisectStatus.FOUND, EXIT_OK
        record.first_bad = bad.target
        record.message = f"first bad {bad.target.label}"


class _Series:
    """A patch series: binary search over its prefixes (0 = the base, no patches)."""

    kind = "series"

    def __init__(self, req: BisectRequest) -> None:
        resolve_source(req.source)
        self.spec = BuildSpec(source=req.source, series=req.series, configs=list(req.configs))
        with tempfile.TemporaryDirectory(prefix="harness-series-") as tmp:
            self.patches: list[Patch] = load_series(req.series, Path(tmp))
        if not self.patches:
            raise BadInput(f"series {req.series}: no patches")

    def target(self, prefix: int) -> Target:
        if prefix == 0:
            return Target("(base, no patches)", index=0, total=len(self.patches))
        patch = self.patches[prefix - 1]
        # A quilt series file may name patches through "..": the file as people would write it.
        return Target(patch.subject, index=prefix, total=len(self.patches), file=os.path.normpath(patch.path))

    def describe(self, record: BisectRecord) -> None:
        record.patches = [self.target(i) for i in range(1, len(self.patches) + 1)]

    def summary(self) -> str:
        return f"{len(self.patches)} patches of {self.spec.series} on {self.spec.source}"

    def search(self, record: BisectRecord, stepper: Stepper, save: Callable[[], None]) -> None:
        n = len(self.patches)
        tried: dict[int, StepRecord] = {}

        def step(prefix: int, estimate: int) -> StepRecord:
            patches = self.patches[:prefix]
            try:
                done = stepper.step(record, self.target(prefix), estimate,
                                    lambda progress: build(self.spec, patches=patches, progress=progress,
                                                           later=self.patches[prefix:]))
            finally:
                save()
            stop_on_abort(done)
            tried[prefix] = done
            return done

        end_check(step(0, 2 + steps_left(0, n)), "good", Verdict.GOOD)
        end_check(step(n, 2 + steps_left(0, n)), "bad", Verdict.BAD)
        good, bad, skipped = 0, n, set[int]()
        while (prefix := next_prefix(good, bad, skipped)) is not None:
            verdict = step(prefix, len(record.steps) + steps_left(good, bad)).verdict
            if verdict is Verdict.SKIP:
                skipped.add(prefix)
            elif verdict is Verdict.BAD:
                bad = prefix
            else:
                good = prefix
        conclude(record, tried[good], tried[bad], [self.target(i) for i in range(good + 1, bad)])


def report(record: BisectRecord, out: Path, seconds: float) -> str:
    """The end of a bisect for people: the verdict, the failing tests, how to reproduce."""
    steps = record.steps
    builds = sum(1 for s in steps if s.build is not None and s.build.status == "built")
    runs = sum(len(s.runs) for s in steps)
    lines = []
    if record.status in (BisectStatus.FOUND, BisectStatus.NARROWED):
        first = record.first_bad
        if first is not None and first.commit is not None:
            lines.append(f"first bad commit {first.commit} {first.subject!r}")
        elif first is not None:
            lines.append(f"first bad {first.label} ({first.file})")
        else:
            lines.append(f"no single culprit: {record.message}")
        if record.last_good is not None:
            lines.append(f"last good: {record.last_good.label}")
        if record.failing_tests:
            lines.append("failing tests:")
        for failure in record.failing_tests:
            lines.append(f"  {failure.test}: {failure.message[:200]}")
            if failure.dmesg_error_ids:
                lines.append(f"    dmesg error ids: {', '.join(failure.dmesg_error_ids)}")
        if record.reproduce:
            lines.append(f"reproduce: {record.reproduce}")
    else:
        lines.append(f"harness bisect: {record.message}")
    lines.append(f"{len(steps)} steps ({builds} builds, {runs} runs) in {seconds:.0f} s; "
                 f"status {record.status} (exit {record.exit_code}); {out / 'bisect.json'}")
    return "\n".join(lines)
