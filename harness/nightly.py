"""`harness nightly MATRIX.yaml`: kernels x profiles x suites into one results tree.

Matrix YAML:

    kernels:                          # a kernel, or {kernel: K, label: NAME} to name its build
      - debian:linux-image-6.1.0-56-cloud-amd64
      - {kernel: kernels/coco-sample.yaml, label: sample}
    profiles: [emulated, snp]
    suites:
      boot: [-k, test_boot]           # name: pytest arguments
      dma: [-k, test_dma]
    timeout: 900                      # per entry, seconds
    repeat: 1                         # runs per entry (flaky tests show as fail:runs)
    retries: 1                        # extra attempts for infrastructure errors (exit 3)
    entries:                          # optional explicit entries, beside the product
      - {kernel: K, profile: P, suite: boot, append: "...", qemu_args: [...], params: {k: v}, label: NAME}

Each entry is one `harness run` (a child process) writing <night>/<entry>/<run-id>/.
The night's exit code: 1 if any kernel failed a test, else 3 if infrastructure
broke, else 0. `--shard I/N` takes every N-th entry, deterministically, so N lab
machines share a night; `--merge DIR...` joins their trees into one report.

The report compares the night's builds: runs with the same profile, kernel
command line, QEMU arguments and parameters are compared across their kernels'
builds in matrix order (the first kernel is the base), repeats counted, so the
summary names a regression of a patched build against its base even when both
report one release, and keeps `flaky` for a build whose own runs disagree.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from junitparser import JUnitXml

from harness.compare import Comparison, RunSummary, compare, findings, load_run
from harness.errors import EXIT_BAD_INPUT, EXIT_INFRA, EXIT_KERNEL, EXIT_OK, BadInput
from harness.paths import atomic_write, load_yaml
from harness.process import die_with_parent
from harness.report import render_html
from harness.results import write_junit_xml
from harness.rundir import is_run_dir, read_run

_KEYS = {"kernels", "profiles", "suites", "timeout", "repeat", "retries", "entries"}
_ENTRY_KEYS = {"kernel", "profile", "suite", "append", "qemu_args", "params", "timeout", "repeat", "name", "label"}


@dataclass
class Entry:
    name: str
    kernel: str
    profile: str
    suite: str
    pytest_args: list[str]
    timeout: float
    append: str = ""
    qemu_args: list[str] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    label: str | None = None


@dataclass
class Outcome:
    entry: str
    kernel: str
    profile: str
    suite: str
    repeat: int
    exit_code: int
    status: str
    attempts: int
    run_dir: str | None
    seconds: float
    message: str = ""
    label: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text.replace("debian:", "")).strip("_")[:60]


def _number(data: dict[str, Any], key: str, default: float, low: float, where: str,
            inclusive: bool = False) -> float:
    """data[key] as a number above `low` (or at least `low`), else BadInput naming the key."""
    value = data.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (value < low if inclusive else value <= low):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise BadInput(f"{where}: key {key!r} must be a number {bound}, not {value!r}")
    return float(value)


def _known_profile(name: object, where: str) -> None:
    """An unknown profile is bad input before the night starts, not an error per entry."""
    from harness.profiles import available

    if not isinstance(name, str) or name not in available():
        raise BadInput(f"{where}: unknown profile {name!r}; available: {', '.join(available())}")


def load_matrix(path: Path) -> tuple[list[Entry], int, int]:
    """Entries (product first, then explicit ones), repeat, retries. Raises BadInput."""
    data = load_yaml(path, "matrix")
    where = f"matrix {path}"
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping with kernels, profiles, suites")
    unknown = set(data) - _KEYS
    if unknown:
        raise BadInput(f"{where}: unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(_KEYS))}")
    suites = data.get("suites") or {"all": []}
    if not isinstance(suites, dict) or not all(isinstance(v, list) for v in suites.values()):
        raise BadInput(f"{where}: key 'suites' maps names to lists of pytest arguments")
    timeout = _number(data, "timeout", 1800.0, 0, where)
    repeat = int(_number(data, "repeat", 1, 1, where, inclusive=True))
    retries = int(_number(data, "retries", 1, 0, where, inclusive=True))
    for key in ("kernels", "profiles", "entries"):
        if not isinstance(data.get(key) or [], list):
            raise BadInput(f"{where}: key {key!r} must be a list, not {data[key]!r}")
    entries = []
    kernels = [_kernel(item, f"{where}: kernels[{i}]") for i, item in enumerate(data.get("kernels") or [])]
    for i, profile in enumerate(data.get("profiles") or []):
        _known_profile(profile, f"{where}: profiles[{i}]")
    for (kernel, label), profile, suite in itertools.product(kernels, data.get("profiles") or [], suites):
        entries.append(Entry(f"{_slug(label or kernel)}--{profile}--{suite}", kernel, str(profile), suite,
                             [str(a) for a in suites[suite]], timeout, label=label))
    for i, raw in enumerate(data.get("entries") or []):
        if not isinstance(raw, dict) or not {"kernel", "profile"} <= set(raw) or set(raw) - _ENTRY_KEYS:
            raise BadInput(f"{where}: entries[{i}] needs kernel and profile; keys: {', '.join(sorted(_ENTRY_KEYS))}")
        _known_profile(raw["profile"], f"{where}: entries[{i}].profile")
        suite = str(raw.get("suite", next(iter(suites))))
        if suite not in suites:
            raise BadInput(f"{where}: entries[{i}]: unknown suite {suite!r}; suites: {', '.join(suites)}")
        kernel, label = _kernel({"kernel": raw["kernel"], "label": raw.get("label")}, f"{where}: entries[{i}]")
        name = raw.get("name") or f"{_slug(label or kernel)}--{raw['profile']}--{suite}--x{i + 1}"
        entries.append(Entry(str(name), kernel, str(raw["profile"]), suite,
                             [str(a) for a in suites[suite]], float(raw.get("timeout", timeout)),
                             str(raw.get("append", "")), [str(a) for a in raw.get("qemu_args", [])],
                             {str(k): str(v) for k, v in (raw.get("params") or {}).items()}, label))
    if not entries:
        raise BadInput(f"{where}: no entries (give kernels and profiles, or entries)")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise BadInput(f"{where}: two entries are named {next(n for n in names if names.count(n) > 1)!r}")
    return entries, repeat, retries


def _kernel(item: object, where: str) -> tuple[str, str | None]:
    """A matrix kernel: `K` or {kernel: K, label: NAME}. Raises BadInput."""
    if isinstance(item, dict) and set(item) <= {"kernel", "label"} and item.get("kernel"):
        label = item.get("label")
        if label is not None and not str(label).strip():
            raise BadInput(f"{where}: an empty label")
        return str(item["kernel"]), str(label).strip() if label is not None else None
    if isinstance(item, (str, int, float)) and str(item):
        return str(item), None
    raise BadInput(f"{where}: expected a kernel, or {{kernel: K, label: NAME}}")


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 1, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise BadInput(f"--shard {text!r}: expected I/N with 1 <= I <= N")
    return int(m.group(1)), int(m.group(2))


def shard(entries: list[Entry], index: int, total: int) -> list[Entry]:
    """Every total-th entry starting at index (1-based): the same split on every machine."""
    return [e for i, e in enumerate(entries) if i % total == index - 1]


class Progress:
    """One line per event; on a terminal the running count is kept on a status line."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self._lock = threading.Lock()
        self._tty = sys.stdout.isatty()

    def say(self, text: str, finished: bool = False) -> None:
        with self._lock:
            self.done += finished
            prefix = f"[{self.done}/{self.total}]"
            print(("\r\033[K" if self._tty else "") + f"{prefix} {text}", flush=True)


