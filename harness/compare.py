"""Compare runs across kernel builds: status transitions, dmesg error ids,
boot time and workload figures, with repeated runs counted (fail:runs) so a
flaky test is called flaky, not a regression.

Input: results/<run-id>/ directories, read through their records (meta.json
as rundir.RunRecord, tests.json). Runs are grouped by the build of their
kernel (harness/identity.py), not its release: runs of one build are repeats,
runs of two builds are two columns even when both report `6.12.117+`. The
columns keep the order the builds first appear in, so `compare A B` takes A as
the base: a test that passes on every run of A and fails on every run of B is
a regression; `flaky` is kept for a build whose own runs disagree.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.dmesg import errors, scan
from harness.errors import BadInput
from harness.identity import KEY, BuildIdentity, names_by_key
from harness.results import read_records
from harness.rundir import RunStatus, read_run


@dataclass
class RunSummary:
    run_id: str
    path: Path
    build: BuildIdentity
    label: str | None                         # --label of the run
    profile: str                              # requested, or requested->effective
    status: RunStatus
    started: str
    boot: float | None
    tests: dict[str, str]                     # nodeid -> passed/failed/error/skipped
    figures: dict[str, float]                 # numeric test properties (workload figures)
    dmesg_ids: set[str] = field(default_factory=set)


def load_run(path: Path) -> RunSummary:
    """One results directory. Raises BadInput if it is not one, naming a corrupt meta.json."""
    record = read_run(path)
    records = read_records(path)
    figures: dict[str, float] = {}
    ids: set[str] = set()
    for rec in records:
        for key, value in rec.properties.items():
            if key == "dmesg_error_ids":
                ids.update(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                figures[key] = float(value)
    for log in path.glob("dmesg*.txt"):
        ids.update(h.error_id for h in errors(scan(log.read_text(errors="replace").splitlines())))
    return RunSummary(
        run_id=record.run_id, path=path, build=record.kernel.identity(record.target), label=record.kernel.label,
        profile=record.profile.label, status=record.status, started=record.started,
        boot=record.timings.boot if record.timings else None,
        tests={r.nodeid: r.status for r in records}, figures=figures, dmesg_ids=ids)


@dataclass
class Cell:
    runs: int = 0
    failed: int = 0          # failed or error
    skipped: int = 0

    @property
    def text(self) -> str:
        if self.runs == 0:
            return "-"
        if self.skipped == self.runs:
            return "skip"
        if self.failed == 0:
            return "pass"
        if self.failed == self.runs - self.skipped:
            return "FAIL" if self.runs == 1 else f"FAIL {self.failed}:{self.runs}"
        return f"flaky {self.failed}:{self.runs}"


@dataclass
class Comparison:
    kernels: list[str]                             # the builds' names, base first: the columns
    builds: dict[str, BuildIdentity]               # kernel -> its build
    runs: dict[str, list[RunSummary]]
    table: dict[str, dict[str, Cell]]              # test -> kernel -> cell
    transitions: list[dict[str, str]]              # test, from, to, kind, before, after
    flaky: list[dict[str, str]]                    # test, kernel, cell: a build whose own runs disagree
    new_dmesg: dict[str, list[str]]                # kernel -> ids not seen on the previous kernel
    gone_dmesg: dict[str, list[str]]
    boot: dict[str, float | None]                  # kernel -> median boot seconds
    figures: dict[str, dict[str, float]]           # figure -> kernel -> median

    def labels(self, kernel: str) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.runs[kernel] if r.label))

    def to_json(self) -> dict[str, Any]:
        return {
            "kernels": self.kernels,
            "builds": {k: {**b.to_json(), "name": b.name(), "labels": self.labels(k)} for k, b in self.builds.items()},
            "runs": {k: [r.run_id for r in v] for k, v in self.runs.items()},
            "tests": {t: {k: c.text for k, c in row.items()} for t, row in self.table.items()},
            "transitions": self.transitions, "flaky": self.flaky,
            "new_dmesg_ids": self.new_dmesg, "gone_dmesg_ids": self.gone_dmesg,
            "boot_seconds": self.boot, "figures": self.figures,
        }


def _kind(before: Cell, after: Cell) -> str | None:
    a, b = before.text, after.text
    if a == b or "-" in (a, b) or "skip" in (a, b):
        return None
    if b.startswith("flaky") or a.startswith("flaky"):
        return "flaky"
    if a == "pass" and b.startswith("FAIL"):
        return "regression"
    if a.startswith("FAIL") and b == "pass":
        return "fix"
    return None


def _cell(runs: list[RunSummary], test: str) -> Cell:
    cell = Cell()
    for run in runs:
        status = run.tests.get(test)
        if status is None:
            continue
        cell.runs += 1
        cell.failed += status in ("failed", "error")
        cell.skipped += status == "skipped"
    return cell


def compare(runs: list[RunSummary]) -> Comparison:
    """The runs' builds side by side, in the order the builds first appear. Raises BadInput for no runs."""
    if not runs:
        raise BadInput("compare: no runs given")
    names = names_by_key([(r.build, r.label) for r in runs])
    kernels = list(dict.fromkeys(names[r.build.key] for r in runs))
    grouped: dict[str, list[RunSummary]] = {k: [] for k in kernels}
    builds: dict[str, BuildIdentity] = {}
    for run in runs:
        grouped[names[run.build.key]].append(run)
        builds.setdefault(names[run.build.key], run.build)
    tests = sorted({t for r in runs for t in r.tests})
    table = {test: {k: _cell(grouped[k], test) for k in kernels} for test in tests}
    transitions = []
    for test, row in table.items():
        for before, after in zip(kernels, kernels[1:], strict=False):
            kind = _kind(row[before], row[after])
            if kind:
                transitions.append({"test": test, "from": before, "to": after, "kind": kind,
                                    "before": row[before].text, "after": row[after].text})
    flaky = [{"test": test, "kernel": k, "cell": row[k].text}
             for test, row in table.items() for k in kernels if row[k].text.startswith("flaky")]
    new: dict[str, list[str]] = {}
    gone: dict[str, list[str]] = {}
    for before, after in zip(kernels, kernels[1:], strict=False):
        a = set().union(*(r.dmesg_ids for r in grouped[before]))
        b = set().union(*(r.dmesg_ids for r in grouped[after]))
        new[after], gone[after] = sorted(b - a), sorted(a - b)
    boot = {}
    for kernel in kernels:
        times = [r.boot for r in grouped[kernel] if r.boot is not None]
        boot[kernel] = round(statistics.median(times), 3) if times else None
    figure_names = sorted({f for r in runs for f in r.figures})
    figures = {name: {k: round(statistics.median(vals), 3) for k in kernels
                      if (vals := [r.figures[name] for r in grouped[k] if name in r.figures])}
               for name in figure_names}
    return Comparison(kernels, builds, grouped, table, transitions, flaky, new, gone, boot, figures)


