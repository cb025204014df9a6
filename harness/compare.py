"""Compare runs across kernel versions: status transitions, dmesg error ids,
boot time and workload figures, with repeated runs counted (fail:runs) so a
flaky test is called flaky, not a regression.

Input: results/<run-id>/ directories, read through their records (meta.json
as rundir.RunRecord, tests.json). Runs are grouped by kernel release, in the
order the kernels first appear.
"""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.dmesg import errors, scan
from harness.errors import BadInput
from harness.results import read_records
from harness.rundir import RunStatus, read_run


@dataclass
class RunSummary:
    run_id: str
    path: Path
    kernel: str
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
        run_id=record.run_id, path=path, kernel=str(record.kernel.release), profile=record.profile.label,
        status=record.status, started=record.started, boot=record.timings.boot if record.timings else None,
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
    kernels: list[str]
    runs: dict[str, list[RunSummary]]
    table: dict[str, dict[str, Cell]]              # test -> kernel -> cell
    transitions: list[dict[str, str]]              # test, from, to, kind
    new_dmesg: dict[str, list[str]]                # kernel -> ids not seen on the previous kernel
    gone_dmesg: dict[str, list[str]]
    boot: dict[str, float | None]                  # kernel -> median boot seconds
    figures: dict[str, dict[str, float]]           # figure -> kernel -> median

    def to_json(self) -> dict[str, Any]:
        return {
            "kernels": self.kernels,
            "runs": {k: [r.run_id for r in v] for k, v in self.runs.items()},
            "tests": {t: {k: c.text for k, c in row.items()} for t, row in self.table.items()},
            "transitions": self.transitions, "new_dmesg_ids": self.new_dmesg, "gone_dmesg_ids": self.gone_dmesg,
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


def compare(runs: list[RunSummary]) -> Comparison:
    if not runs:
        raise BadInput("compare: no runs given")
    kernels: list[str] = []
    grouped: dict[str, list[RunSummary]] = {}
    for run in runs:
        if run.kernel not in grouped:
            kernels.append(run.kernel)
            grouped[run.kernel] = []
        grouped[run.kernel].append(run)
    tests = sorted({t for r in runs for t in r.tests})
    table: dict[str, dict[str, Cell]] = {}
    for test in tests:
        row = {}
        for kernel in kernels:
            cell = Cell()
            for run in grouped[kernel]:
                status = run.tests.get(test)
                if status is None:
                    continue
                cell.runs += 1
                cell.failed += status in ("failed", "error")
                cell.skipped += status == "skipped"
            row[kernel] = cell
        table[test] = row
    transitions = []
    for test, row in table.items():
        for before, after in zip(kernels, kernels[1:], strict=False):
            kind = _kind(row[before], row[after])
            if kind:
                transitions.append({"test": test, "from": before, "to": after, "kind": kind,
                                    "before": row[before].text, "after": row[after].text})
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
    names = sorted({f for r in runs for f in r.figures})
    figures = {name: {k: round(statistics.median(vals), 3) for k in kernels
                      if (vals := [r.figures[name] for r in grouped[k] if name in r.figures])}
               for name in names}
    return Comparison(kernels, grouped, table, transitions, new, gone, boot, figures)


def _delta(values: list[float | None]) -> str:
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
    return "  ".join(f"{x:>16}" for x in out)


def render_text(c: Comparison) -> str:
    width = max([len(t) for t in c.table] + [20])
    head = f"{'TEST':{width}}  " + "  ".join(f"{k[:16]:>16}" for k in c.kernels)
    lines = [head]
    for test, row in c.table.items():
        lines.append(f"{test:{width}}  " + "  ".join(f"{row[k].text:>16}" for k in c.kernels))
    lines.append("")
    lines.append(f"{'boot seconds (median)':{width}}  " + _delta([c.boot[k] for k in c.kernels]))
    for name, per in c.figures.items():
        lines.append(f"{name:{width}}  " + _delta([per.get(k) for k in c.kernels]))
    lines.append("")
    for t in c.transitions:
        lines.append(f"{t['kind'].upper():10} {t['test']}: {t['before']} on {t['from']} -> {t['after']} on {t['to']}")
    for kernel in c.kernels[1:]:
        for eid in c.new_dmesg.get(kernel, []):
            lines.append(f"NEW DMESG  {eid} on {kernel}")
        for eid in c.gone_dmesg.get(kernel, []):
            lines.append(f"GONE DMESG {eid} on {kernel}")
    if not c.transitions:
        lines.append("no status transitions between kernels")
    return "\n".join(lines)


def _svg_series(title: str, per_kernel: dict[str, float | None], kernels: list[str]) -> str:
    values = [per_kernel.get(k) for k in kernels]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    top = max(known) * 1.15 or 1.0
    w, h, pad = 560, 200, 40
    step = (w - 2 * pad) / max(1, len(kernels) - 1)
    points = [(pad + i * step, h - pad - (v / top) * (h - 2 * pad)) for i, v in enumerate(values) if v is not None]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4"/><text x="{x:.1f}" y="{y - 8:.1f}" '
                   f'text-anchor="middle" font-size="11">{v:.2f}</text>'
                   for (x, y), v in zip(points, known, strict=True))
    labels = "".join(f'<text x="{pad + i * step:.1f}" y="{h - 12}" text-anchor="middle" font-size="10">'
                     f"{html.escape(k)}</text>" for i, k in enumerate(kernels))
    return (f'<h3>{html.escape(title)}</h3><svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">'
            f'<polyline fill="none" stroke="#2a6" stroke-width="2" points="{path}"/>{dots}{labels}</svg>')