def _run_entry(entry: Entry, repeat: int, retries: int, night: Path, progress: Progress) -> Outcome:
    target = night / entry.name
    target.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "harness", "run", "--kernel", entry.kernel, "--profile", entry.profile,
            "--results", str(target), "--timeout", str(entry.timeout)]
    if entry.label:
        argv += ["--label", entry.label]
    if entry.append:
        argv += ["--append", entry.append]
    argv += [f"--qemu-arg={a}" for a in entry.qemu_args]
    for key, value in entry.params.items():
        argv += ["--param", f"{key}={value}"]
    argv += ["--", *entry.pytest_args] if entry.pytest_args else []
    attempts, start, code, message = 0, time.monotonic(), EXIT_INFRA, ""
    while attempts <= retries:
        attempts += 1
        progress.say(f"{entry.name} (repeat {repeat}): running" + (f", attempt {attempts}" if attempts > 1 else ""))
        before = {p.name for p in target.iterdir()}
        try:
            # die_with_parent: a killed nightly takes its runs (and so their QEMUs) with it.
            # The pool thread that forks outlives the child, as PDEATHSIG needs.
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=entry.timeout + 300,
                                  stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
            code, out = proc.returncode, proc.stdout
            message = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            code, out, message = EXIT_INFRA, "", f"entry exceeded {entry.timeout + 300:.0f} s"
        # Repeats of one entry run side by side in one directory: the run's first line names its own.
        said = re.search(r"^run (\S+): ", out, re.M)
        new = sorted(p for p in target.iterdir() if p.name not in before and is_run_dir(p))
        run_dir = (str(target / said.group(1)) if said and is_run_dir(target / said.group(1))
                   else str(new[-1]) if new else None)
        if code != EXIT_INFRA:
            break
    status = {EXIT_OK: "passed", EXIT_KERNEL: "failed", EXIT_BAD_INPUT: "bad-input"}.get(code, "infra-error")
    progress.say(f"{entry.name} (repeat {repeat}): {status} (exit {code}, {attempts} attempt(s))", finished=True)
    return Outcome(entry.name, entry.kernel, entry.profile, entry.suite, repeat, code, status, attempts,
                   run_dir, round(time.monotonic() - start, 1), message, entry.label)