def unsaid_flaky(c: Comparison) -> list[dict[str, str]]:
    """The flaky cells no flaky transition names (a build compared with itself alone, or with a build
    that is flaky too)."""
    said = {(t["test"], k) for t in c.transitions if t["kind"] == "flaky" for k in (t["from"], t["to"])}
    return [f for f in c.flaky if (f["test"], f["kernel"]) not in said]


def findings(c: Comparison) -> list[str]:
    """The verdict lines: regressions, fixes and flaky transitions between neighbouring builds, a build
    whose own runs disagree (when no transition says so already), new and gone dmesg error ids."""
    lines = [f"{t['kind'].upper():10} {t['test']}: {t['before']} on {t['from']} -> {t['after']} on {t['to']}"
             for t in c.transitions]
    lines += [f"{'FLAKY':10} {f['test']}: {f['cell']} on {f['kernel']}" for f in unsaid_flaky(c)]
    for kernel in c.kernels[1:]:
        lines += [f"NEW DMESG  {eid} on {kernel}" for eid in c.new_dmesg.get(kernel, [])]
        lines += [f"GONE DMESG {eid} on {kernel}" for eid in c.gone_dmesg.get(kernel, [])]
    return lines


def described(c: Comparison, kernel: str) -> str:
    """A column's name with its build's whole identity and how many runs it has."""
    full, n = c.builds[kernel].name(KEY), len(c.runs[kernel])
    # An unlabelled build's name is the start of its full name: only the rest is new.
    rest = full[len(kernel):] if full.startswith(kernel) else f": {full}"
    return f"{kernel}{rest}, {n} run{'s' if n != 1 else ''}"


def _deltas(values: list[float | None]) -> list[str]:
    out = []
    prev = None
    for v in values:
        if v is None:
            out.append("-")
        elif prev is None:
            out.append(f"{v:.2f}")
        else:
            out.append(f"{v:.2f} ({(v - prev) / prev * 100:+.0f}%)" if prev else f"{v:.2f}")
        prev = v if v is not None else prev
    return out


def words(name: str) -> list[str]:
    """A name's words for wrapping: a bracketed part (`(4 patches)`, `[base+debug]`) is one."""
    return re.findall(r"\([^)]*\)|\[[^\]]*\]|\S+", name)


def wrap(name: str, width: int) -> list[str]:
    """`name` in lines of at most `width` characters, broken between words (a longer word stays whole)."""
    lines: list[str] = []
    for word in words(name):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def render_text(c: Comparison) -> str:
    """The table with every build's whole name as its column header (wrapped, never cut), a legend
    with each build's identity, then the findings."""
    rows = [(test, [row[k].text for k in c.kernels]) for test, row in c.table.items()]
    figures = [("boot seconds (median)", _deltas([c.boot[k] for k in c.kernels]))]
    figures += [(name, _deltas([per.get(k) for k in c.kernels])) for name, per in c.figures.items()]
    width = max([len(t) for t in c.table] + [len(f) for f, _ in figures] + [20])
    cols = [max([16] + [len(w) for w in words(k)] + [len(cells[i]) for _, cells in rows + figures])
            for i, k in enumerate(c.kernels)]
    heads = [wrap(k, w) for k, w in zip(c.kernels, cols, strict=True)]
    depth = max(len(h) for h in heads)
    lines = []
    for i in range(depth):
        first = "TEST" if i == depth - 1 else ""
        parts = [(h[i - depth + len(h)] if i >= depth - len(h) else "") for h in heads]
        lines.append((f"{first:{width}}  " + "  ".join(f"{p:>{w}}" for p, w in zip(parts, cols, strict=True)))
                     .rstrip())
    for name, cells in rows + [("", [""] * len(cols))] + figures:
        lines.append((f"{name:{width}}  " + "  ".join(f"{x:>{w}}" for x, w in zip(cells, cols, strict=True)))
                     .rstrip())
    lines += ["", "kernels (base first):"]
    lines += [f"  {described(c, k)}" for k in c.kernels]
    lines.append("")
    lines += findings(c)
    if not c.transitions and not c.flaky:
        lines.append("no status transitions between kernels")
    return "\n".join(lines)
