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
    """One figure across the kernels as an inline SVG line plot, zero at the bottom, values on the points."""
    values = [per_kernel.get(k) for k in kernels]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    top = max(known) * 1.2 or 1.0
    w, h, pad, foot = 520, 190, 70, 34
    step = (w - 2 * pad) / max(1, len(kernels) - 1)
    xs = [pad + i * step if len(kernels) > 1 else w / 2 for i in range(len(kernels))]
    points = [(xs[i], h - foot - (v / top) * (h - foot - 16)) for i, v in enumerate(values) if v is not None]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4"/><text x="{x:.1f}" y="{y - 8:.1f}" '
                   f'text-anchor="middle" font-size="12">{v:.2f}</text>'
                   for (x, y), v in zip(points, known, strict=True))
    # Kernel names are long: the outer ones grow inwards so none is cut at the edge.
    anchors = ["start" if i == 0 and len(kernels) > 1 else "end" if i == len(kernels) - 1 and len(kernels) > 1
               else "middle" for i in range(len(kernels))]
    labels = "".join(f'<text x="{x - pad / 2 if a == "start" else x + pad / 2 if a == "end" else x:.1f}" '
                     f'y="{h - 10}" text-anchor="{a}" font-size="11">{html.escape(k)}</text>'
                     for x, a, k in zip(xs, anchors, kernels, strict=True))
    axis = f'<line x1="{pad / 2}" y1="{h - foot}" x2="{w - pad / 2}" y2="{h - foot}" stroke="#999"/>'
    shown, prev = [], None
    for v in known:
        shown.append(f"{v:.2f}" + (f" ({(v - prev) / prev * 100:+.0f}%)" if prev else ""))
        prev = v
    return (f'<figure><figcaption>{html.escape(title)}: {" &rarr; ".join(shown)}</figcaption>'
            f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="{html.escape(title)}">{axis}'
            f'<polyline fill="none" stroke="#2a6" stroke-width="2" points="{path}"/>{dots}{labels}</svg></figure>')


def _why(c: Comparison, test: str, kernel: str) -> str:
    """The first failure message of `test` on `kernel`, from its runs' tests.json."""
    for run in c.runs[kernel]:
        for rec in read_records(run.path):
            if rec.nodeid == test and rec.status in ("failed", "error") and rec.message.strip():
                return rec.message.strip().splitlines()[0][:300]
    return ""


_ORDER = {"regression": 0, "flaky": 1, "fix": 2}
_CELL = {"pass": "pass", "skip": "skip", "-": "absent"}


def render_html(c: Comparison) -> str:
    """One self-contained file: what changed first, then the table, dmesg ids and SVG plots; no scripts."""
    esc = html.escape
    kinds: dict[str, str] = {}
    for t in c.transitions:
        kinds[t["test"]] = min(kinds.get(t["test"], t["kind"]), t["kind"], key=_ORDER.__getitem__)
    regressions = [t for t in c.transitions if t["kind"] == "regression"]
    items = []
    for t in sorted(c.transitions, key=lambda t: (_ORDER[t["kind"]], t["test"])):
        why = _why(c, t["test"], t["to"]) if t["kind"] != "fix" else ""
        items.append(f'<li class="{t["kind"]}"><span class="kind">{t["kind"]}</span> <b>{esc(t["test"])}</b>: '
                     f'{esc(t["before"])} on {esc(t["from"])} &rarr; <b>{esc(t["after"])}</b> on {esc(t["to"])}'
                     + (f'<div class="why">{esc(why)}</div>' if why else "") + "</li>")
    headline = (f'{len(regressions)} regression{"s" if len(regressions) != 1 else ""}' if regressions
                else "no regressions")
    others = len(c.transitions) - len(regressions)
    headline += f", {others} other change{'s' if others != 1 else ''}" if others else ""
    new_ids = "".join(f"<p>new kernel log errors on {esc(k)}: <b>{esc(', '.join(ids))}</b></p>"
                      for k, ids in c.new_dmesg.items() if ids)
    verdict = (f'<section id="changes" class="{"bad" if regressions else "good"}"><h2>{headline}</h2>'
               + (f"<ul>{''.join(items)}</ul>" if items else "<p>every test has the same verdict on each kernel</p>")
               + new_ids + "</section>")
    runs = "".join(f"<li><b>{esc(k)}</b>: {len(c.runs[k])} run(s), profile "
                   f"{esc(', '.join(sorted({r.profile for r in c.runs[k]})))}</li>" for k in c.kernels)
    head = "".join(f"<th>{esc(k)}</th>" for k in c.kernels)
    ordered = sorted(c.table, key=lambda t: (_ORDER.get(kinds.get(t, ""), 3), t))
    rows = "".join(
        f'<tr class="{kinds.get(t, "same")}"><td class="test">{esc(t)}</td><td>{kinds.get(t, "")}</td>' + "".join(
            f'<td class="{_CELL.get(row[k].text, "fail" if "FAIL" in row[k].text else "flaky")}">'
            f"{esc(row[k].text)}</td>" for k in c.kernels) + "</tr>"
        for t in ordered for row in [c.table[t]])
    dmesg = "".join(f"<li>new on {esc(k)}: {esc(', '.join(ids))}</li>" for k, ids in c.new_dmesg.items() if ids)
    dmesg += "".join(f"<li>gone on {esc(k)}: {esc(', '.join(ids))}</li>" for k, ids in c.gone_dmesg.items() if ids)
    plots = _svg_series("boot seconds (median)", c.boot, c.kernels) + "".join(
        _svg_series(name, dict(per), c.kernels) for name, per in c.figures.items() if name.endswith("MBps"))
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1200px} td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:left} table{border-collapse:collapse} td.test{font-family:monospace}"
             " td.pass{background:#cfc} td.skip,td.absent{background:#eee} td.fail{background:#f99;font-weight:bold}"
             " td.flaky{background:#ffc} tr.regression td.test{font-weight:bold;border-left:6px solid #c00}"
             " #changes{border:2px solid;border-radius:6px;padding:0 1em;margin-bottom:1em}"
             " #changes.bad{border-color:#c00;background:#fff3f3} #changes.good{border-color:#2a6}"
             " #changes li{margin:.4em 0} .kind{text-transform:uppercase;font-weight:bold;font-size:.85em}"
             " li.regression .kind{color:#c00} .why{font-family:monospace;color:#444;margin-left:1em}"
             " .plots{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figcaption{font-weight:bold}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>harness compare: "
            f"{esc(' vs '.join(c.kernels))}</title><style>{style}</style></head><body>"
            f"<h1>Kernel comparison</h1>{verdict}<ul>{runs}</ul>"
            f"<h2>Tests</h2><table><tr><th>test</th><th>change</th>{head}</tr>{rows}</table>"
            f"<h2>dmesg error ids</h2><ul>{dmesg or '<li>no change</li>'}</ul>"
            f"<h2>Figures</h2><div class='plots'>{plots}</div></body></html>\n")


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