def night_exit_code(outcomes: list[Outcome]) -> int:
    """1 if any kernel failed a test; else 3 if anything else broke (an entry with
    bad input, e.g. a missing kernel, is a broken night too); else 0."""
    codes = {o.exit_code for o in outcomes}
    if EXIT_KERNEL in codes:
        return EXIT_KERNEL
    return EXIT_INFRA if codes - {EXIT_OK} else EXIT_OK


def merge_junit(outcomes: list[Outcome], path: Path) -> None:
    """One JUnit file: each run's suite, renamed after its entry; entries without results get an error case."""
    from junitparser import Error, TestCase, TestSuite

    merged = JUnitXml()
    for o in outcomes:
        junit = Path(o.run_dir) / "junit.xml" if o.run_dir else None
        if junit is not None and junit.exists():
            for suite in JUnitXml.fromfile(str(junit)):
                suite.name = f"{o.entry}#{o.repeat}"
                merged.add_testsuite(suite)
        else:
            suite = TestSuite(f"{o.entry}#{o.repeat}")
            case = TestCase("harness_run", classname=o.entry)
            case.result = [Error(o.message or o.status)]
            suite.add_testcase(case)
            suite.update_statistics()  # type: ignore[no-untyped-call]
            merged.add_testsuite(suite)
    write_junit_xml(path, merged)


def comparisons(outcomes: list[Outcome]) -> dict[str, Comparison]:
    """The night's builds compared, per setting (profile, then the kernel command line, QEMU
    arguments and parameters a run added, as its record says), in matrix order. Runs that broke
    for infrastructure or bad input are left out: their errors say nothing of the kernel. So is
    a run whose record cannot be read (named on stderr): the report is written all the same."""
    settings: dict[str, list[RunSummary]] = {}
    for o in outcomes:
        if o.run_dir is None or o.status not in ("passed", "failed") or not is_run_dir(Path(o.run_dir)):
            continue
        try:
            inv, run = read_run(Path(o.run_dir)).invocation, load_run(Path(o.run_dir))
        except BadInput as e:
            print(f"warning: {o.entry}#{o.repeat} left out of the comparison: {e}", file=sys.stderr)
            continue
        extra = [f"--append {inv.append}"] if inv and inv.append else []
        extra += [f"--qemu-arg {a}" for a in inv.qemu_args] if inv else []
        extra += [f"--param {k}={v}" for k, v in sorted(inv.params.items())] if inv else []
        settings.setdefault(" ".join([inv.profile if inv else o.profile, *extra]), []).append(run)
    return {setting: compare(runs) for setting, runs in settings.items()}


