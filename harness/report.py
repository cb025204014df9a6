"""`harness compare`'s report in the format asked for: text and JSON (harness/compare.py
makes them), or HTML: one self-contained page (no scripts) with what changed
first, the tests x builds table, dmesg error ids, SVG plots of the figures and
each run's timeline (collapsed: what the guest, QEMU, the harness and the host
said, in order). Every build is named in full (a long name wraps, never cut),
with its identity beside it.
"""

from __future__ import annotations

import html
import json
from typing import Any

from harness.compare import Comparison, described, render_text, unsaid_flaky, wrap
from harness.errors import BadInput
from harness.results import read_records
from harness.runindex import render_history
from harness.timeline import load as load_timeline
from harness.timeline import render_text as render_timeline


def render(fmt: str, comparison: Comparison | None, rows: list[dict[str, Any]] | None = None,
           test: str | None = None) -> str:
    """The comparison as `fmt` (text, json, html); with `rows` (compare --last), the run index's rows
    before it. Raises BadInput for an HTML page of nothing."""
    if fmt == "json":
        data = comparison.to_json() if comparison else None
        return json.dumps(data if rows is None else {"runs": rows, "comparison": data}, indent=2)
    if fmt == "html":
        if comparison is None:
            raise BadInput("harness compare: none of the runs is left to compare")
        return render_html(comparison)
    parts = [render_history(rows, test)] if rows is not None else []
    return "\n\n".join(parts + ([render_text(comparison)] if comparison else []))

_CHAR_PX = 6.6      # an 11px sans-serif character, on average, for wrapping plot labels


def _svg_series(title: str, per_kernel: dict[str, float | None], kernels: list[str]) -> str:
    """One figure across the kernels as an inline SVG line plot, zero at the bottom, values on the points."""
    values = [per_kernel.get(k) for k in kernels]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    top = max(known) * 1.2 or 1.0
    w, pad = 520, 70
    # A build's name wraps into the width its point has, so names never run into each other.
    names = [wrap(k, max(12, int((w - pad) / len(kernels) / _CHAR_PX))) for k in kernels]
    foot = 22 + 12 * max(len(n) for n in names)
    h = 156 + foot
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
    labels = ""
    for x, a, lines in zip(xs, anchors, names, strict=True):
        at = x - pad / 2 if a == "start" else x + pad / 2 if a == "end" else x
        spans = "".join(f'<tspan x="{at:.1f}" dy="{0 if i == 0 else 12}">{html.escape(line)}</tspan>'
                        for i, line in enumerate(lines))
        labels += f'<text y="{h - foot + 20}" text-anchor="{a}" font-size="11">{spans}</text>'
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


# A timeline longer than this shows its head and its end (where a failure is) in the page;
# timeline.txt in the run directory has all of it.
_TIMELINE_HEAD, _TIMELINE_TAIL = 300, 1200


def _timelines(c: Comparison) -> str:
    """Each run's timeline, made from its event log, as a collapsed block; runs without one are left out."""
    esc = html.escape
    blocks = []
    for kernel in c.kernels:
        for run in c.runs[kernel]:
            tl = load_timeline(run.path)
            if not tl.entries:
                continue
            lines = render_timeline(tl, run.run_id).splitlines()
            if len(lines) > _TIMELINE_HEAD + _TIMELINE_TAIL:
                cut = len(lines) - _TIMELINE_HEAD - _TIMELINE_TAIL
                lines = [*lines[:_TIMELINE_HEAD], f"... {cut} lines left out here: {run.path}/timeline.txt has them",
                         *lines[-_TIMELINE_TAIL:]]
            blocks.append(f'<details class="timeline"><summary><b>{esc(run.run_id)}</b> ({esc(kernel)}, '
                          f"{esc(run.profile)}, {run.status}): {len(tl.entries)} events</summary>"
                          f"<pre>{esc(chr(10).join(lines))}</pre></details>")
    return "".join(blocks) or "<p>no run has an event log</p>"


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
    for f in unsaid_flaky(c):
        kinds.setdefault(f["test"], "flaky")
        items.append(f'<li class="flaky"><span class="kind">flaky</span> <b>{esc(f["test"])}</b>: '
                     f'<b>{esc(f["cell"])}</b> on {esc(f["kernel"])}</li>')
    headline = (f'{len(regressions)} regression{"s" if len(regressions) != 1 else ""}' if regressions
                else "no regressions")
    others = len(items) - len(regressions)
    headline += f", {others} other change{'s' if others != 1 else ''}" if others else ""
    new_ids = "".join(f"<p>new kernel log errors on {esc(k)}: <b>{esc(', '.join(ids))}</b></p>"
                      for k, ids in c.new_dmesg.items() if ids)
    verdict = (f'<section id="changes" class="{"bad" if regressions else "good"}"><h2>{headline}</h2>'
               + (f"<ul>{''.join(items)}</ul>" if items else "<p>every test has the same verdict on each kernel</p>")
               + new_ids + "</section>")
    runs = "".join(f"<li><b>{esc(k)}</b>{esc(described(c, k)[len(k):])}, profile "
                   f"{esc(', '.join(sorted({r.profile for r in c.runs[k]})))}</li>" for k in c.kernels)
    head = "".join(f'<th title="{esc(c.builds[k].key)}">{esc(k)}</th>' for k in c.kernels)
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
             " .plots{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figcaption{font-weight:bold}"
             " details.timeline pre{font-size:12px;overflow-x:auto;background:#f7f7f7;padding:.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>harness compare: "
            f"{esc(' vs '.join(c.kernels))}</title><style>{style}</style></head><body>"
            f"<h1>Kernel comparison</h1>{verdict}<ul>{runs}</ul>"
            f"<h2>Tests</h2><table><tr><th>test</th><th>change</th>{head}</tr>{rows}</table>"
            f"<h2>dmesg error ids</h2><ul>{dmesg or '<li>no change</li>'}</ul>"
            f"<h2>Figures</h2><div class='plots'>{plots}</div>"
            f"<h2>Timelines</h2>{_timelines(c)}</body></html>\n")