def render_html(c: Comparison) -> str:
    """One self-contained file: tables and inline SVG plots, no scripts, readable offline."""
    colour = {"pass": "#cfc", "skip": "#eee", "-": "#fff"}
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td>" + "".join(
            f'<td style="background:{colour.get(row[k].text, "#fcc" if "FAIL" in row[k].text else "#ffc")}">'
            f"{html.escape(row[k].text)}</td>" for k in c.kernels) + "</tr>"
        for t, row in c.table.items())
    trans = "".join(f"<li><b>{t['kind']}</b> {html.escape(t['test'])}: {t['before']} on {html.escape(t['from'])}"
                    f" &rarr; {t['after']} on {html.escape(t['to'])}</li>" for t in c.transitions) or "<li>none</li>"
    dmesg = "".join(f"<li>new on {html.escape(k)}: {html.escape(', '.join(ids))}</li>"
                    for k, ids in c.new_dmesg.items() if ids)
    dmesg += "".join(f"<li>gone on {html.escape(k)}: {html.escape(', '.join(ids))}</li>"
                     for k, ids in c.gone_dmesg.items() if ids)
    plots = _svg_series("boot seconds (median)", c.boot, c.kernels) + "".join(
        _svg_series(name, dict(per), c.kernels) for name, per in c.figures.items() if name.endswith("MBps"))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in c.kernels)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>harness compare</title>"
            f"<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:2px 6px}}"
            f" table{{border-collapse:collapse}}</style></head><body><h1>Kernel comparison</h1>"
            f"<table><tr><th>test</th>{head}</tr>{rows}</table><h2>Transitions</h2><ul>{trans}</ul>"
            f"<h2>dmesg error ids</h2><ul>{dmesg or '<li>no change</li>'}</ul><h2>Figures</h2>{plots}"
            f"</body></html>\n")


# -- the run index's answers (harness/rundir.py keeps the index) --------------------


def render_history(rows: list[dict[str, Any]], test: str | None) -> str:
    lines = []
    for row in rows:
        extra = f"  {row['test_status']:8}" if test else ""
        lines.append(f"{row['started'][:19]:19}  {row['run_id']:60}  {row['kernel']:28}  {row['status']:11}{extra}")
    if test:
        lines.append(failing_since(rows, test))
    return "\n".join(lines) if lines else "(no runs)"


def failing_since(rows: list[dict[str, Any]], test: str) -> str:
    """Rows newest first: the oldest run of the current failing streak, or why there is none."""
    bad = ("failed", "error")
    streak = 0
    while streak < len(rows) and rows[streak]["test_status"] in bad:
        streak += 1
    if streak == 0:
        return f"{test}: not failing in the newest run"
    start = rows[streak - 1]
    more = " (or earlier: the window ends here)" if streak == len(rows) else ""
    return f"{test} has failed since {start['run_id']} (kernel {start['kernel']}){more}"