def summary(outcomes: list[Outcome], compared: dict[str, Comparison] | None = None) -> str:
    """The builds compared (what changed), then each run's status, then the counts (the last line)."""
    lines = []
    for setting, c in (compared or {}).items():
        runs = ", ".join(f"{k} ({len(c.runs[k])} run{'s' if len(c.runs[k]) != 1 else ''})" for k in c.kernels)
        lines.append(f"builds under {setting}, base first: {runs}")
        lines += [f"  {line}" for line in findings(c)] or ["  the same verdict on every build"]
        lines.append("")
    lines.append(f"{'STATUS':12} {'EXIT':4} {'TRY':3} {'TIME':>7}  ENTRY")
    for o in outcomes:
        lines.append(f"{o.status.upper():12} {o.exit_code:4} {o.attempts:3} {o.seconds:6.1f}s  {o.entry}#{o.repeat}"
                     + (f"  {o.message[:90]}" if o.status != "passed" else ""))
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("passed", "failed", "infra-error", "bad-input")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def write_report(night: Path, outcomes: list[Outcome], extra: dict[str, Any]) -> int:
    """nightly.json, junit.xml, summary.txt and compare-<setting>.html; returns the night's exit code."""
    code = night_exit_code(outcomes)
    compared = comparisons(outcomes)
    atomic_write(night / "nightly.json", json.dumps({
        **extra, "exit_code": code, "outcomes": [asdict(o) for o in outcomes],
        "comparisons": {setting: c.to_json() for setting, c in compared.items()}}, indent=1) + "\n")
    merge_junit(outcomes, night / "junit.xml")
    pages: set[str] = set()
    for setting, c in compared.items():
        page = f"compare-{_slug(setting)}"
        page += f"-{len(pages) + 1}" if page in pages else ""
        pages.add(page)
        atomic_write(night / f"{page}.html", render_html(c))
    (night / "summary.txt").write_text(summary(outcomes, compared) + "\n")
    return code


def run_nightly(matrix: Path, results: Path, shard_spec: str | None, jobs: int) -> tuple[Path, int]:
    entries, repeat, retries = load_matrix(matrix)
    index, total = parse_shard(shard_spec)
    mine = shard(entries, index, total)
    night = results.resolve() / (time.strftime("nightly-%Y%m%d-%H%M%S") + (f"-shard{index}of{total}"
                                                                            if total > 1 else ""))
    night.mkdir(parents=True)
    extra = {"matrix": str(matrix.resolve()), "shard": f"{index}/{total}", "entries": len(entries),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(night / "nightly.json", json.dumps({**extra, "status": "incomplete"}, indent=1) + "\n")
    work = [(e, r) for e in mine for r in range(1, repeat + 1)]
    progress = Progress(len(work))
    print(f"nightly {night.name}: {len(work)} runs ({len(mine)} of {len(entries)} entries, shard {index}/{total}, "
          f"{jobs} at a time)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_run_entry, e, r, retries, night, progress) for e, r in work]
        outcomes = [f.result() for f in futures]
    code = write_report(night, outcomes, extra)
    from harness.bisect import bisect_hints

    hints = bisect_hints(night, [o.entry for o in outcomes if o.exit_code == EXIT_KERNEL], mine)
    with open(night / "summary.txt", "a") as f:
        f.write("".join(f"{line}\n" for line in hints))
    print((night / "summary.txt").read_text(), end="")
    print(f"nightly exit {code}; junit {night / 'junit.xml'}")
    return night, code


def merge_nights(dirs: list[Path], out: Path) -> int:
    """Join shard trees (each with nightly.json) into `out` with one junit.xml and summary."""
    outcomes: list[Outcome] = []
    for d in dirs:
        data = load_yaml(d / "nightly.json", "nightly result")
        if not isinstance(data, dict) or "outcomes" not in data:
            raise BadInput(f"{d}: not a finished nightly tree (no outcomes in nightly.json)")
        for raw in data["outcomes"]:
            outcome = Outcome(**raw)
            outcome.run_dir = _relocated(d, outcome)
            outcomes.append(outcome)
    out.mkdir(parents=True, exist_ok=True)
    code = write_report(out, outcomes, {"merged": [str(d.resolve()) for d in dirs]})
    print((out / "summary.txt").read_text(), end="")
    print(f"merged {len(dirs)} trees: exit {code}; junit {out / 'junit.xml'}")
    return code


def _relocated(tree: Path, outcome: Outcome) -> str | None:
    """A shard's run directory where its tree is now. CI hands shard trees to the merge
    job as artifacts: the absolute path the shard recorded is another job's directory,
    often on another machine."""
    if outcome.run_dir is None:
        return None
    here = tree.resolve() / outcome.entry / Path(outcome.run_dir).name
    return str(here) if (here / "meta.json").is_file() else outcome.run_dir


def jobs_default() -> int:
    return max(1, (os.cpu_count() or 2) // 2)
